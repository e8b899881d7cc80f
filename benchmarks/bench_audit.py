"""The audit end to end: prompts audited per minute at 500 generations per prompt, time per stage.

Workspace (benchmarks/workspaces.py): the demo training set (641 files, 56 distinct
32 x 32 images) and 100 prompts x 500 generations of 32 x 32 (``--smoke``: 10 x 50),
most prompts novel, one in ten with a planted clique of 50, 100, 200 or 400 near-copies
of a training image. ``core.audit.run_audit`` runs once with the default settings
(pixel embedder, grid 4, tau 0.1, 50 neighbours searched per generation, tau curve over
61 taus) and fills its per-stage timings:

* setup: settings, embedder, training index; decode: PNG -> float32 at the working size;
* retrieve: embedding + index search; exact_neighbours: exact and tiled L2 to the retrieved
  training images; distances: pairwise tiled L2 inside the prompt;
* cliques: the prompt's clique groups at tau; curve: the largest clique (size, medoid,
  mean distance) at every tau of the grid (``tau_curve``);
* save_cache: the per-run cache arrays; store: candidates, members and neighbours rows.

The default settings cache grids 1, 2, 4 and 8 for the dashboard's grid slider and compute
the tau curves in worker processes (``audit_workers`` -1: one per core, at most 8, for
prompts of 100 generations or more). The same workspace is audited again, in the same
process, with the curves inline (``audit_workers`` 0), with grid 4 alone
(``grid_choices=""``), and with both (the audit as it was before the grid slider), to show
what the extra grids cost per stage and what the workers win back. With workers, the
``curve`` stage is the main process's time spent handing out tasks and waiting for answers.

Then, on the cached distance matrices of one novel and one planted prompt, the tau curve
as the audit computes it (``tau_curve``: one ``clique_groups`` call per distinct graph
of the grid) against ``core.cliques.largest_clique_curve`` (sizes only), to show what the
curve stage costs and what a cheaper curve would save.

The whole audit at the paper's resolution (``whole_audit``): one prompt of 500 generations of
512 x 512 (100 noisy copies of a training image, 400 distinct textures) and 50 training
images (``workspaces.build_copies_workspace``; ``--smoke``: 40 of 64 x 64), audited with the
default settings, several times; each run's stage timings against the bare float32 matmul of
the same tile products, timed in the same process between the audit's runs (the products of
every pair of generations on each tile of the finest cached grid: 64 products of
(500 x 12,288) x (12,288 x 500) for grids 1, 2, 4, 8 at 512 x 512; and, listed apart, the
products of the generations against the training images), and the ratio.

    python -m benchmarks.bench_audit [--smoke] [--prompts P] [--per-prompt N] [--part grids|whole|all]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.workspaces import bench_workspace, du_mb, stage_rows


def curve_rows(ws, run_id: int, planted: dict[int, int]) -> list[dict]:
    from core.curves import TAU_GRID, tau_curve
    from core.rethreshold import RunCache
    from core.cliques import largest_clique_curve

    cache = RunCache(ws, run_id)
    novel = [int(p) for p in cache.prompt_ids if int(p) not in planted]
    picks = [("novel", novel[0])] if novel else []
    if planted:
        big = max(planted, key=planted.get)
        picks.append((f"planted {planted[big]}", big))
    rows = []
    for kind, pid in picks:
        dist = cache.distances(pid)
        upper = dist[np.triu_indices(len(dist), 1)]
        graphs = len({int(np.count_nonzero(upper <= t)) for t in TAU_GRID})
        t0 = time.perf_counter()
        size = tau_curve(dist)[0][None]
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sizes = largest_clique_curve(dist, TAU_GRID)
        lcc_s = time.perf_counter() - t0
        rows.append({"prompt": kind, "generations": len(dist), "distinct_graphs": graphs,
                     "fill_curve_s": fill_s, "largest_clique_curve_s": lcc_s,
                     "ratio": fill_s / lcc_s if lcc_s else float("inf"),
                     "sizes_agree": bool(np.array_equal(np.asarray(sizes), size[0])),
                     "size_at_0.1_0.2_0.3": [int(size[0, int(np.argmin(np.abs(TAU_GRID - t)))]) for t in (0.1, 0.2, 0.3)]})
    return rows


VARIANTS = (("grids 1,2,4,8, workers auto", None, None), ("grids 1,2,4,8, inline", None, 0),
            ("grid 4 alone, workers auto", "", None), ("grid 4 alone, inline", "", 0))


def variant_rows(ws, a) -> tuple[list[dict], list[str]]:
    """The stages of run_audit for each of VARIANTS (grid_choices, audit_workers) on the same workspace;
    the first variant is the default, already measured by ``audited_workspace``."""
    from core.audit import params_from, run_audit
    from core.curves import curve_workers
    from benchmarks.workspaces import STAGES

    measured = {VARIANTS[0][0]: (a.timings, a.audit_seconds)}
    for name, choices, workers in VARIANTS[1:]:
        timings: dict[str, float] = {}
        ws.set_setting("audit_workers", -1 if workers is None else workers)
        t0 = time.perf_counter()
        run_audit(ws, params_from(ws, grid_choices=choices), timings=timings)
        measured[name] = (timings, time.perf_counter() - t0)
    ws.set_setting("audit_workers", -1)
    rows = [{"stage": s, **{name: t.get(s, 0.0) for name, (t, _) in measured.items()}} for s in STAGES]
    rows.append({"stage": "total (wall)", **{name: total for name, (_, total) in measured.items()}})
    base = measured[VARIANTS[-1][0]][1]
    rows.append({"stage": "total vs grid 4 inline", **{name: total / base for name, (_, total) in measured.items()}})
    auto = curve_workers(-1, a.built.prompts * 4, a.built.per_prompt)
    return rows, [f"automatic curve workers on this machine: {auto}"]


def matmul_seconds(n: int, m: int, size: int, fine: int) -> float:
    """Seconds of the bare float32 products of n images against m on every tile of a fine x fine grid
    (torch, random data of the tiles' shape; n == m: one matrix against itself)."""
    import torch

    t = (size // fine) ** 2 * 3
    a = torch.rand(n, t)
    b = a if n == m else torch.rand(m, t)
    a @ b.T  # warm-up
    t0 = time.perf_counter()
    for _ in range(fine * fine):
        a @ b.T
    return time.perf_counter() - t0


def whole_audit(smoke: bool = False, repeat: int = 3) -> dict:
    """The whole audit of one prompt at 512 x 512 (see the module docstring) against the bare matmul."""
    import atexit
    import math
    import os
    import shutil
    import tempfile

    from core.audit import cached_grids, params_from, run_audit
    from core.results import count_summary
    from core.store import Workspace
    from benchmarks.workspaces import build_copies_workspace

    size, gens, copies, training = (64, 40, 12, 6) if smoke else (512, 500, 100, 50)
    tmp = tempfile.mkdtemp(prefix="memaudit-bench-whole-")
    atexit.register(shutil.rmtree, tmp, True)
    built = build_copies_workspace(os.path.join(tmp, "ws"), size=size, generations=gens, copies=copies, training=training)
    ws = Workspace.open(built.root)
    fine = math.lcm(*cached_grids(size, params_from(ws, working_size=size)))
    print(f"workspace: 1 prompt x {gens} generations of {size} x {size} ({copies} noisy copies of a training image), "
          f"{training} training images; built in {sum(built.seconds.values()):.1f} s, {du_mb(built.root):.0f} MB on disk")
    runs, pair_mm, train_mm, loads = [], [], [], []
    for r in range(repeat + 1):  # the first audit also pools the training set (cached for the next ones)
        loads.append(os.getloadavg()[0])
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        run_id = run_audit(ws, timings=timings)
        runs.append({"run": r, "total": time.perf_counter() - t0, **timings})
        pair_mm.append(matmul_seconds(gens, gens, size, fine))
        train_mm.append(matmul_seconds(gens, training, size, fine))
    summary = count_summary(ws, run_id)
    stages = ("setup", "decode", "nearest", "exact_neighbours", "distances", "save_cache", "cliques", "curve", "store", "total")
    rows = [{"stage": st, **{("first (pools training)" if r["run"] == 0 else f"run {r['run']}"): r.get(st, 0.0) for r in runs}}
            for st in stages]
    rows.append({"stage": "matmul, pairs of generations", **{("first (pools training)" if i == 0 else f"run {i}"): v
                                                            for i, v in enumerate(pair_mm)}})
    rows.append({"stage": "matmul, generations x training", **{("first (pools training)" if i == 0 else f"run {i}"): v
                                                              for i, v in enumerate(train_mm)}})
    rows.append({"stage": "ratio total / matmul (pairs)", **{("first (pools training)" if i == 0 else f"run {i}"): r["total"] / m
                                                            for i, (r, m) in enumerate(zip(runs, pair_mm))}})
    print_table(rows, ["stage", *(k for k in rows[0] if k != "stage")],
                title=f"the whole audit, seconds per stage, against the bare float32 matmul of the same tile products "
                      f"({fine * fine} tiles of {fine} x {fine}); load average before each run {[round(x, 1) for x in loads]}")
    warm = runs[1:] or runs
    ratios = [r["total"] / m for r, m in zip(runs, pair_mm)][len(runs) - len(warm):]
    ratio = float(np.median(ratios))
    print(f"audit {min(r['total'] for r in warm):.2f} s at best, matmul {min(pair_mm):.2f} s at best (+ {min(train_mm):.2f} s "
          f"against the training images); audit / matmul timed right after it, median over the runs after the first: "
          f"{ratio:.2f} (target 2); flagged {summary.get('flagged_prompts')}, extracted {summary.get('extracted_candidates')}\n")
    return {"size": size, "generations": gens, "copies": copies, "training": training, "fine_grid": fine, "runs": runs,
            "matmul_pairs_s": pair_mm, "matmul_training_s": train_mm, "load_before": loads, "ratio_median": ratio,
            "summary": summary}


def main(smoke: bool = False, prompts: int | None = None, per_prompt: int | None = None, part: str = "all") -> dict:
    import torch

    from core.results import count_summary

    if part == "whole":
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return write_json("audit_whole", smoke, {"whole": whole_audit(smoke), "torch_threads": torch.get_num_threads()})

    a, ws = bench_workspace(smoke, prompts, per_prompt)
    prompts, per_prompt = a.built.prompts, a.built.per_prompt
    rate = 60.0 * prompts / a.audit_seconds
    print(f"workspace: {prompts} prompts x {per_prompt} generations (32 x 32), {len(a.built.planted)} planted cliques "
          f"{sorted(a.built.planted.values())}; built in {a.built.seconds['training']:.1f} s (training) + "
          f"{a.built.seconds['generations']:.1f} s (generations), {du_mb(a.built.root):.0f} MB on disk")
    print(f"run_audit: {a.audit_seconds:.1f} s = {rate:.1f} prompts per minute at {per_prompt} generations per prompt\n")
    stages = stage_rows(a)
    print_table(stages, ["stage", "seconds", "share", "ms_per_prompt"], title="run_audit stages (summed over prompts)")
    grid_cost, notes = variant_rows(ws, a)
    print_table(grid_cost, ["stage", *(v[0] for v in VARIANTS)],
                title="seconds per stage: grids cached for the slider x tau curves in worker processes or inline")
    print("\n".join(notes) + "\n")
    summary = count_summary(ws, a.run_id)
    curves = curve_rows(ws, a.run_id, a.built.planted)
    print_table(curves, ["prompt", "generations", "distinct_graphs", "fill_curve_s", "largest_clique_curve_s", "ratio",
                         "sizes_agree", "size_at_0.1_0.2_0.3"],
                title="tau curve of one prompt: the audit's tau_curve vs largest_clique_curve (sizes only)")
    whole = whole_audit(smoke) if part == "all" else None
    return write_json("audit", smoke, {
        "prompts": prompts, "per_prompt": per_prompt, "planted": {str(k): v for k, v in a.built.planted.items()},
        "build_seconds": a.built.seconds, "audit_seconds": a.audit_seconds, "prompts_per_minute": rate,
        "stages": stages, "grid_cost": grid_cost, "summary": summary, "curve": curves, "torch_threads": torch.get_num_threads(),
        "whole": whole,
    })


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="10 prompts x 50 generations, seconds")
    p.add_argument("--prompts", type=int)
    p.add_argument("--per-prompt", type=int)
    p.add_argument("--part", choices=("grids", "whole", "all"), default="all",
                   help="grids: the 32 x 32 workspace and its variants; whole: the whole audit at 512 x 512; all: both")
    args = p.parse_args()
    main(args.smoke, args.prompts, args.per_prompt, args.part)
