"""Dashboard responsiveness: what moving a threshold slider on the Cliques page costs after an audit.

Workspace and audit as in bench_audit (benchmarks/workspaces.py: 100 prompts x 500
generations of 32 x 32, one prompt in ten with a planted clique of 50 to 400 near-copies;
``--smoke``: 10 x 50), audited once by ``core.audit.run_audit`` (its time and stages are
printed too). Then, as the dashboard does it (dashboard/pages/cliques.py):

* load: ``RunCache(ws, run)`` once per run (the dashboard keeps it in st.cache_resource);
* recount: ``RunCache.recount(tau, k, delta, grid)`` for a slider move to each of the 61 taus of
  the tau grid at each cached tile grid (1, 2, 4, 8; k and delta at their defaults), and for k
  and delta moves at tau 0.1;
* groups: ``core.rethreshold.prompt_groups`` for one prompt at a tau and tile grid, with the loaded
  RunCache (what the page computes for the prompt it shows after a move): the largest planted
  prompt and a novel prompt at tau 0.1, 0.2 and 0.3 on every cached grid, each best of 3.

Target: a slider move (recount + groups of the shown prompt) under 0.5 s.

    python -m benchmarks.bench_recount [--smoke] [--prompts P] [--per-prompt N]
"""

from __future__ import annotations

import argparse
import statistics
import time


from benchmarks.common import print_table, timeit, write_json
from benchmarks.workspaces import bench_workspace, stage_rows

TARGET_S = 0.5


def main(smoke: bool = False, prompts: int | None = None, per_prompt: int | None = None) -> dict:
    from core import config
    from core.rethreshold import RunCache, prompt_groups

    a, ws = bench_workspace(smoke, prompts, per_prompt)
    prompts, per_prompt = a.built.prompts, a.built.per_prompt
    print(f"workspace: {prompts} prompts x {per_prompt} generations, planted cliques {sorted(a.built.planted.values())}; "
          f"run_audit {a.audit_seconds:.1f} s ({60 * prompts / a.audit_seconds:.1f} prompts per minute)\n")
    stages = stage_rows(a)
    print_table(stages, ["stage", "seconds", "share", "ms_per_prompt"], title="run_audit stages")

    load_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        RunCache(ws, a.run_id)
        load_times.append(time.perf_counter() - t0)
    cache = RunCache(ws, a.run_id)
    s = ws.settings()
    k, delta, min_size, max_groups = s["min_clique"], s["delta"], s["group_min_size"], s["max_groups"]

    moves = []
    for grid in cache.grids:
        for tau in cache.taus:
            t0 = time.perf_counter()
            rc = cache.recount(float(tau), k, delta, grid)
            moves.append((float(tau), time.perf_counter() - t0, rc.flagged, rc.extracted, grid))
    other = []
    for kk in (2, 5, 10, 20, 50, 100, 200):
        t0 = time.perf_counter()
        cache.recount(0.1, kk, delta)
        other.append(time.perf_counter() - t0)
    for dd in (0.05, 0.1, 0.15, 0.2, 0.3):
        t0 = time.perf_counter()
        cache.recount(0.1, k, dd)
        other.append(time.perf_counter() - t0)
    times = [m[1] for m in moves]
    recount_row = {"what": f"recount, 61 tau moves x grids {','.join(map(str, cache.grids))}", "median_s": statistics.median(times), "max_s": max(times),
                   "moves": len(times)}
    other_row = {"what": "recount, k and delta moves", "median_s": statistics.median(other), "max_s": max(other),
                 "moves": len(other)}
    load_row = {"what": "RunCache load (once per run)", "median_s": statistics.median(load_times), "max_s": max(load_times),
                "moves": len(load_times)}

    planted = max(a.built.planted, key=a.built.planted.get) if a.built.planted else None
    novel = next(int(p) for p in cache.prompt_ids if int(p) not in a.built.planted)
    groups = []
    for label, pid in ((f"planted {a.built.planted.get(planted)}", planted), ("novel", novel)):
        if pid is None:
            continue
        for grid in cache.grids:
            for tau in (0.1, 0.2, 0.3):
                out: list = []
                t = timeit(lambda: out.append(prompt_groups(ws, a.run_id, pid, tau=tau, min_size=min_size, max_groups=max_groups,
                                                             grid=grid, cache=cache)), repeat=3, warmup=0)
                g = out[-1]
                groups.append({"prompt": label, "grid": grid, "tau": tau, "best_s": t["best_s"], "median_s": t["median_s"],
                               "groups": len(g), "largest": g[0].size if g else 0})
    worst_move = max(times) + max(r["median_s"] for r in groups)
    print_table([load_row, recount_row, other_row], ["what", "median_s", "max_s", "moves"], title="recount")
    print_table(groups, ["prompt", "grid", "tau", "best_s", "median_s", "groups", "largest"],
                title=f"prompt_groups for one prompt (min_size {min_size}, max_groups {max_groups}, cached RunCache)")
    verdict = "meets" if worst_move < TARGET_S else "misses"
    print(f"slowest slider move (slowest recount + slowest prompt_groups median): {worst_move:.3f} s: {verdict} "
          f"the {TARGET_S} s target\n")
    for grid in cache.grids:
        curve = [m for m in moves if m[4] == grid][::10]
        print(f"grid {grid}: flagged / extracted prompts at tau " + ", ".join(f"{m[0]:.3f}: {m[2]}/{m[3]}" for m in curve))
    return write_json("recount", smoke, {
        "prompts": prompts, "per_prompt": per_prompt, "planted": {str(p): n for p, n in a.built.planted.items()},
        "audit_seconds": a.audit_seconds, "stages": stages, "load": load_row, "recount": recount_row,
        "recount_k_delta": other_row, "recount_moves": [{"tau": m[0], "grid": m[4], "s": m[1], "flagged": m[2], "extracted": m[3]} for m in moves],
        "prompt_groups": groups, "worst_move_s": worst_move, "target_s": TARGET_S, "meets_target": worst_move < TARGET_S,
        "defaults": {"k": k, "delta": delta, "min_size": min_size, "max_groups": max_groups,
                     "edge_threshold": config.default("edge_threshold")},
    })


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="10 prompts x 50 generations, seconds")
    p.add_argument("--prompts", type=int)
    p.add_argument("--per-prompt", type=int)
    args = p.parse_args()
    main(args.smoke, args.prompts, args.per_prompt)
