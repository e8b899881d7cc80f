"""The audit: the paper's filter stage as one readable loop.

For every prompt of the workspace::

    decode its generations at the working resolution
    D = pairwise tiled L2 between them                       (cached)
    groups = clique groups of the graph D <= tau            (largest first)
    for every generation: its nearest training image in the whole training set, certified
        (core.nearest: pooled-pixel lower bounds, exact distances until no
        unmeasured image can be nearer), and exact tiled L2 to the shown neighbours (cached)
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

Generations without a prompt (unconditional models) are judged one by one by
relative L2 (PAPER.md): rel = l2(x_hat, x) / (alpha * mean over the n nearest
training images y of l2(x_hat, y)); extracted when rel < 1.

Results are stored as an audit run with its parameters, so runs with different
thresholds can be compared. The per-run cache lives in WS/cache/run-<id>/.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import config
from .errors import InputError, MemauditError
from .records import AuditParams, Candidate, Generation, TrainingImage
from .store import Workspace, now

# The tau grid on which the largest clique is precomputed for live re-thresholding (each run
# adds its own tau, see ``run_taus``); edge_threshold cannot exceed its last value.
TAU_GRID = np.round(np.arange(0.0, config.TAU_MAX + 1e-9, config.TAU_STEP), 4)
UNCONDITIONAL_CANDIDATES = 100  # candidates stored per unconditional prompt beyond those extracted

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RunInfo:
    id: int
    created_at: str
    finished_at: str | None
    status: str
    params: AuditParams


@dataclass(frozen=True)
class PromptRow:
    prompt_id: int
    prompt: str | None
    generations: int
    largest_clique: int
    flagged: bool
    extracted: bool
    mean_distance: float | None
    best_l2: float | None  # the largest clique medoid's nearest training l2
    clique_exact: bool = True  # False: the largest clique's size is a lower bound (search budget)
    nearest_certified: bool = True  # False: best_l2 is the best found, not certainly the nearest


@dataclass(frozen=True)
class Recount:
    tau: float
    k: int
    delta: float
    grid: int
    flagged: int
    extracted: int
    prompts: list[PromptRow]
    clique_bounds: int = 0  # prompts whose largest clique at this tau is a lower bound
    uncertain: int = 0  # flagged prompts whose verdict an uncertified nearest neighbour could change


@dataclass(frozen=True)
class NeighbourView:
    training: TrainingImage
    rank: int
    l2: float
    tiled_l2: float
    similarity: float
    relative_l2: float | None = None


@dataclass(frozen=True)
class GroupView:
    members: list[Generation]
    medoid: Generation
    mean_distance: float
    neighbours: list[NeighbourView] = field(default_factory=list)
    exact: bool = True  # False: the clique search hit its budget; a larger clique may exist
    nearest_certified: bool = True  # the medoid's first neighbour is certainly its nearest training image
    nearest_lower: float = 0.0  # a lower bound of the medoid's true nearest distance

    @property
    def size(self) -> int:
        return len(self.members)


# ---------------------------------------------------------------------------- parameters
def params_from(ws: Workspace, **overrides: object) -> AuditParams:
    """The workspace's settings with ``overrides`` (None values ignored) applied and checked."""
    s = ws.settings()
    for name, value in overrides.items():
        if value is not None:
            s[name] = config.check(name, value)
    fields = AuditParams.__dataclass_fields__
    return AuditParams(**{name: s[name] for name in fields})


def run_taus(params: AuditParams) -> np.ndarray:
    """The taus a run's curves cover: TAU_GRID and the run's own edge threshold."""
    return np.unique(np.append(TAU_GRID, np.float64(params.edge_threshold)))


def cached_grids(size: int, params: AuditParams) -> list[int]:
    """The tile grids an audit at working size ``size`` caches: G and the grid_choices dividing ``size``."""
    return sorted({params.grid} | {g for g in config.grid_list(params.grid_choices) if size % g == 0})


CURVE_TASKS_PER_WORKER = 4  # fewer tau curves than this per worker process are computed inline
CURVE_MIN_GENERATIONS = 100  # automatic workers only for prompts this large (smaller curves take milliseconds)


def curve_workers(setting: int, tasks: int, generations: int) -> int:
    """Worker processes for ``tasks`` tau curves of prompts of about ``generations`` each.

    ``setting`` is the ``audit_workers`` setting: -1 (automatic) uses one per CPU core, at most 8,
    when the prompts are large enough to pay for starting them; N > 0 uses N; 0 computes inline.
    Never more workers than the tasks keep busy.
    """
    import os

    n = int(setting)
    if n < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(8, cores) if cores > 1 and generations >= CURVE_MIN_GENERATIONS else 0
    return max(0, min(n, tasks // CURVE_TASKS_PER_WORKER))


def _working_size(ws: Workspace, requested: int) -> int:
    if requested:
        return requested
    with ws.connect() as con:
        rows = con.execute("SELECT MIN(width, height) AS s, COUNT(*) AS n FROM generations GROUP BY s ORDER BY n DESC, s DESC").fetchall()
    if not rows:
        raise InputError(f"{ws.root} has no generations to audit; run `memaudit generate` or `memaudit import-generations` first")
    return int(rows[0]["s"])


# ---------------------------------------------------------------------------- loading
def _generation(row) -> Generation:
    return Generation(id=row["id"], path=row["path"], prompt_id=row["prompt_id"], prompt=row["text"] or None,
                      seed=row["seed"], model_id=row["model_id"], width=row["width"], height=row["height"],
                      steps=row["steps"], guidance=row["guidance"], scheduler=row["scheduler"], source=row["source"])


def _training(row) -> TrainingImage:
    return TrainingImage(id=row["id"], path=row["path"], source_path=row["source_path"], caption=row["caption"],
                         sha256=row["sha256"], width=row["width"], height=row["height"],
                         duplicate_count=row["duplicate_count"], duplicate_group=row["duplicate_group"])


_GEN_SQL = "SELECT g.*, p.text FROM generations g JOIN prompts p ON p.id = g.prompt_id"


def generations_by_prompt(ws: Workspace) -> dict[int, list[Generation]]:
    out: dict[int, list[Generation]] = {}
    with ws.connect() as con:
        for row in con.execute(_GEN_SQL + " ORDER BY g.prompt_id, g.seed, g.id"):
            out.setdefault(row["prompt_id"], []).append(_generation(row))
    return out


def get_generations(ws: Workspace, ids: list[int]) -> dict[int, Generation]:
    with ws.connect() as con:
        rows = con.execute(_GEN_SQL + f" WHERE g.id IN ({','.join('?' * len(ids))})", ids).fetchall() if ids else []
    return {r["id"]: _generation(r) for r in rows}


def get_training(ws: Workspace, ids: list[int] | None = None) -> dict[int, TrainingImage]:
    with ws.connect() as con:
        if ids is None:
            rows = con.execute("SELECT * FROM training_images ORDER BY id").fetchall()
        else:
            rows = con.execute(f"SELECT * FROM training_images WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall() if ids else []
    return {r["id"]: _training(r) for r in rows}


def _decode(ws: Workspace, paths: list[str], size: int, workers: int = 4) -> np.ndarray:
    """Decode images (PIL releases the GIL while decoding) into one (N, S, S, 3) float32 array."""
    from .images import load_working

    out = np.empty((len(paths), size, size, 3), dtype=np.float32)

    def one(i: int) -> None:
        out[i] = load_working(ws.resolve(paths[i]), size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(paths))))
    return out


# ---------------------------------------------------------------------------- the run
def _lap(timings: dict[str, float] | None, stage: str, start: float) -> float:
    """Add the seconds since ``start`` to ``timings[stage]`` (when timings is a dict); return the clock now."""
    t = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + (t - start)
    return t


def run_audit(ws: Workspace, params: AuditParams | None = None, progress: Progress | None = None,
              timings: dict[str, float] | None = None) -> int:
    """Audit every prompt of the workspace; return the new run's id.

    ``timings``, when given, is filled with the wall-clock seconds spent in each stage, summed
    over prompts: setup, decode, retrieve, exact_neighbours, distances, cliques, curve, save_cache, store.
    """
    clock = time.perf_counter()
    from .cliques import clique_groups
    from .distances import check_grid, pairwise_tiled_l2_grids
    from .nearest import TrainingPyramid, certified_nearest

    params = params or params_from(ws)
    size = _working_size(ws, params.working_size)
    check_grid(size, params.grid)
    params = AuditParams(**{**params.to_dict(), "working_size": size})
    grids = cached_grids(size, params)
    by_prompt = generations_by_prompt(ws)
    training = get_training(ws)
    if not training:
        raise InputError(f"{ws.root} has no training images; add them with `memaudit add-training {ws.root} DIR`")

    settings = ws.settings()
    budget = int(settings["clique_node_budget"])
    similarity = _Similarity(ws, params.embedder, settings)
    pyramid = TrainingPyramid.load(ws, size, {i: t.path for i, t in training.items()})
    # text prompts: the nearest is certified, `neighbours` shown; the relative-L2 denominator of
    # unconditional generations averages over the relative_n nearest, all certified
    k_show = min(len(training), params.neighbours)
    k_relative = min(len(training), params.relative_n)
    taus = run_taus(params)
    t_run = int(np.searchsorted(taus, params.edge_threshold))

    clock = _lap(timings, "setup", clock)
    remove_abandoned_runs(ws)
    with ws.transaction() as con:
        run_id = con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES (?, 'running', ?)",
                             (now(), json.dumps(params.to_dict()))).lastrowid
        cache = ws.root / "cache" / f"run-{run_id}"
        cache.mkdir(parents=True, exist_ok=True)
        owner = _own_run(cache)  # before the commit: no other process ever sees this run without its owner

    prompt_ids = sorted(by_prompt)
    sizes = sorted(len(by_prompt[pid]) for pid in prompt_ids if by_prompt[pid][0].prompt is not None)
    workers = curve_workers(settings["audit_workers"], len(sizes) * len(grids), sizes[len(sizes) // 2] if sizes else 0)
    curves = _Curves((len(grids), len(prompt_ids), len(taus)), workers, budget, taus)
    try:
        all_gen_ids: list[int] = []
        nn_ids, nn_l2, nn_sim, nn_rel, nn_cert, nn_lower, nn_exact = [], [], [], [], [], [], []
        nn_tiled: dict[int, list[np.ndarray]] = {g: [] for g in grids}
        results = []

        for p_index, pid in enumerate(prompt_ids):
            gens = by_prompt[pid]
            if progress:
                progress("audit", p_index, len(prompt_ids))
            clock = time.perf_counter()
            images = _decode(ws, [g.path for g in gens], size)
            clock = _lap(timings, "decode", clock)
            base = len(all_gen_ids)
            all_gen_ids.extend(g.id for g in gens)

            # nearest training images of every generation, certified over the whole training set
            unconditional = gens[0].prompt is None
            near = certified_nearest(images, pyramid, k_relative if unconditional else 1,
                                     show=max(k_show, k_relative) if unconditional else k_show,
                                     budget=params.nearest_budget)
            ids, l2 = near.ids, near.l2
            clock = _lap(timings, "nearest", clock)
            sim = similarity(images, ids, near.pooled)
            tiled_by_grid = _tiled_to_training(images, ids, pyramid, grids)
            tiled = tiled_by_grid[params.grid]
            n_rel = min(params.relative_n, l2.shape[1])
            rel = l2[:, 0] / np.maximum(params.relative_alpha * l2[:, :n_rel].mean(axis=1), 1e-12)
            keep = min(params.neighbours, l2.shape[1])
            nn_ids.append(ids[:, :keep]); nn_l2.append(l2[:, :keep]); nn_sim.append(sim[:, :keep]); nn_rel.append(rel)
            nn_cert.append(near.certified); nn_lower.append(near.lower); nn_exact.append(near.exact_count)
            for g in grids:
                nn_tiled[g].append(tiled_by_grid[g][:, :keep])
            clock = _lap(timings, "exact_neighbours", clock)

            if gens[0].prompt is None:
                groups = []  # unconditional: judged per generation by relative L2 below
            else:
                by_grid = {g: d.cpu().numpy().astype(np.float32) for g, d in pairwise_tiled_l2_grids(images, grids=grids).items()}
                clock = _lap(timings, "distances", clock)
                for g, d in by_grid.items():
                    np.fill_diagonal(d, 0.0)
                    np.save(cache / _distance_file(pid, g, params.grid), d)
                dist = by_grid[params.grid]
                clock = _lap(timings, "save_cache", clock)
                # the largest clique is always kept (even of size 1: every prompt gets a candidate, so
                # Figure 5 can attribute it); further groups only down to group_min_size
                groups = clique_groups(dist, params.edge_threshold, 1, params.max_groups, budget=budget, on_budget="mark")
                groups = groups[:1] + [g for g in groups[1:] if g.size >= params.group_min_size]
                clock = _lap(timings, "cliques", clock)
                for gi, g in enumerate(grids):
                    curves.add(gi, p_index, base, by_grid[g], cache / _distance_file(pid, g, params.grid))
                # at the run's own tau and grid the curve holds the run's own largest clique, so that a
                # recount at the run's thresholds gives the run's counts exactly
                curves.pin(grids.index(params.grid), p_index, t_run, base, groups[0])
                clock = _lap(timings, "curve", clock)
            results.append((pid, gens, groups, base, l2, tiled, rel, ids, sim, near))

        clock = time.perf_counter()
        curves.finish()
        clock = _lap(timings, "curve", clock)
        gen_ids = np.asarray(all_gen_ids, dtype=np.int64)
        empty_f = np.zeros((0, params.neighbours), np.float32)
        np.save(cache / "gen_ids.npy", gen_ids)
        np.save(cache / "nn_ids.npy", np.concatenate(nn_ids) if nn_ids else np.zeros((0, params.neighbours), np.int64))
        np.save(cache / "nn_l2.npy", np.concatenate(nn_l2) if nn_l2 else empty_f)
        for g in grids:
            np.save(cache / _tiled_file(g, params.grid), np.concatenate(nn_tiled[g]) if nn_tiled[g] else empty_f)
        np.save(cache / "nn_sim.npy", np.concatenate(nn_sim) if nn_sim else empty_f)
        np.save(cache / "nn_rel.npy", np.concatenate(nn_rel) if nn_rel else np.zeros(0, np.float32))
        np.save(cache / "nn_certified.npy", np.concatenate(nn_cert) if nn_cert else np.zeros(0, bool))
        np.save(cache / "nn_lower.npy", np.concatenate(nn_lower) if nn_lower else np.zeros(0, np.float32))
        np.save(cache / "nn_exact.npy", np.concatenate(nn_exact) if nn_exact else np.zeros(0, np.int32))
        np.savez(cache / "curves.npz", taus=taus, prompt_ids=np.asarray(prompt_ids, np.int64), grids=np.asarray(grids, np.int64),
                 size=curves.size, medoid=curves.medoid, mean=curves.mean, exact=curves.exact)
        clock = _lap(timings, "save_cache", clock)

        _store_results(ws, run_id, params, results)
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
    if progress:
        progress("audit", len(prompt_ids), len(prompt_ids))
    return run_id


RUN_LOCK = ".lock"


def _distance_file(prompt_id: int, grid: int, run_grid: int) -> str:
    """A prompt's cached distance matrix: prompt-<id>.npy at the run's grid, prompt-<id>-g<G>.npy at others."""
    return f"prompt-{prompt_id}.npy" if grid == run_grid else f"prompt-{prompt_id}-g{grid}.npy"


def _tiled_file(grid: int, run_grid: int) -> str:
    return "nn_tiled.npy" if grid == run_grid else f"nn_tiled-g{grid}.npy"


def _own_run(cache: Path):
    """Hold an exclusive lock on the run's cache/run-<id>/.lock until closed; the OS releases it when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: abandoned runs are then left in place (they are never listed)
        return None
    f = open(cache / RUN_LOCK, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def remove_abandoned_runs(ws: Workspace) -> list[int]:
    """Delete the audit runs a killed process left 'running', with their cache folders; return their ids.

    A running audit holds an exclusive lock (flock) on WS/cache/run-<id>/.lock, released by the
    operating system when its process ends, however it ends; a 'running' run whose lock can be
    taken has no process left to finish it.
    """
    try:
        import fcntl
    except ImportError:
        return []
    with ws.connect() as con:
        running = [r[0] for r in con.execute("SELECT id FROM audit_runs WHERE status = 'running'")]
    removed = []
    for run_id in running:
        cache = ws.root / "cache" / f"run-{run_id}"
        try:
            lock = open(cache / RUN_LOCK, "a")
        except FileNotFoundError:  # its cache folder is gone: no process can be holding its lock
            lock = None
        try:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # still being audited
            with ws.transaction() as con:
                gone = con.execute("DELETE FROM audit_runs WHERE id = ? AND status = 'running'", (run_id,)).rowcount
            if gone:  # (a run that finished meanwhile keeps its cache)
                shutil.rmtree(cache, ignore_errors=True)
                removed.append(run_id)
        finally:
            if lock is not None:
                lock.close()
    return removed


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
        vectors = np.asarray(self.index.vectors, dtype=np.float64)[rows]  # (Q, k, dim)
        return np.einsum("qd,qkd->qk", queries, vectors).astype(np.float32)


def _tiled_to_training(images: np.ndarray, ids: np.ndarray, pyramid, grids: list[int]) -> dict[int, np.ndarray]:
    """Exact tiled L2 (at every grid) between each generation and each of its nearest training images.

    Each distinct training image is decoded once and the pairs are indexed, so neither side is
    repeated in memory (500 generations x 50 neighbours at 512 x 512 would otherwise need 118 GB).
    """
    from .distances import paired_distances_grids

    n, k = ids.shape
    unique, inverse = np.unique(ids, return_inverse=True)
    train = pyramid.pixels(unique)
    _, tiled = paired_distances_grids(images, train, grids, ia=np.repeat(np.arange(n), k), ib=inverse.reshape(-1))
    return {g: np.asarray(t, dtype=np.float32).reshape(n, k) for g, t in tiled.items()}


def tau_curve(dist: np.ndarray, budget: int | None = None, taus: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Largest clique size, its medoid (row of ``dist``), mean distance and exactness at every tau
    of ``taus`` (default TAU_GRID).

    The size is a non-decreasing step function of tau (``clique_curve`` solves each distinct
    graph once, each with its own ``budget``). Within a run of taus of equal size, the maximum
    clique found at the run's first tau stays a clique (raising tau only adds edges) and stays
    maximum, so it is solved once per run and its medoid and mean distance are kept for the whole
    run. ``exact`` is False where a budget stopped a search: the size there is a lower bound.
    """
    from .cliques import clique_curve, clique_groups

    taus = TAU_GRID if taus is None else np.asarray(taus, dtype=np.float64)
    n = len(taus)
    size, medoid, mean = np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.float32)
    sizes, exact = clique_curve(dist, taus, budget=budget, on_budget="mark")
    answer = (1, 0, 0.0, True)
    for t, tau in enumerate(taus):
        if t == 0 or sizes[t] != sizes[t - 1] or not exact[t]:
            g = clique_groups(dist, float(tau), 1, 1, budget=budget, on_budget="mark")[0]
            answer = (max(g.size, int(sizes[t])), g.medoid, g.mean_distance, bool(exact[t]) and g.exact)
        size[t], medoid[t], mean[t] = answer[:3]
        exact[t] = answer[3]
    return size, medoid, mean, exact


class _Curves:
    """The tau curves of every (grid, prompt): computed inline, or by worker processes
    (``core.curve_worker``) beside the audit's main loop, which meanwhile decodes and measures
    the next prompts (pure-Python clique search holds the GIL, so threads would not help).

    Workers read the distance matrix the audit has just saved to the cache; at most two tasks
    per worker are in flight, so memory stays bounded however many prompts. Answers are
    collected in the order the tasks were given, so the result does not depend on timing.
    """

    def __init__(self, shape: tuple[int, int, int], workers: int, budget: int, taus: np.ndarray):
        self.size = np.zeros(shape, dtype=np.int32)
        self.medoid = np.full(shape, -1, dtype=np.int64)
        self.mean = np.zeros(shape, dtype=np.float32)
        self.exact = np.ones(shape, dtype=bool)
        self.budget, self.workers, self.taus = budget, workers, np.asarray(taus, dtype=np.float64)
        self.procs: list = []
        self.pending: list[tuple[int, tuple[int, int, int]]] = []  # (worker, (grid index, prompt index, base)), oldest first
        self.pins: list[tuple[int, int, int, int, object]] = []
        self.next = 0

    def pin(self, gi: int, p: int, t: int, base: int, group) -> None:
        """Put ``group`` (a CliqueGroup of the prompt at row ``base``) at (grid gi, prompt p, tau t), after the curve."""
        self.pins.append((gi, p, t, base, group))

    def _start(self) -> None:
        import os
        import subprocess
        import sys

        root = str(Path(__file__).resolve().parent.parent)  # so that `core` imports however memaudit was installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "core.curve_worker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env) for _ in range(self.workers)]

    def add(self, gi: int, p: int, base: int, dist: np.ndarray, path: Path) -> None:
        if self.workers == 0:
            self._fill(gi, p, base, *tau_curve(dist, self.budget, self.taus))
            return
        if not self.procs:
            self._start()
        w = self.next
        self.next = (self.next + 1) % self.workers
        try:
            self.procs[w].stdin.write(json.dumps({"dist": str(path), "budget": self.budget, "taus": self.taus.tolist()}) + "\n")
            self.procs[w].stdin.flush()
        except BrokenPipeError:
            self._died(w)
        self.pending.append((w, (gi, p, base)))
        while len(self.pending) > 2 * self.workers:
            self._collect()

    def finish(self) -> None:
        while self.pending:
            self._collect()
        self.close()
        for gi, p, t, base, g in self.pins:
            self.size[gi, p, t], self.medoid[gi, p, t], self.mean[gi, p, t] = g.size, base + g.medoid, g.mean_distance
            self.exact[gi, p, t] = g.exact

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.procs = []

    def _died(self, w: int) -> None:
        code = self.procs[w].poll()
        raise MemauditError(f"a tau-curve worker process ended unexpectedly (exit code {code}); "
                            "set audit_workers to 0 to compute the curves in the audit's own process")

    def _collect(self) -> None:
        w, (gi, p, base) = self.pending.pop(0)
        line = self.procs[w].stdout.readline()
        if not line:
            self._died(w)
        answer = json.loads(line)
        if "error" in answer:  # a bug in the worker: raised here with the worker's own traceback
            raise RuntimeError(f"computing a tau curve failed in a worker process:\n{answer.get('traceback', answer['error'])}")
        self._fill(gi, p, base, *(np.asarray(answer[k]) for k in ("size", "medoid", "mean", "exact")))

    def _fill(self, gi: int, p: int, base: int, size: np.ndarray, medoid: np.ndarray, mean: np.ndarray,
              exact: np.ndarray) -> None:
        self.size[gi, p], self.medoid[gi, p], self.mean[gi, p], self.exact[gi, p] = size, base + medoid, mean, exact


def _store_results(ws: Workspace, run_id: int, params: AuditParams, results: list) -> None:
    with ws.transaction() as con:
        for pid, gens, groups, base, l2, tiled, rel, ids, sim, near in results:
            unconditional = gens[0].prompt is None
            if unconditional:
                largest = 1
                order = np.argsort(rel, kind="stable")
                chosen = [int(i) for i in order if rel[i] < 1.0]
                chosen += [int(i) for i in order if rel[i] >= 1.0][: max(0, UNCONDITIONAL_CANDIDATES - len(chosen))]
                entries = [((i,), i, 0.0, True) for i in chosen]
            else:
                largest = groups[0].size if groups else 1
                entries = [(g.members, g.medoid, g.mean_distance, g.exact) for g in groups]
            flagged_prompt = (not unconditional) and largest >= params.min_clique
            best_mean = groups[0].mean_distance if (not unconditional and groups) else None
            clique_exact = unconditional or not groups or groups[0].exact
            con.execute("INSERT INTO prompt_results(run_id, prompt_id, generations, largest_clique, flagged, mean_distance, clique_exact) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, pid, len(gens), largest, int(flagged_prompt), best_mean, int(clique_exact)))
            for rank, (members, med, mean_d, exact) in enumerate(entries):
                r = float(rel[med])
                if unconditional:
                    flagged, extracted = r < 1.0, r < 1.0
                    score = (0.0 if extracted else 1.0) + min(r / (1.0 + r), 0.999999)
                else:
                    flagged = len(members) >= params.min_clique
                    # the attack reports an extraction only for flagged cliques (PAPER.md step 5)
                    extracted = flagged and bool(l2[med, 0] <= params.delta)
                    # flagged cliques by mean distance (the paper's ranking); the unflagged after them,
                    # larger cliques first, so a lone generation never outranks a clique of six
                    score = min(float(mean_d), 0.999999) if flagged else 1.0 + 0.5 / len(members) + 0.49 * min(float(mean_d), 1.0)
                cid = con.execute(
                    "INSERT INTO candidates(run_id, prompt_id, group_rank, clique_size, mean_distance, flagged, "
                    "medoid_generation_id, nearest_training_id, l2, tiled_l2, relative_l2, extracted, score, "
                    "clique_exact, nearest_certified, nearest_lower, exact_distances) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, pid, rank, len(members), float(mean_d), int(flagged), gens[med].id, int(ids[med, 0]),
                     float(l2[med, 0]), float(tiled[med, 0]), r if unconditional else None, int(extracted), score,
                     int(exact), int(near.certified[med]), float(near.lower[med]), int(near.exact_count[med]))).lastrowid
                con.executemany("INSERT INTO candidate_members(candidate_id, generation_id) VALUES (?, ?)",
                                [(cid, gens[m].id) for m in members])
                con.executemany(
                    "INSERT INTO neighbours(candidate_id, rank, training_id, l2, tiled_l2, similarity, relative_l2) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cid, j, int(ids[med, j]), float(l2[med, j]), float(tiled[med, j]), float(sim[med, j]),
                      r if (unconditional and j == 0) else None) for j in range(min(params.neighbours, ids.shape[1]))])
        con.execute("UPDATE audit_runs SET status = 'done', finished_at = ? WHERE id = ?", (now(), run_id))


# ---------------------------------------------------------------------------- reading runs
def list_runs(ws: Workspace) -> list[RunInfo]:
    with ws.connect() as con:
        rows = con.execute("SELECT * FROM audit_runs WHERE status = 'done' ORDER BY id").fetchall()
    return [RunInfo(r["id"], r["created_at"], r["finished_at"], r["status"], AuditParams(**json.loads(r["params"]))) for r in rows]


def latest_run(ws: Workspace) -> int | None:
    with ws.connect() as con:
        row = con.execute("SELECT MAX(id) FROM audit_runs WHERE status = 'done'").fetchone()
    return row[0]


def run_params(ws: Workspace, run_id: int) -> AuditParams:
    with ws.connect() as con:
        row = con.execute("SELECT params FROM audit_runs WHERE id = ? AND status = 'done'", (run_id,)).fetchone()
    if row is None:
        raise InputError(f"no finished audit run {run_id} in {ws.root}; run `memaudit audit {ws.root}`")
    return AuditParams(**json.loads(row["params"]))


def _require_run(ws: Workspace, run_id: int | None) -> int:
    run_id = run_id if run_id is not None else latest_run(ws)
    if run_id is None:
        raise InputError(f"{ws.root} has no audit run yet; run `memaudit audit {ws.root}`")
    run_params(ws, run_id)
    return run_id


_CAND_SQL = """SELECT c.*, p.text AS prompt_text, g.path AS medoid_path, t.path AS training_path
FROM candidates c JOIN prompts p ON p.id = c.prompt_id JOIN generations g ON g.id = c.medoid_generation_id
LEFT JOIN training_images t ON t.id = c.nearest_training_id"""


def _candidate(row, members: tuple[int, ...] = ()) -> Candidate:
    return Candidate(id=row["id"], run_id=row["run_id"], prompt=row["prompt_text"] or None, prompt_id=row["prompt_id"],
                     group_rank=row["group_rank"], clique_size=row["clique_size"], mean_distance=row["mean_distance"],
                     flagged=bool(row["flagged"]), medoid_generation_id=row["medoid_generation_id"], medoid_path=row["medoid_path"],
                     nearest_training_id=row["nearest_training_id"], nearest_training_path=row["training_path"],
                     l2=row["l2"], tiled_l2=row["tiled_l2"], relative_l2=row["relative_l2"], extracted=bool(row["extracted"]),
                     members=members, clique_exact=bool(row["clique_exact"]),
                     nearest_certified=None if row["nearest_certified"] is None else bool(row["nearest_certified"]),
                     nearest_lower=row["nearest_lower"], exact_distances=row["exact_distances"])


def candidates(ws: Workspace, run_id: int | None = None, *, flagged_only: bool = False, extracted_only: bool = False,
               with_members: bool = False) -> list[Candidate]:
    """The run's candidates, most suspicious first (flagged before unflagged, then by mean clique distance)."""
    run_id = _require_run(ws, run_id)
    sql = _CAND_SQL + " WHERE c.run_id = ?"
    if flagged_only:
        sql += " AND c.flagged = 1"
    if extracted_only:
        sql += " AND c.extracted = 1"
    sql += " ORDER BY c.score, c.id"
    with ws.connect() as con:
        rows = con.execute(sql, (run_id,)).fetchall()
        members: dict[int, list[int]] = {}
        if with_members:
            for m in con.execute("SELECT m.candidate_id, m.generation_id FROM candidate_members m JOIN candidates c "
                                 "ON c.id = m.candidate_id WHERE c.run_id = ? ORDER BY m.generation_id", (run_id,)):
                members.setdefault(m[0], []).append(m[1])
    return [_candidate(r, tuple(members.get(r["id"], ()))) for r in rows]


def get_candidate(ws: Workspace, candidate_id: int) -> Candidate:
    with ws.connect() as con:
        row = con.execute(_CAND_SQL + " WHERE c.id = ?", (candidate_id,)).fetchone()
        if row is None:
            raise InputError(f"no candidate {candidate_id} in {ws.root}; `memaudit export {ws.root} --format csv` lists them")
        members = tuple(r[0] for r in con.execute("SELECT generation_id FROM candidate_members WHERE candidate_id = ? ORDER BY generation_id", (candidate_id,)))
    return _candidate(row, members)


def neighbours(ws: Workspace, candidate_id: int) -> list[NeighbourView]:
    with ws.connect() as con:
        rows = con.execute("SELECT * FROM neighbours WHERE candidate_id = ? ORDER BY rank", (candidate_id,)).fetchall()
    train = get_training(ws, [r["training_id"] for r in rows])
    return [NeighbourView(train[r["training_id"]], r["rank"], r["l2"], r["tiled_l2"], r["similarity"], r["relative_l2"]) for r in rows]


def prompt_results(ws: Workspace, run_id: int | None = None) -> list[PromptRow]:
    """Per-prompt results of a run at the run's own thresholds."""
    run_id = _require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT r.*, p.text, (SELECT MAX(c.extracted) FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id) AS ext, "
            "(SELECT c.l2 FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0) AS best, "
            "(SELECT c.nearest_certified FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0) AS cert "
            "FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id WHERE r.run_id = ? ORDER BY r.flagged DESC, r.largest_clique DESC, r.mean_distance",
            (run_id,)).fetchall()
    return [PromptRow(r["prompt_id"], r["text"] or None, r["generations"], r["largest_clique"], bool(r["flagged"]),
                      bool(r["ext"]), r["mean_distance"], r["best"], bool(r["clique_exact"]), r["cert"] != 0) for r in rows]


# ---------------------------------------------------------------------------- live re-thresholding
class RunCache:
    """The arrays a run left in WS/cache/run-<id>/, loaded once (the dashboard keeps one per run)."""

    def __init__(self, ws: Workspace, run_id: int):
        self.ws, self.run_id = ws, run_id
        self.params = run_params(ws, run_id)
        d = ws.root / "cache" / f"run-{run_id}"
        if not (d / "curves.npz").is_file():
            raise MemauditError(f"the cache of audit run {run_id} is missing (WS/cache is derived data); run `memaudit audit {ws.root}` again")
        self.dir = d
        self.gen_ids = np.load(d / "gen_ids.npy")
        self.row_of = {int(g): i for i, g in enumerate(self.gen_ids)}
        self.nn_ids = np.load(d / "nn_ids.npy")
        self.nn_l2 = np.load(d / "nn_l2.npy")
        self.nn_sim = np.load(d / "nn_sim.npy")
        self.nn_rel = np.load(d / "nn_rel.npy")
        # runs made before certified search: every nearest neighbour counts as not certified
        n = len(self.gen_ids)
        self.nn_certified = np.load(d / "nn_certified.npy") if (d / "nn_certified.npy").is_file() else np.zeros(n, bool)
        self.nn_lower = np.load(d / "nn_lower.npy") if (d / "nn_lower.npy").is_file() else np.zeros(n, np.float32)
        c = np.load(d / "curves.npz")
        self.taus, self.prompt_ids = c["taus"], c["prompt_ids"]
        # the tile grids cached (runs made before the grid slider cached their own grid alone)
        self.grids = [int(g) for g in c["grids"]] if "grids" in c else [self.params.grid]
        self.grid = self.params.grid
        self.size, self.medoid, self.mean = ((c[name] if "grids" in c else c[name][None]) for name in ("size", "medoid", "mean"))
        self.exact = c["exact"] if "exact" in c else np.ones(self.size.shape, bool)  # earlier runs did not record it
        self.run_tau = self.tau_index(self.params.edge_threshold)
        self.nn_tiled = {g: np.load(d / _tiled_file(g, self.grid)) for g in self.grids}
        with ws.connect() as con:
            rows = con.execute("SELECT p.id, p.text, COUNT(g.id) AS n FROM prompts p JOIN generations g ON g.prompt_id = p.id GROUP BY p.id").fetchall()
        self.prompt_text = {r["id"]: (r["text"] or None) for r in rows}
        self.prompt_count = {r["id"]: r["n"] for r in rows}
        self.best_l2 = np.where(self.medoid >= 0, self.nn_l2[np.maximum(self.medoid, 0), 0] if len(self.nn_l2) else np.inf, np.inf)
        at = np.maximum(self.medoid, 0)
        self.best_certified = (self.medoid >= 0) & (self.nn_certified[at] if n else False)
        self.best_lower = np.where(self.medoid >= 0, self.nn_lower[at] if n else 0.0, 0.0)
        # the run's own clique groups (at its tau and grid): a recount there counts any group, as the run does
        self.run_groups: dict[int, list[tuple[int, float, bool, float]]] = {}
        with ws.connect() as con:
            for r in con.execute("SELECT prompt_id, clique_size, l2, nearest_certified, nearest_lower FROM candidates "
                                 "WHERE run_id = ? ORDER BY prompt_id, group_rank", (run_id,)):
                self.run_groups.setdefault(r[0], []).append(
                    (r[1], r[2] if r[2] is not None else np.inf, bool(r[3]), r[4] if r[4] is not None else 0.0))

    def tau_index(self, tau: float) -> int:
        return int(np.argmin(np.abs(self.taus - tau)))

    def grid_index(self, grid: int | None) -> int:
        """The position of ``grid`` (None: the run's own) among the cached grids."""
        grid = self.grid if grid is None else int(grid)
        if grid not in self.grids:
            raise InputError(f"audit run {self.run_id} cached tile grids {', '.join(map(str, self.grids))}, not {grid}; "
                             f"audit again with --grid-choices including {grid}")
        return self.grids.index(grid)

    def distances(self, prompt_id: int, grid: int | None = None) -> np.ndarray:
        grid = self.grids[self.grid_index(grid)]
        path = self.dir / _distance_file(prompt_id, grid, self.grid)
        if not path.is_file():
            raise MemauditError(f"prompt {prompt_id} has no cached distances at grid {grid} in audit run {self.run_id}")
        return np.load(path)

    def recount(self, tau: float, k: int, delta: float, grid: int | None = None) -> Recount:
        """Flagged prompts and extractions at tau (snapped to the nearest tau of the run's curve), k,
        delta and a cached tile grid.

        At the run's own tau and grid a prompt is extracted when any of the run's clique groups of at
        least k members has its medoid within delta (as the run counts it); elsewhere only the largest
        clique is known, and its medoid decides. ``clique_bounds`` counts prompts whose largest clique
        is a lower bound there (a search budget stopped it); ``uncertain``, flagged prompts counted not
        extracted whose nearest neighbour is not certified and could lie within delta.
        """
        t, gi = self.tau_index(tau), self.grid_index(grid)
        size, best, mean = self.size[gi, :, t], self.best_l2[gi, :, t], self.mean[gi, :, t]
        exact, cert, lower = self.exact[gi, :, t], self.best_certified[gi, :, t], self.best_lower[gi, :, t]
        flagged = size >= k
        extracted = flagged & (best <= delta)
        uncertain = flagged & ~extracted & ~cert & (lower <= delta)
        if t == self.run_tau and self.grids[gi] == self.grid:
            for i, pid in enumerate(self.prompt_ids):
                groups = [g for g in self.run_groups.get(int(pid), ()) if g[0] >= k]
                extracted[i] = any(g[1] <= delta for g in groups)
                uncertain[i] = not extracted[i] and any(not g[2] and g[3] <= delta for g in groups)
        rows = []
        for i, pid in enumerate(self.prompt_ids):
            pid = int(pid)
            text = self.prompt_text.get(pid)
            if text is None:  # unconditional prompt: relative-L2 verdicts are per generation
                continue
            rows.append(PromptRow(pid, text, self.prompt_count.get(pid, 0), int(size[i]), bool(flagged[i]), bool(extracted[i]),
                                  float(mean[i]), float(best[i]) if np.isfinite(best[i]) else None, bool(exact[i]), bool(cert[i])))
        rows.sort(key=lambda r: (not r.flagged, -r.largest_clique, r.mean_distance or 0.0))
        text_rows = np.array([self.prompt_text.get(int(p)) is not None for p in self.prompt_ids], bool)
        return Recount(float(self.taus[t]), k, delta, self.grids[gi], int((flagged & text_rows).sum()),
                       int((extracted & text_rows).sum()), rows, int((~exact & text_rows).sum()), int((uncertain & text_rows).sum()))


def recount(ws: Workspace, run_id: int | None = None, *, tau: float, k: int, delta: float, grid: int | None = None,
            cache: RunCache | None = None) -> Recount:
    """Flagged prompts and extractions at new thresholds, from the run's cache (tau snaps to TAU_GRID;
    grid is one the run cached, by default its own)."""
    cache = cache or RunCache(ws, _require_run(ws, run_id))
    return cache.recount(tau, k, delta, grid)


def prompt_groups(ws: Workspace, run_id: int | None, prompt_id: int, *, tau: float, min_size: int, max_groups: int,
                  grid: int | None = None, cache: RunCache | None = None) -> list[GroupView]:
    """The clique groups of one prompt at any tau and cached tile grid, each with its medoid's nearest training images."""
    from .cliques import clique_groups

    cache = cache or RunCache(ws, _require_run(ws, run_id))
    grid = cache.grids[cache.grid_index(grid)]
    dist = cache.distances(prompt_id, grid)
    tiled = cache.nn_tiled[grid]
    with ws.connect() as con:
        ids = [r[0] for r in con.execute("SELECT id FROM generations WHERE prompt_id = ? ORDER BY seed, id", (prompt_id,))]
    gens = get_generations(ws, ids)
    order = [gens[i] for i in ids]
    if len(order) != len(dist):
        raise MemauditError(f"prompt {prompt_id} has changed since audit run {cache.run_id}; audit again")
    groups = clique_groups(dist, tau, min_size, max_groups, budget=cache.ws.get_setting("clique_node_budget"), on_budget="mark")
    train_ids = sorted({int(t) for g in groups for t in cache.nn_ids[cache.row_of[order[g.medoid].id]]})
    train = get_training(ws, train_ids)
    views = []
    for g in groups:
        medoid = order[g.medoid]
        row = cache.row_of[medoid.id]
        nbrs = [NeighbourView(train[int(cache.nn_ids[row, j])], j, float(cache.nn_l2[row, j]), float(tiled[row, j]),
                              float(cache.nn_sim[row, j])) for j in range(cache.nn_ids.shape[1])]
        views.append(GroupView([order[m] for m in g.members], medoid, g.mean_distance, nbrs, g.exact,
                               bool(cache.nn_certified[row]), float(cache.nn_lower[row])))
    return views


def duplicate_extraction_table(ws: Workspace, run_id: int | None = None) -> list[dict]:
    """The paper's Figure 5 as rows: per training duplicate count, prompts flagged and extracted.

    A prompt is attributed to the duplicate count of the training image nearest to its
    largest clique's medoid.
    """
    run_id = _require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT t.duplicate_count AS k, COUNT(*) AS prompts, SUM(r.flagged) AS flagged, SUM(c.extracted) AS extracted "
            "FROM prompt_results r JOIN candidates c ON c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0 "
            "JOIN training_images t ON t.id = c.nearest_training_id JOIN prompts p ON p.id = r.prompt_id "
            "WHERE r.run_id = ? AND p.text != '' GROUP BY t.duplicate_count ORDER BY t.duplicate_count", (run_id,)).fetchall()
    return [dict(r) for r in rows]


def caption_duplicate_table(ws: Workspace, run_id: int | None = None) -> list[dict]:
    """Figure 5 keyed by the prompt's own training caption: for prompts that are training captions,
    the duplicate count of the captioned image against whether the prompt was flagged / extracted."""
    run_id = _require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT MAX(t.duplicate_count) AS k, r.prompt_id, r.flagged, "
            "(SELECT MAX(c.extracted) FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id) AS extracted "
            "FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id JOIN training_images t ON t.caption = p.text "
            "WHERE r.run_id = ? GROUP BY r.prompt_id", (run_id,)).fetchall()
    table: dict[int, dict] = {}
    for r in rows:
        e = table.setdefault(r["k"], {"k": r["k"], "prompts": 0, "flagged": 0, "extracted": 0})
        e["prompts"] += 1
        e["flagged"] += int(r["flagged"])
        e["extracted"] += int(r["extracted"] or 0)
    return [table[k] for k in sorted(table)]


def count_summary(ws: Workspace, run_id: int | None = None) -> dict:
    """A run's counts, with what its search budgets left uncertain: ``clique_bounds`` prompts whose
    largest clique is a lower bound, ``uncertified_nearest`` flagged candidates whose nearest training
    image is not certainly the nearest, ``uncertain_verdicts`` those among them counted not extracted
    whose true nearest could still lie within delta."""
    run_id = _require_run(ws, run_id)
    delta = run_params(ws, run_id).delta
    with ws.connect() as con:
        r = con.execute("SELECT COUNT(*) AS prompts, SUM(flagged) AS flagged, SUM(1 - clique_exact) AS bounds "
                        "FROM prompt_results WHERE run_id = ?", (run_id,)).fetchone()
        c = con.execute("SELECT COUNT(*) AS candidates, SUM(extracted) AS extracted, COUNT(DISTINCT CASE WHEN extracted = 1 THEN nearest_training_id END) AS images, "
                        "SUM(CASE WHEN flagged = 1 AND nearest_certified = 0 THEN 1 ELSE 0 END) AS uncertified, "
                        "SUM(CASE WHEN flagged = 1 AND extracted = 0 AND nearest_certified = 0 AND nearest_lower <= ? THEN 1 ELSE 0 END) AS uncertain "
                        "FROM candidates WHERE run_id = ?", (delta, run_id)).fetchone()
    return {"run_id": run_id, "prompts": r["prompts"], "flagged_prompts": r["flagged"] or 0, "candidates": c["candidates"],
            "extracted_candidates": c["extracted"] or 0, "extracted_training_images": c["images"] or 0,
            "clique_bounds": r["bounds"] or 0, "uncertified_nearest": c["uncertified"] or 0,
            "uncertain_verdicts": c["uncertain"] or 0}
