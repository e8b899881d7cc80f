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
from typing import Callable

import numpy as np

from . import config
from .curves import Curves, curve_workers, run_taus
from .errors import InputError
from .records import AuditParams, Generation
from .results import generation_from_row, get_training
from .runs import distance_file, own_run, remove_abandoned_runs, tiled_file
from .store import Workspace, now

UNCONDITIONAL_CANDIDATES = 100  # candidates stored per unconditional prompt beyond those extracted

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


# ---------------------------------------------------------------------------- loading


_GEN_SQL = "SELECT g.*, p.text FROM generations g JOIN prompts p ON p.id = g.prompt_id"


def generations_by_prompt(ws: Workspace) -> dict[int, list[Generation]]:
    out: dict[int, list[Generation]] = {}
    with ws.connect() as con:
        for row in con.execute(_GEN_SQL + " ORDER BY g.prompt_id, g.seed, g.id"):
            out.setdefault(row["prompt_id"], []).append(generation_from_row(row))
    return out


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
    device = audit_device(settings["audit_device"])
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
        owner = own_run(cache)  # before the commit: no other process ever sees this run without its owner

    prompt_ids = sorted(by_prompt)
    sizes = sorted(len(by_prompt[pid]) for pid in prompt_ids if by_prompt[pid][0].prompt is not None)
    workers = curve_workers(settings["audit_workers"], len(sizes) * len(grids), sizes[len(sizes) // 2] if sizes else 0)
    curves = Curves((len(grids), len(prompt_ids), len(taus)), workers, budget, taus)
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
                                     budget=params.nearest_budget, device=device)
            ids, l2 = near.ids, near.l2
            clock = _lap(timings, "nearest", clock)
            sim = similarity(images, ids, near.pooled)
            tiled_by_grid = _tiled_to_training(images, ids, pyramid, grids, device)
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
                by_grid = {g: d.cpu().numpy().astype(np.float32) for g, d in pairwise_tiled_l2_grids(images, grids=grids, device=device).items()}
                clock = _lap(timings, "distances", clock)
                for g, d in by_grid.items():
                    np.fill_diagonal(d, 0.0)
                    np.save(cache / distance_file(pid, g, params.grid), d)
                dist = by_grid[params.grid]
                clock = _lap(timings, "save_cache", clock)
                # the largest clique is always kept (even of size 1: every prompt gets a candidate, so
                # Figure 5 can attribute it); further groups only down to group_min_size
                groups = clique_groups(dist, params.edge_threshold, 1, params.max_groups, budget=budget, on_budget="mark")
                groups = groups[:1] + [g for g in groups[1:] if g.size >= params.group_min_size]
                clock = _lap(timings, "cliques", clock)
                for gi, g in enumerate(grids):
                    curves.add(gi, p_index, base, by_grid[g], cache / distance_file(pid, g, params.grid))
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
            np.save(cache / tiled_file(g, params.grid), np.concatenate(nn_tiled[g]) if nn_tiled[g] else empty_f)
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
