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

    python -m benchmarks.bench_audit [--smoke] [--prompts P] [--per-prompt N]
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


def main(smoke: bool = False, prompts: int | None = None, per_prompt: int | None = None) -> dict:
    import torch

    from core.results import count_summary

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
    return write_json("audit", smoke, {
        "prompts": prompts, "per_prompt": per_prompt, "planted": {str(k): v for k, v in a.built.planted.items()},
        "build_seconds": a.built.seconds, "audit_seconds": a.audit_seconds, "prompts_per_minute": rate,
        "stages": stages, "grid_cost": grid_cost, "summary": summary, "curve": curves, "torch_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="10 prompts x 50 generations, seconds")
    p.add_argument("--prompts", type=int)
    p.add_argument("--per-prompt", type=int)
    args = p.parse_args()
    main(args.smoke, args.prompts, args.per_prompt)
