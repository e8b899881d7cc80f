"""Live re-thresholding: a run's cached arrays, loaded once, recounted at any tau, clique size,
delta and cached tile grid without computing a distance; and one prompt's clique groups at any tau."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import InputError, MemauditError
from .records import Generation
from .results import NeighbourView, PromptRow, get_generations, get_training
from .runs import cache_dir, distance_file, legacy_distance_file, require_run, run_params, tiled_file
from .store import Workspace


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


class RunCache:
    """The arrays a run left in WS/cache/run-<id>/, loaded once (the dashboard keeps one per run)."""

    def __init__(self, ws: Workspace, run_id: int):
        self.ws, self.run_id = ws, run_id
        self.params = run_params(ws, run_id)
        d = cache_dir(ws, run_id)
        if not (d / "curves.npz").is_file():
            raise MemauditError(f"the cache of audit run {run_id} is missing (WS/cache is derived data); run `memaudit audit {ws.root}` again")
        self.dir = d
        # per-generation arrays are memory-mapped: a run of a million generations is read, not loaded
        self.gen_ids = np.load(d / "gen_ids.npy", mmap_mode="r")
        self.nn_ids = np.load(d / "nn_ids.npy", mmap_mode="r")
        self.nn_l2 = np.load(d / "nn_l2.npy", mmap_mode="r")
        self.nn_sim = np.load(d / "nn_sim.npy", mmap_mode="r")
        self.nn_rel = np.load(d / "nn_rel.npy", mmap_mode="r")
        # runs made before certified search: every nearest neighbour counts as not certified
        n = len(self.gen_ids)
        self.nn_certified = np.load(d / "nn_certified.npy", mmap_mode="r") if (d / "nn_certified.npy").is_file() else np.zeros(n, bool)
        self.nn_lower = np.load(d / "nn_lower.npy", mmap_mode="r") if (d / "nn_lower.npy").is_file() else np.zeros(n, np.float32)
        c = np.load(d / "curves.npz")
        self.taus, self.prompt_ids = c["taus"], c["prompt_ids"]
        # the tile grids cached (runs made before the grid slider cached their own grid alone)
        self.grids = [int(g) for g in c["grids"]] if "grids" in c else [self.params.grid]
        self.grid = self.params.grid
        self.size, self.medoid, self.mean = ((c[name] if "grids" in c else c[name][None]) for name in ("size", "medoid", "mean"))
        self.exact = c["exact"] if "exact" in c else np.ones(self.size.shape, bool)  # earlier runs did not record it
        self.run_tau = self.tau_index(self.params.edge_threshold)
        self.nn_tiled = {g: np.load(d / tiled_file(g, self.grid), mmap_mode="r") for g in self.grids}
        with ws.connect() as con:  # the run's prompts and the generations it audited (not a pass over every generation)
            rows = con.execute("SELECT r.prompt_id AS id, p.text, r.generations AS n FROM prompt_results r "
                               "JOIN prompts p ON p.id = r.prompt_id WHERE r.run_id = ?", (run_id,)).fetchall()
            # the run's own clique groups (at its tau and grid): a recount there counts any group, as the run does
            groups = con.execute("SELECT prompt_id, clique_size, l2, nearest_certified, nearest_lower FROM candidates "
                                 "WHERE run_id = ? ORDER BY prompt_id, group_rank", (run_id,)).fetchall()
        self.prompt_text = {r["id"]: (r["text"] or None) for r in rows}
        self.prompt_count = {r["id"]: r["n"] for r in rows}
        self.run_groups: dict[int, list[tuple[int, float, bool, float]]] = {}
        for r in groups:
            self.run_groups.setdefault(r[0], []).append(
                (r[1], r[2] if r[2] is not None else np.inf, bool(r[3]), r[4] if r[4] is not None else 0.0))

    @cached_property
    def _id_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows by generation id, the ids in that order): sorted once, when a row is first looked up."""
        by_id = np.argsort(self.gen_ids, kind="stable")
        return by_id, np.asarray(self.gen_ids)[by_id]

    def row_of(self, generation_id: int) -> int:
        """The row of a generation in the run's per-generation arrays."""
        by_id, sorted_ids = self._id_order
        i = int(np.searchsorted(sorted_ids, generation_id))
        if i >= len(sorted_ids) or sorted_ids[i] != generation_id:
            raise MemauditError(f"generation {generation_id} is not in audit run {self.run_id}; audit again")
        return int(by_id[i])

    def best(self, gi: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per prompt at (grid index gi, tau index t): the largest clique medoid's nearest l2 (inf without one),
        whether that nearest is certified, and a lower bound of the true nearest distance. Read from the
        memory-mapped arrays for this one slice, so memory does not grow with grids x taus x prompts."""
        medoid = self.medoid[gi, :, t]
        has, at = medoid >= 0, np.maximum(medoid, 0)
        if not len(self.gen_ids):
            return np.full(len(medoid), np.inf), np.zeros(len(medoid), bool), np.zeros(len(medoid), np.float32)
        return (np.where(has, self.nn_l2[at, 0], np.inf), has & self.nn_certified[at],
                np.where(has, self.nn_lower[at], 0.0))

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
        path = self.dir / distance_file(prompt_id, grid, self.grid)
        if not path.is_file():  # a run cached before the sharded layout
            path = self.dir / legacy_distance_file(prompt_id, grid, self.grid)
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
        size, mean, exact = self.size[gi, :, t], self.mean[gi, :, t], self.exact[gi, :, t]
        best, cert, lower = self.best(gi, t)
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
    cache = cache or RunCache(ws, require_run(ws, run_id))
    return cache.recount(tau, k, delta, grid)


def prompt_groups(ws: Workspace, run_id: int | None, prompt_id: int, *, tau: float, min_size: int, max_groups: int,
                  grid: int | None = None, cache: RunCache | None = None) -> list[GroupView]:
    """The clique groups of one prompt at any tau and cached tile grid, each with its medoid's nearest training images."""
    from .cliques import clique_groups

    cache = cache or RunCache(ws, require_run(ws, run_id))
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
    train_ids = sorted({int(t) for g in groups for t in cache.nn_ids[cache.row_of(order[g.medoid].id)]})
    train = get_training(ws, train_ids)
    views = []
    for g in groups:
        medoid = order[g.medoid]
        row = cache.row_of(medoid.id)
        nbrs = [NeighbourView(train[int(cache.nn_ids[row, j])], j, float(cache.nn_l2[row, j]), float(tiled[row, j]),
                              float(cache.nn_sim[row, j])) for j in range(cache.nn_ids.shape[1])]
        views.append(GroupView([order[m] for m in g.members], medoid, g.mean_distance, nbrs, g.exact,
                               bool(cache.nn_certified[row]), float(cache.nn_lower[row])))
    return views
