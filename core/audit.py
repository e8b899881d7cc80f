"""The audit: the paper's filter stage as one readable loop.

For every prompt of the workspace::

    decode its generations at the working resolution (8-bit levels)
    D = pairwise tiled L2 between them                       (cached)
    groups = clique groups of the graph D <= tau            (largest first)
    for every generation: its nearest training image in the whole training set, certified
        (core.nearest: every training image measured when the set is small, else pooled-pixel
        lower bounds and exact distances until no unmeasured image can be nearer), and exact
        tiled L2 to the shown neighbours (cached)
    for every group: the medoid's nearest training image; extracted when l2 <= delta
    the largest clique's size and medoid at every tau of a grid (cached),
        so that moving a threshold recounts without computing a distance

Where a search budget stops a search, the answer says so instead of passing for exact:
a clique whose search ran out of ``clique_node_budget`` is stored with ``clique_exact``
false (its size is a lower bound), a nearest neighbour whose search ran out of
``nearest_budget`` with ``nearest_certified`` false (and a lower bound of the true
nearest distance).

Distances, curves and the neighbours' tiled L2 are cached for the run's tile grid G and
for every grid of the ``grid_choices`` setting that divides the working size (one pass of
distance products serves them all), so the tile grid is a slider too.

On the CPU, distances are exact: generations are decoded to their 8-bit levels and measured
by integer products (``core.distances.Levels``), the pairwise ones and those to a small
training set alike; on a GPU the float32 product form (within 5e-5 of direct differences).

Generations without a prompt (unconditional models) are judged one by one by
relative L2 (PAPER.md): rel = l2(x_hat, x) / (alpha * mean over the n nearest
training images y of l2(x_hat, y)); extracted when rel < 1. They are decoded, searched
and written in chunks (``config.AUDIT_CHUNK_BYTES``), so a million of them audit in the
memory of one chunk plus the training set's.

Results are stored as an audit run with its parameters, so runs with different
thresholds can be compared. The per-run cache lives in WS/cache/run-<id>/; its
per-generation arrays are memory-mapped files written in place as the work goes.

The units of work are ``AuditContext.audit_prompt`` (one text prompt) and
``AuditContext.audit_chunk`` (a chunk of unconditional generations): a process that builds
an ``AuditContext`` can run either, and the run's own process stores what they return.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import config
from .curves import Curves, curve_workers, run_taus
from .errors import InputError, MemauditError
from .records import AuditParams
from .results import get_training
from .runs import cache_dir, distance_file, own_run, remove_abandoned_runs, tiled_file
from .store import Workspace, now

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------- parameters
def params_from(ws: Workspace, **overrides: object) -> AuditParams:
    """The workspace's settings with ``overrides`` (None values ignored) applied and checked."""
    s = ws.settings()
    for name, value in overrides.items():
        if value is not None:
            s[name] = config.check(name, value)
    fields = AuditParams.__dataclass_fields__
    return AuditParams(**{name: s[name] for name in fields})


def cached_grids(size: int, params: AuditParams) -> list[int]:
    """The tile grids an audit at working size ``size`` caches: G and the grid_choices dividing ``size``."""
    return sorted({params.grid} | {g for g in config.grid_list(params.grid_choices) if size % g == 0})


def audit_device(setting: str) -> str:
    """The ``audit_device`` setting -> the torch device the audit's distances run on ('cpu' or 'cuda')."""
    import torch

    name = str(setting).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("audit_device is 'cuda' but no CUDA GPU is usable here; "
                         "set it to cpu or auto (`memaudit settings WS audit_device auto`)")
    if name not in ("cpu", "cuda"):
        raise InputError(f"audit_device must be cpu, cuda or auto, got {setting!r}")
    return name


def _working_size(ws: Workspace, requested: int) -> int:
    if requested:
        return requested
    with ws.connect() as con:
        rows = con.execute("SELECT MIN(width, height) AS s, COUNT(*) AS n FROM generations GROUP BY s ORDER BY n DESC, s DESC").fetchall()
    if not rows:
        raise InputError(f"{ws.root} has no generations to audit; run `memaudit generate` or `memaudit import-generations` first")
    return int(rows[0]["s"])


# ---------------------------------------------------------------------------- what is audited
@dataclass(frozen=True)
class PromptPlan:
    """One prompt's share of a run: its generations are rows ``base .. base + count`` of the run's arrays."""
    prompt_id: int
    unconditional: bool
    count: int
    base: int


def plan(ws: Workspace) -> tuple[list[PromptPlan], int]:
    """The prompts to audit, by id, with their generation counts and row offsets; and the highest
    generation id included (generations added while the audit runs wait for the next one)."""
    with ws.connect() as con:
        last = con.execute("SELECT MAX(id) FROM generations").fetchone()[0] or 0
        rows = con.execute("SELECT g.prompt_id, p.text, COUNT(*) AS n FROM generations g JOIN prompts p ON p.id = g.prompt_id "
                           "WHERE g.id <= ? GROUP BY g.prompt_id ORDER BY g.prompt_id", (last,)).fetchall()
    out, base = [], 0
    for r in rows:
        out.append(PromptPlan(r["prompt_id"], not r["text"], r["n"], base))
        base += r["n"]
    return out, last


def generation_rows(ws: Workspace, prompt_id: int, last: int, chunk: int | None = None) -> Iterator[list[tuple[int, str]]]:
    """A prompt's (generation id, path) in the audit's order (seed, then id), ``chunk`` at a time (all at once by default)."""
    with ws.connect() as con:
        cur = con.execute("SELECT id, path FROM generations WHERE prompt_id = ? AND id <= ? ORDER BY seed, id", (prompt_id, last))
        while True:
            rows = cur.fetchmany(chunk) if chunk else cur.fetchall()
            if not rows:
                return
            yield [(r[0], r[1]) for r in rows]
            if not chunk:
                return


def chunk_size(size: int) -> int:
    """Generations of an unconditional model decoded and searched at once at working size ``size``."""
    return max(1, config.AUDIT_CHUNK_BYTES // (size * size * 3 * 4))


def _decode(ws: Workspace, paths: list[str], size: int, workers: int = 4) -> np.ndarray:
    """Decode images (PIL releases the GIL while decoding) into one (N, S, S, 3) uint8 array of their
    8-bit levels at the working size (``core.images.to_levels``; the pixel values are levels / 255)."""
    from .images import load_levels

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = load_levels(ws.resolve(paths[i]), size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(paths))))
    return out


def _lap(timings: dict[str, float] | None, stage: str, start: float) -> float:
    """Add the seconds since ``start`` to ``timings[stage]`` (when timings is a dict); return the clock now."""
    t = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + (t - start)
    return t


# ---------------------------------------------------------------------------- the units of work
class _Similarity:
    """The neighbours' similarity column: cosine of open_clip embeddings for the 'clip' embedder,
    1 - the normalised L2 of the pooled pixels for 'pixel'. Shown beside the exact distances;
    no verdict depends on it."""

    def __init__(self, ws: Workspace, name: str, settings: dict):
        self.index = None
        if name == "clip":
            from .embed import get_embedder
            from .index import TrainingIndex

            self.index = TrainingIndex.open(ws, name, embedder=get_embedder(name, settings))

    def __call__(self, images: np.ndarray, ids: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        if self.index is None:
            return (1.0 - pooled).astype(np.float32)
        queries = self.index.embedder.embed(images).astype(np.float64)
        rows = np.searchsorted(self.index.ids, ids)
        vectors = np.asarray(self.index.vectors[rows], dtype=np.float64)  # (Q, k, dim)
        return np.einsum("qd,qkd->qk", queries, vectors).astype(np.float32)


def _floats(images: np.ndarray) -> np.ndarray:
    """Working-size pixel values, float32 in [0, 1], of 8-bit levels (float input is returned as is)."""
    return images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8 else images


def _levels(images: np.ndarray, grids: list[int], device: str):
    """The 8-bit ``images`` laid out for exact integer distances at every grid of ``grids``
    (``core.distances.Levels``), or None where they are floats or the distances run on a GPU."""
    import math

    from .distances import Levels

    if images.dtype != np.uint8 or device != "cpu":
        return None
    return Levels(images, math.lcm(*grids))


def _tiled_to_training(images: np.ndarray, ids: np.ndarray, pyramid, grids: list[int],
                       device: str = "cpu") -> dict[int, np.ndarray]:
    """Exact tiled L2 (at every grid) between each generation and each of its nearest training images.

    Each distinct training image is decoded once and the pairs are indexed, so neither side is
    repeated in memory (500 generations x 50 neighbours at 512 x 512 would otherwise need 118 GB).
    """
    from .distances import paired_distances_grids

    n, k = ids.shape
    unique, inverse = np.unique(ids, return_inverse=True)
    train = pyramid.pixels(unique)
    _, tiled = paired_distances_grids(images, train, grids, ia=np.repeat(np.arange(n), k), ib=inverse.reshape(-1),
                                      device=device)
    return {g: t.cpu().numpy().astype(np.float32).reshape(n, k) for g, t in tiled.items()}


@dataclass
class Rows:
    """Per-generation results of consecutive generations: their nearest training images (the first
    ``keep`` of them) with exact l2, tiled l2 at every cached grid and similarity, the relative L2,
    and how certain the nearest is."""
    gen_ids: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n, keep) int64
    l2: np.ndarray  # (n, keep) float32
    sim: np.ndarray  # (n, keep) float32
    rel: np.ndarray  # (n,) float32
    certified: np.ndarray  # (n,) bool
    lower: np.ndarray  # (n,) float32
    exact: np.ndarray  # (n,) int32 exact distances computed
    tiled: dict[int, np.ndarray]  # grid -> (n, keep) float32


@dataclass
class PromptOutcome:
    """One text prompt audited: its rows, its clique groups at the run's tau and grid, and its
    tau curves, computed (``curves``: per cached grid, size/medoid/mean/exact) or left to the
    run's curve workers (``distances``: per cached grid, the matrix and the file it was saved to)."""
    rows: Rows
    groups: list
    curves: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None
    distances: dict[int, tuple[np.ndarray, Path]] = field(default_factory=dict)


class AuditContext:
    """What every unit of an audit reads: the parameters, the certified-search pyramid of the
    training set, the similarity column's embedder, the budgets and the device. Built once per
    process that audits (the run's own, or each worker of a cluster)."""

    def __init__(self, ws: Workspace, params: AuditParams, timings: dict[str, float] | None = None):
        from .nearest import TrainingPyramid

        self.ws, self.params, self.timings = ws, params, timings
        self.size = params.working_size
        self.grids = cached_grids(self.size, params)
        training = get_training(ws)
        if not training:
            raise InputError(f"{ws.root} has no training images; add them with `memaudit add-training {ws.root} DIR`")
        settings = ws.settings()
        self.budget = int(settings["clique_node_budget"])
        self.device = audit_device(settings["audit_device"])
        self.similarity = _Similarity(ws, params.embedder, settings)
        self.pyramid = TrainingPyramid.load(ws, self.size, {i: t.path for i, t in training.items()})
        # text prompts: the nearest is certified, `neighbours` shown; the relative-L2 denominator of
        # unconditional generations averages over the relative_n nearest, all certified
        self.k_show = min(len(training), params.neighbours)
        self.k_relative = min(len(training), params.relative_n)
        self.taus = run_taus(params)
        self.t_run = int(np.searchsorted(self.taus, params.edge_threshold))

    def neighbours(self, gen_ids: np.ndarray, images: np.ndarray, unconditional: bool, levels=None) -> Rows:
        """The per-generation half of the audit for decoded ``images`` (``_decode``'s 8-bit levels, or
        float32 pixel values); ``levels``: the same images as ``core.distances.Levels``, if made already.

        Where the training set is small (``TrainingPyramid.exhaustive``) every training image is
        measured by exact integer products, and the shown neighbours' tiled L2 come from the same
        products; otherwise the certified search, then the shown neighbours' tiled L2."""
        from .distances import relative_l2
        from .nearest import certified_nearest, exact_nearest

        clock = time.perf_counter()
        p = self.params
        k = self.k_relative if unconditional else 1
        show = max(self.k_show, self.k_relative) if unconditional else self.k_show
        exhaustive = self.pyramid.exhaustive(show, p.nearest_budget)
        if exhaustive and levels is None:
            levels = _levels(images, self.grids, self.device)
        if exhaustive and levels is not None:
            near = exact_nearest(levels, images, self.pyramid, k, show=show, grids=tuple(self.grids))
            clock = _lap(self.timings, "nearest", clock)
            sim = self.similarity(images, near.ids, near.pooled)
            tiled = near.tiled
        else:
            floats = _floats(images)
            near = certified_nearest(floats, self.pyramid, k, show=show, budget=p.nearest_budget, device=self.device)
            clock = _lap(self.timings, "nearest", clock)
            sim = self.similarity(images, near.ids, near.pooled)
            tiled = _tiled_to_training(floats, near.ids, self.pyramid, self.grids, self.device)
        n_rel = min(p.relative_n, near.l2.shape[1])
        rel = relative_l2(near.l2[:, 0], near.l2[:, :n_rel], p.relative_alpha).numpy() if len(images) else np.zeros(0, np.float32)
        k = self.k_show
        rows = Rows(np.asarray(gen_ids, np.int64), near.ids[:, :k], near.l2[:, :k], sim[:, :k], rel, near.certified,
                    near.lower, near.exact_count, {g: t[:, :k] for g, t in tiled.items()})
        _lap(self.timings, "exact_neighbours", clock)
        return rows

    def audit_prompt(self, prompt_id: int, generations: list[tuple[int, str]], cache: Path,
                     inline_curves: bool = True) -> PromptOutcome:
        """Audit one text prompt: decode, pairwise distances (saved to ``cache``), neighbours, clique
        groups, and (``inline_curves``) the tau curves."""
        from .cliques import clique_groups
        from .curves import tau_curve
        from .distances import level_pairwise_grids, pairwise_tiled_l2_grids

        p = self.params
        clock = time.perf_counter()
        images = _decode(self.ws, [path for _, path in generations], self.size)
        levels = _levels(images, self.grids, self.device)
        _lap(self.timings, "decode", clock)
        clock = time.perf_counter()
        if levels is not None:  # exact integer distances (first: their products give the norms neighbours reuse)
            by_grid = {g: d.numpy() for g, d in level_pairwise_grids(levels, self.grids).items()}
        else:
            by_grid = {g: d.cpu().numpy().astype(np.float32)
                       for g, d in pairwise_tiled_l2_grids(_floats(images), grids=self.grids, device=self.device).items()}
        _lap(self.timings, "distances", clock)
        rows = self.neighbours(np.array([i for i, _ in generations], np.int64), images, False, levels)
        del images, levels
        clock = time.perf_counter()
        saved = {}
        for g, d in by_grid.items():
            np.fill_diagonal(d, 0.0)
            path = cache / distance_file(prompt_id, g, p.grid)
            path.parent.mkdir(exist_ok=True)
            np.save(path, d)
            saved[g] = (d, path)
        dist = by_grid[p.grid]
        clock = _lap(self.timings, "save_cache", clock)
        # the largest clique is always kept (even of size 1: every prompt gets a candidate, so
        # Figure 5 can attribute it); further groups only down to group_min_size
        groups = clique_groups(dist, p.edge_threshold, 1, p.max_groups, budget=self.budget, on_budget="mark")
        groups = groups[:1] + [g for g in groups[1:] if g.size >= p.group_min_size]
        clock = _lap(self.timings, "cliques", clock)
        if not inline_curves:
            return PromptOutcome(rows, groups, distances=saved)
        curves = [tau_curve(by_grid[g], self.budget, self.taus) for g in self.grids]
        _lap(self.timings, "curve", clock)
        return PromptOutcome(rows, groups, curves=curves)

    def audit_chunk(self, generations: list[tuple[int, str]]) -> Rows:
        """Audit a chunk of an unconditional model's generations (each judged on its own by relative L2)."""
        clock = time.perf_counter()
        images = _decode(self.ws, [path for _, path in generations], self.size)
        _lap(self.timings, "decode", clock)
        return self.neighbours(np.array([i for i, _ in generations], np.int64), images, True)


class RunArrays:
    """The run's per-generation cache arrays (gen_ids.npy, nn_*.npy in WS/cache/run-<id>/), written
    in place as units finish (memory-mapped .npy files), so no run holds them all in memory."""

    # Rows field -> (file, dtype, one value per shown neighbour rather than one per generation)
    COLUMNS = {"gen_ids": ("gen_ids.npy", np.int64, False), "ids": ("nn_ids.npy", np.int64, True),
               "l2": ("nn_l2.npy", np.float32, True), "sim": ("nn_sim.npy", np.float32, True),
               "rel": ("nn_rel.npy", np.float32, False), "certified": ("nn_certified.npy", bool, False),
               "lower": ("nn_lower.npy", np.float32, False), "exact": ("nn_exact.npy", np.int32, False)}

    def __init__(self, cache: Path, n: int, keep: int, grids: list[int], run_grid: int):
        def make(name: str, shape: tuple, dtype) -> np.ndarray:
            if n == 0:  # (an empty file cannot be memory-mapped)
                np.save(cache / name, np.zeros(shape, dtype))
                return np.zeros(shape, dtype)
            return np.lib.format.open_memmap(cache / name, mode="w+", dtype=dtype, shape=shape)

        for key, (name, dtype, wide) in self.COLUMNS.items():
            setattr(self, key, make(name, (n, keep) if wide else (n,), dtype))
        self.tiled = {g: make(tiled_file(g, run_grid), (n, keep), np.float32) for g in grids}

    def put(self, base: int, rows: Rows) -> None:
        end = base + len(rows.gen_ids)
        for key in self.COLUMNS:
            getattr(self, key)[base:end] = getattr(rows, key)
        for g, a in self.tiled.items():
            a[base:end] = rows.tiled[g]

    def flush(self) -> None:
        for a in [*(getattr(self, key) for key in self.COLUMNS), *self.tiled.values()]:
            if isinstance(a, np.memmap):
                a.flush()


# ---------------------------------------------------------------------------- the run
def run_audit(ws: Workspace, params: AuditParams | None = None, progress: Progress | None = None,
              timings: dict[str, float] | None = None, ray_address: str | None = None, ray_workers: int = 0) -> int:
    """Audit every prompt of the workspace; return the new run's id.

    ``progress(stage, done, total)`` counts generations. ``timings``, when given, is filled with
    the wall-clock seconds spent in each stage, summed over prompts: setup, decode, nearest,
    exact_neighbours, distances, save_cache, cliques, curve, store. ``ray_address`` (see
    ``core.cluster``) runs the units of work on a Ray cluster, ``ray_workers`` of them at once
    (0: one per CPU or GPU of the cluster); this process alone writes the run, and the result is
    the local run's.
    """
    from .distances import check_grid

    clock = time.perf_counter()
    runner = None
    if ray_address:
        from .audit_ray import RayRunner

        runner = RayRunner(ws, ray_address, ray_workers)  # connects first: a bad address costs nothing
    params = params or params_from(ws)
    size = _working_size(ws, params.working_size)
    check_grid(size, params.grid)
    params = AuditParams(**{**params.to_dict(), "working_size": size})
    ctx = AuditContext(ws, params, timings)
    prompts, last = plan(ws)
    total = sum(p.count for p in prompts)

    clock = _lap(timings, "setup", clock)
    remove_abandoned_runs(ws)
    with ws.transaction() as con:
        run_id = con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES (?, 'running', ?)",
                             (now(), json.dumps(params.to_dict()))).lastrowid
        cache = cache_dir(ws, run_id)
        cache.mkdir(parents=True, exist_ok=True)
        owner = own_run(cache)  # before the commit: no other process ever sees this run without its owner

    sizes = sorted(p.count for p in prompts if not p.unconditional)
    workers = 0 if runner else curve_workers(ws.get_setting("audit_workers"), len(sizes) * len(ctx.grids),
                                             sizes[len(sizes) // 2] if sizes else 0)
    curves = Curves((len(ctx.grids), len(prompts), len(ctx.taus)), workers, ctx.budget, ctx.taus)
    try:
        arrays = RunArrays(cache, total, ctx.k_show, ctx.grids, params.grid)
        groups: dict[int, list] = {}
        done = 0

        def take(unit: Unit, result: Rows | PromptOutcome) -> None:
            nonlocal done
            if isinstance(result, PromptOutcome):
                arrays.put(unit.base, result.rows)
                groups[unit.plan.prompt_id] = result.groups
                clock = time.perf_counter()
                add_curves(curves, ctx, unit.p_index, unit.base, result)
                _lap(timings, "curve", clock)
            else:
                arrays.put(unit.base, result)
            done += len(unit.generations)
            if progress:
                progress("audit", done, total)

        if progress:
            progress("audit", 0, total)
        units = work_units(ws, prompts, last, size)
        if runner is None:
            for unit in units:
                take(unit, ctx.audit_chunk(unit.generations) if unit.plan.unconditional
                     else ctx.audit_prompt(unit.plan.prompt_id, unit.generations, cache, inline_curves=workers == 0))
        else:
            runner.run(params, units, cache, take)

        clock = time.perf_counter()
        curves.finish()
        clock = _lap(timings, "curve", clock)
        arrays.flush()
        np.savez(cache / "curves.npz", taus=ctx.taus, prompt_ids=np.asarray([p.prompt_id for p in prompts], np.int64),
                 grids=np.asarray(ctx.grids, np.int64), size=curves.size, medoid=curves.medoid, mean=curves.mean,
                 exact=curves.exact)
        clock = _lap(timings, "save_cache", clock)
        store_results(ws, run_id, params, prompts, groups, arrays)
        _lap(timings, "store", clock)
    except BaseException:
        curves.close()
        with ws.transaction() as con:
            con.execute("DELETE FROM audit_runs WHERE id = ?", (run_id,))
        shutil.rmtree(cache, ignore_errors=True)
        raise
    finally:
        if owner is not None:
            owner.close()
        if runner is not None:
            runner.close()
    return run_id


@dataclass(frozen=True)
class Unit:
    """One unit of an audit's work: a text prompt's generations, or a chunk of an unconditional model's,
    which are rows ``base ..`` of the run's arrays."""
    p_index: int
    plan: PromptPlan
    base: int
    generations: list[tuple[int, str]]


def work_units(ws: Workspace, prompts: list[PromptPlan], last: int, size: int) -> Iterator[Unit]:
    """The run's units in order, read from the database as they are needed."""
    for p_index, pp in enumerate(prompts):
        if pp.unconditional:
            at = pp.base
            for chunk in generation_rows(ws, pp.prompt_id, last, chunk_size(size)):
                if at + len(chunk) > pp.base + pp.count:
                    _check_count(pp, at + len(chunk) - pp.base)
                yield Unit(p_index, pp, at, chunk)
                at += len(chunk)
            _check_count(pp, at - pp.base)
        else:
            gens = next(generation_rows(ws, pp.prompt_id, last), [])
            _check_count(pp, len(gens))
            yield Unit(p_index, pp, pp.base, gens)


def _check_count(pp: PromptPlan, seen: int) -> None:
    if seen != pp.count:  # generations are only ever added, and those after the plan's last id are left out
        raise MemauditError(f"prompt {pp.prompt_id} had {pp.count} generations when the audit began and {seen} now; "
                            "were generations deleted meanwhile? audit again")


def add_curves(curves: Curves, ctx: AuditContext, p_index: int, base: int, outcome: PromptOutcome) -> None:
    """Enter a prompt's tau curves (computed, or handed to the curve workers), then pin the run's
    own largest clique at its own tau and grid, so that a recount at the run's thresholds gives
    the run's counts exactly."""
    for gi, g in enumerate(ctx.grids):
        if outcome.curves is not None:
            curves.put(gi, p_index, base, *outcome.curves[gi])
        else:
            curves.add(gi, p_index, base, *outcome.distances[g])
    curves.pin(ctx.grids.index(ctx.params.grid), p_index, ctx.t_run, base, outcome.groups[0])


# ---------------------------------------------------------------------------- storing
def _rank_score(flagged: bool, size: int, mean_distance: float) -> float:
    if flagged:
        return min(float(mean_distance), config.RANK_FLAGGED_BELOW)
    return 1.0 + config.RANK_SIZE_WEIGHT / size + config.RANK_DISTANCE_WEIGHT * min(float(mean_distance), 1.0)


def store_results(ws: Workspace, run_id: int, params: AuditParams, prompts: list[PromptPlan], groups: dict[int, list],
                  arrays: RunArrays) -> None:
    """Store the run's prompt results, candidates, members and neighbours (one transaction) from the
    text prompts' clique groups and the run's per-generation arrays; mark the run done."""
    neighbours = arrays.ids.shape[1] if arrays.ids.ndim == 2 else 0
    with ws.transaction() as con:
        for pp in prompts:
            pid, base = pp.prompt_id, pp.base
            if pp.unconditional:
                rel = np.asarray(arrays.rel[base:base + pp.count])
                order = np.argsort(rel, kind="stable")
                extracted_n = int((rel < 1.0).sum())
                chosen = order[:max(extracted_n, config.UNCONDITIONAL_CANDIDATES)]
                entries = [((int(i),), int(i), 0.0, True) for i in chosen]
                largest, best_mean, clique_exact = 1, None, True
            else:
                gs = groups[pid]
                entries = [(g.members, g.medoid, g.mean_distance, g.exact) for g in gs]
                largest = gs[0].size if gs else 1
                best_mean = gs[0].mean_distance if gs else None
                clique_exact = not gs or gs[0].exact
            flagged_prompt = (not pp.unconditional) and largest >= params.min_clique
            con.execute("INSERT INTO prompt_results(run_id, prompt_id, generations, largest_clique, flagged, mean_distance, clique_exact) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, pid, pp.count, largest, int(flagged_prompt), best_mean, int(clique_exact)))
            for rank, (members, med, mean_d, exact) in enumerate(entries):
                row = base + med
                r = float(arrays.rel[row])
                l2, ids = np.asarray(arrays.l2[row]), np.asarray(arrays.ids[row])
                tiled, sim = np.asarray(arrays.tiled[params.grid][row]), np.asarray(arrays.sim[row])
                if pp.unconditional:
                    flagged = extracted = r < 1.0
                    score = (0.0 if extracted else 1.0) + min(r / (1.0 + r), config.RANK_FLAGGED_BELOW)
                else:
                    flagged = len(members) >= params.min_clique
                    # the attack reports an extraction only for flagged cliques (PAPER.md step 5)
                    extracted = flagged and bool(l2[0] <= params.delta)
                    score = _rank_score(flagged, len(members), mean_d)
                cid = con.execute(
                    "INSERT INTO candidates(run_id, prompt_id, group_rank, clique_size, mean_distance, flagged, "
                    "medoid_generation_id, nearest_training_id, l2, tiled_l2, relative_l2, extracted, score, "
                    "clique_exact, nearest_certified, nearest_lower, exact_distances) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, pid, rank, len(members), float(mean_d), int(flagged), int(arrays.gen_ids[row]), int(ids[0]),
                     float(l2[0]), float(tiled[0]), r if pp.unconditional else None, int(extracted), score,
                     int(exact), int(arrays.certified[row]), float(arrays.lower[row]), int(arrays.exact[row]))).lastrowid
                con.executemany("INSERT INTO candidate_members(candidate_id, generation_id) VALUES (?, ?)",
                                [(cid, int(arrays.gen_ids[base + m])) for m in members])
                con.executemany(
                    "INSERT INTO neighbours(candidate_id, rank, training_id, l2, tiled_l2, similarity, relative_l2) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cid, j, int(ids[j]), float(l2[j]), float(tiled[j]), float(sim[j]),
                      r if (pp.unconditional and j == 0) else None) for j in range(neighbours)])
        con.execute("UPDATE audit_runs SET status = 'done', finished_at = ? WHERE id = ?", (now(), run_id))
