"""Cliques of near-identical generations (PAPER.md, attack steps 3-4).

The graph of one prompt has a vertex per generation and an edge between i != j
where ``dist[i, j] <= tau``. A clique is a set of pairwise-linked vertices; the
attack's statistic is the size of the largest one.

Exact maximum clique
--------------------
Branch and bound on Python-int bitsets (bit k = k-th vertex of the search order):

* a lower bound first: greedy cliques grown from the ten vertices of highest core
  number, scanning vertices by core number (finds a planted clique at once);
* the k-core bound: a vertex of core number c is in no clique larger than c + 1,
  so vertices whose core number is below the best size found are dropped (with
  a 400-clique found, only its members are left, and nothing to search);
* at each node the candidates are coloured greedily (each colour class is an
  independent set, so a clique takes at most one vertex per colour): the node is
  cut when ``|R| + colours <= best``; only vertices of high enough colour are
  branched on, highest colour first, after Tomita's re-numbering has moved as
  many as it can into lower colours (tried while there are at most 64 lower
  colours: it pays in dense graphs of moderate clique size, and costs more than
  it saves for large near-cliques, whose bounds are tight anyway).

The result is exact. Ties (several maximum cliques) are broken deterministically.
Up to ``TIE_LIMIT`` of them are enumerated (the same search, cutting only at
``<``, and taking at once every vertex linked to all candidates); if that is
all of them, the one with the smallest mean pairwise distance wins, then the
one whose sorted members come first. With more ties (a cluster of copies with a
few missing edges has 2^k maximum cliques), the clique is built one vertex at a
time, each the one that keeps a maximum clique reachable (a bounded search) with
the smallest summed distance to the members so far, then the smallest index: a
deterministic choice that is not always the smallest mean. Without distances
(``maximum_clique``) both give exactly the lexicographically first maximum clique.

Guard: the search counts its nodes. Past ``budget`` (setting
``clique_node_budget``, roughly ten seconds on 2 cores) it raises CliqueBudgetExceeded
with what to do; with ``on_budget="best"`` it instead warns (CliqueBudgetWarning)
and uses the largest clique found so far, which may not be the largest; with
``on_budget="mark"`` it says nothing and marks the answer: a ``CliqueGroup`` whose
``exact`` is False, a curve point whose exactness flag is False, has a size that is
only a lower bound of the true maximum. Each group (``clique_groups``) and each
distinct graph of a curve (``clique_curve``) gets a budget of its own.
Realistic audit graphs (a few dense clusters of copies in a sparse graph)
take well under a budget's hundredth; dense random graphs of hundreds of vertices
(tau far too high) are what the guard is for.
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from . import config
from .errors import InputError, MemauditError
from .records import CliqueGroup

TIE_LIMIT = 256  # maximum cliques enumerated to break a tie
RENUMBER_MAX = 64  # colour classes up to which re-numbering is tried
_GREEDY_STARTS = 10


class CliqueBudgetExceeded(MemauditError):
    """The exact search needed more nodes than its budget allows."""


class CliqueBudgetWarning(UserWarning):
    """The search stopped at its budget and used the largest clique found so far."""


class _OutOfBudget(Exception):
    pass


class _Enough(Exception):
    pass


class _Counter:
    def __init__(self, budget: int, on_budget: str, where: str) -> None:
        self.budget = budget
        self.steps = 0
        self.on_budget = on_budget
        self.where = where
        self.exhausted = False
        self.bound = False  # the budget stopped the search for a larger clique: the size found is a lower bound

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.budget:
            self.exhausted = True
            raise _OutOfBudget

    def fail(self) -> None:
        """Out of budget: raise for the user, or warn once and carry on with what was found."""
        message = (f"finding the largest clique {self.where} exactly needs more than {self.budget:,} search steps "
                   f"(setting clique_node_budget); the graph is unusually dense: lower the edge threshold tau, "
                   f"or raise clique_node_budget to wait longer")
        if self.on_budget == "raise":
            raise CliqueBudgetExceeded(message)
        if self.on_budget == "mark":
            return
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(message + "; using the largest clique found so far", CliqueBudgetWarning, stacklevel=4)


@contextmanager
def _deep_recursion(depth: int) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, depth + 500))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


# ---------------------------------------------------------------------------- graph helpers
def _core_numbers(adj: np.ndarray) -> np.ndarray:
    """k-core number of every vertex (peeling all vertices of degree <= k at once, k = 0, 1, ...)."""
    n = len(adj)
    deg = adj.sum(axis=1).astype(np.int64)
    core = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    k = 0
    left = n
    while left:
        k = max(k, int(deg[alive].min()))
        while True:
            gone = alive & (deg <= k)
            if not gone.any():
                break
            core[gone] = k
            alive[gone] = False
            left -= int(gone.sum())
            deg -= adj[gone].sum(axis=0)
        k += 1
    return core


def _bitsets(adj: np.ndarray) -> list[int]:
    """Row i of a boolean matrix as a Python int (bit j set where adj[i, j])."""
    packed = np.packbits(adj, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Graph:
    """A vertex subset of a graph in search order, as bitsets."""

    def __init__(self, adj: np.ndarray, vertices: np.ndarray) -> None:
        self.vertices = vertices  # search position -> vertex of adj
        sub = adj[np.ix_(vertices, vertices)]
        self.nbr = _bitsets(sub)
        n = len(vertices)
        full = (1 << n) - 1
        self.non = [full ^ m ^ (1 << v) for v, m in enumerate(self.nbr)]  # neither a neighbour nor itself
        self.full = full

    def colour(self, p: int, kmin: int) -> tuple[list[int], list[int]]:
        """Greedy colouring of p in bit order; the vertices of colour > kmin with their colours."""
        return self.partition(p, kmin)[1:]

    def partition(self, p: int, kmin: int) -> tuple[list[int], list[int], list[int]]:
        """Colour classes of p: the first kmin as bitsets, then each later vertex with its colour.

        A vertex that would get a colour above kmin is first re-numbered (Tomita's
        MCS; when kmin <= RENUMBER_MAX): if it has no neighbour, or exactly one
        neighbour w, in a class i <= kmin, and w has none in a class j with
        i < j <= kmin, then w moves to j and the vertex to i. Classes stay
        independent sets; fewer vertices need branching.
        """
        non, nbr = self.non, self.nbr
        classes: list[int] = []  # the first kmin classes, as bitsets
        k = 0
        while p and k < kmin:
            k += 1
            q = before = p
            while q:
                low = q & -q
                q &= non[low.bit_length() - 1]
                p ^= low
            classes.append(before ^ p)
        order: list[int] = []
        colours: list[int] = []
        # re-numbering costs up to kmin^2 set operations per vertex: worth it in the hard, dense
        # graphs of moderate clique size, not for large near-cliques (tight bounds already)
        renumber = 0 < len(classes) <= RENUMBER_MAX
        while p:
            k += 1
            q = p
            while q:
                low = q & -q
                v = low.bit_length() - 1
                p ^= low
                if renumber and self._renumber(v, low, nbr[v], classes):
                    q ^= low
                    continue
                q &= non[v]
                order.append(v)
                colours.append(k)
        return classes, order, colours

    def _renumber(self, v: int, bit: int, nv: int, classes: list[int]) -> bool:
        nbr = self.nbr
        for i in range(len(classes)):
            conflict = nv & classes[i]
            if not conflict:
                classes[i] |= bit
                return True
            if conflict & (conflict - 1):  # two or more neighbours in class i
                continue
            nw = nbr[conflict.bit_length() - 1]
            for j in range(i + 1, len(classes)):
                if not nw & classes[j]:
                    classes[i] ^= conflict | bit
                    classes[j] |= conflict
                    return True
        return False


def _order(adj: np.ndarray, keep: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Vertices of keep, highest core number first, then highest degree, then index."""
    idx = np.flatnonzero(keep)
    deg = adj[np.ix_(idx, idx)].sum(axis=1)
    return idx[np.lexsort((idx, -deg, -core[idx]))]


def _greedy(adj: np.ndarray, core: np.ndarray, keep: np.ndarray) -> list[int]:
    """A large clique fast: grow from each of the best-placed vertices of keep, scanning by core number."""
    if not keep.any():
        return []
    order = _order(adj, keep, core)
    g = _Graph(adj, order)
    best: list[int] = []
    for start in range(min(_GREEDY_STARTS, len(order))):
        if core[order[start]] + 1 <= len(best):
            break
        cand = g.nbr[start]
        clique = [start]
        while cand:
            low = cand & -cand  # the first remaining vertex in core order
            v = low.bit_length() - 1
            clique.append(v)
            cand &= g.nbr[v]
        if len(clique) > len(best):
            best = clique
    return [int(order[v]) for v in best]


# ---------------------------------------------------------------------------- the searches
def _larger_clique(adj: np.ndarray, size: int, seed: list[int], counter: _Counter,
                   limit: int | None = None) -> list[int] | None:
    """A maximum clique if one has more than ``size`` vertices, else None. ``seed`` is a known clique.

    ``limit``: no clique has more vertices than this (the search stops on reaching it).
    """
    n = len(adj)
    limit = n if limit is None else limit
    if n <= size or limit <= size:
        return None
    core = _core_numbers(adj)
    if int(core.max()) + 1 <= size:
        return None
    found = max(_greedy(adj, core, core >= size), seed, key=len)
    best = found if len(found) > size else None
    target = max(size, len(found))
    keep = core >= target  # a clique of target + 1 needs core numbers >= target
    if keep.sum() <= target or target >= limit:
        return best
    g = _Graph(adj, _order(adj, keep, core))
    state = {"best": [], "size": target}

    def expand(r: list[int], p: int) -> None:
        counter.tick()
        order, colours = g.colour(p, state["size"] - len(r))
        for v, c in zip(reversed(order), reversed(colours)):
            if len(r) + c <= state["size"]:
                return
            np_ = p & g.nbr[v]
            if np_:
                expand(r + [v], np_)
            elif len(r) + 1 > state["size"]:
                state["best"], state["size"] = r + [v], len(r) + 1
                if state["size"] >= limit:
                    raise _Enough
            p ^= 1 << v

    try:
        with _deep_recursion(len(g.vertices)):
            expand([], g.full)
    except _Enough:
        pass
    except _OutOfBudget:
        counter.bound = True
        counter.fail()
    if state["best"]:
        best = [int(g.vertices[v]) for v in state["best"]]
    return best


def _all_maximum(adj: np.ndarray, omega: int, counter: _Counter) -> tuple[list[list[int]], bool, _Graph]:
    """The cliques of size omega (the maximum), up to TIE_LIMIT of them; whether that is all; the graph searched."""
    core = _core_numbers(adj)
    g = _Graph(adj, _order(adj, core >= omega - 1, core))
    found: list[list[int]] = []

    def expand(r: list[int], p: int) -> None:
        counter.tick()
        # vertices linked to every other candidate are in every maximum clique through r: take them
        # at once (worth the scan only when few candidates beyond those needed are left)
        forced = [v for v in _bits(p) if not p & g.non[v]] if p.bit_count() <= 2 * (omega - len(r)) else []
        if forced:
            r = r + forced
            for v in forced:
                p ^= 1 << v
        if not p:
            if len(r) == omega:
                found.append(r)
                if len(found) >= TIE_LIMIT:
                    raise _Enough
            return
        order, colours = g.colour(p, omega - len(r) - 1)
        for v, c in zip(reversed(order), reversed(colours)):
            if len(r) + c < omega:
                return
            expand(r + [v], p & g.nbr[v])
            p ^= 1 << v

    complete = True
    try:
        with _deep_recursion(len(g.vertices)):
            expand([], g.full)
    except _Enough:
        complete = False
    except _OutOfBudget:
        complete = False
        counter.fail()
    return [sorted(int(g.vertices[v]) for v in c) for c in found], complete, g


def _has_clique(g: _Graph, p: int, k: int, counter: _Counter) -> bool:
    """Whether the vertices p hold a clique of k vertices (branch and bound, stopping at the first)."""
    if k <= 0:
        return True
    if p.bit_count() < k:
        return False

    def expand(depth: int, p: int) -> bool:
        counter.tick()
        if p.bit_count() <= 2 * (k - depth):  # take the vertices linked to every other candidate
            forced = [v for v in _bits(p) if not p & g.non[v]]
            depth += len(forced)
            if depth >= k:
                return True
            for v in forced:
                p ^= 1 << v
            if not p:
                return False
        order, colours = g.colour(p, k - depth - 1)
        for v, c in zip(reversed(order), reversed(colours)):
            if depth + c < k:
                return False
            if depth + 1 == k:
                return True
            np_ = p & g.nbr[v]
            if np_ and expand(depth + 1, np_):
                return True
            p ^= 1 << v
        return False

    with _deep_recursion(k):
        return expand(0, p)


def _greedy_tie_break(adj: np.ndarray, g: _Graph, omega: int, dist: np.ndarray | None, index: np.ndarray,
                      counter: _Counter) -> list[int]:
    """A maximum clique built one vertex at a time, each the best that still leads to omega vertices.

    Without distances "best" is the smallest index, which gives exactly the
    lexicographically first maximum clique. With distances it is the smallest
    summed distance to the members chosen so far (first: to its candidate
    neighbours), then the smallest index: a deterministic choice, not always the
    smallest mean.
    """
    ids = index[g.vertices]  # search position -> numbering of dist
    acc = np.zeros(len(ids))
    if dist is not None:
        sub = dist[np.ix_(ids, ids)].astype(np.float64)
        adj_sub = adj[np.ix_(g.vertices, g.vertices)]
        acc = np.where(adj_sub, sub, 0.0).sum(axis=1) / np.maximum(adj_sub.sum(axis=1), 1)
    r: list[int] = []
    p = g.full
    while len(r) < omega:
        for v in sorted(_bits(p), key=lambda v: (acc[v], ids[v])):
            if not p & g.non[v] or _has_clique(g, p & g.nbr[v], omega - len(r) - 1, counter):
                break
        else:
            raise AssertionError("no vertex extends the clique: omega was wrong")
        if not r and dist is not None:
            acc = np.zeros(len(ids))
        r.append(v)
        p &= g.nbr[v]
        if dist is not None:
            acc += sub[v]
    return sorted(int(i) for i in ids[r])


def _mean_distance(dist: np.ndarray, members: Sequence[int]) -> float:
    """Mean of dist[i, j] over pairs i < j, from the correctly rounded sum (independent of order)."""
    k = len(members)
    if k < 2:
        return 0.0
    sub = dist[np.ix_(members, members)]
    return math.fsum(sub[np.triu_indices(k, 1)].tolist()) / (k * (k - 1) // 2)


def _first_smallest(approx: Sequence[float], exact: Callable[[int], float]) -> int:
    """Position of the smallest value (the first among equals), deciding near-ties exactly.

    ``approx`` are floating sums in any order; values within 1e-9 of the minimum
    are recomputed by ``exact`` (correctly rounded), so equal exact values tie.
    """
    a = np.asarray(approx, dtype=np.float64)
    near = np.flatnonzero(a <= a.min() + 1e-9 * max(1.0, abs(float(a.min()))))
    return int(min(near, key=lambda i: (exact(int(i)), int(i))))


def _truss(adj: np.ndarray, index: np.ndarray, common: int, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Drop edges with fewer than ``common`` common neighbours (in no clique of common + 2),
    then the vertices left without edges. Every clique of common + 2 or more survives.
    Only for sparse graphs (at most 8 edges a vertex), where it removes most of the graph."""
    iu, ju = np.nonzero(np.triu(adj, 1))
    if len(iu) > 8 * len(adj):
        return adj, index
    adj = adj.copy()
    for _ in range(rounds):
        nbr = _bitsets(adj)
        weak = np.array([(nbr[i] & nbr[j]).bit_count() < common for i, j in zip(iu.tolist(), ju.tolist())],
                        dtype=bool)
        if not weak.any():
            break
        adj[iu[weak], ju[weak]] = adj[ju[weak], iu[weak]] = False
        iu, ju = iu[~weak], ju[~weak]
    alive = np.flatnonzero(adj.any(axis=1))
    return adj[np.ix_(alive, alive)], index[alive]


def _best_clique(adj: np.ndarray, dist: np.ndarray | None, index: np.ndarray, size: int,
                 counter: _Counter) -> list[int] | None:
    """The tie-broken maximum clique of adj if it has more than ``size`` vertices, else None.

    Vertex i of adj is vertex index[i] (increasing) of dist; the answer is in dist's numbering.
    """
    core = _core_numbers(adj) if len(adj) else np.zeros(0, dtype=np.int64)
    cand = np.flatnonzero(core >= size)  # only these can be in a clique of size + 1
    if len(cand) <= size or len(cand) == 0:
        return None
    if len(cand) < len(adj):
        adj, index = adj[np.ix_(cand, cand)], index[cand]
    if size >= 2:
        adj, index = _truss(adj, index, size - 1)
        if len(adj) <= size:
            return None
    clique = _larger_clique(adj, size, [], counter)
    if clique is None:
        return None
    clique = sorted(clique)
    if counter.exhausted:
        return [int(index[v]) for v in clique]
    if len(clique) == 1:  # no edge: every vertex ties at mean 0 and the smallest index wins
        return [int(index[0])]
    if len(clique) == 2:  # the maximum cliques are the edges
        i, j = np.nonzero(np.triu(adj, 1))
        gi, gj = index[i], index[j]
        keys = (gj, gi) if dist is None else (gj, gi, dist[gi, gj])  # np.lexsort sorts by the last key first
        k = int(np.lexsort(keys)[0])
        return [int(gi[k]), int(gj[k])]
    found, complete, g = _all_maximum(adj, len(clique), counter)
    clique = [int(index[v]) for v in clique]
    if counter.exhausted:
        return clique
    if not complete:
        try:
            return _greedy_tie_break(adj, g, len(clique), dist, index, counter)
        except _OutOfBudget:
            counter.fail()
            return clique
    ties = [[int(index[v]) for v in t] for t in found]
    if dist is None:
        return min(ties)
    ties.sort()
    approx = [float(dist[np.ix_(c, c)].sum(dtype=np.float64) - np.trace(dist[np.ix_(c, c)])) for c in ties]
    return ties[_first_smallest(approx, lambda i: _mean_distance(dist, ties[i]))]


# ---------------------------------------------------------------------------- validation
def _check_adjacency(adj: np.ndarray) -> np.ndarray:
    a = np.asarray(adj)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise InputError(f"adj must be a square (n, n) matrix, got shape {a.shape}")
    if a.dtype != bool:
        if a.dtype.kind not in "iu" or not np.isin(a, (0, 1)).all():
            raise InputError(f"adj must hold booleans (or 0/1), got dtype {a.dtype}")
        a = a.astype(bool)
    if not np.array_equal(a, a.T):
        raise InputError("adj must be symmetric (an undirected graph); got adj[i, j] != adj[j, i] somewhere")
    a = a.copy()
    np.fill_diagonal(a, False)
    return a


def _check_distances(dist: np.ndarray) -> np.ndarray:
    if not isinstance(dist, np.ndarray) and hasattr(dist, "cpu"):
        dist = dist.cpu().numpy()
    d = np.asarray(dist)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise InputError(f"dist must be a square (n, n) matrix of distances, got shape {d.shape}")
    if d.dtype.kind not in "fiu":
        raise InputError(f"dist must hold numbers, got dtype {d.dtype}")
    if d.dtype.kind != "f":
        d = d.astype(np.float64)
    if np.isnan(d).any():
        raise InputError("dist contains NaN; recompute the distances")
    if (d < 0).any():
        raise InputError(f"dist must hold distances >= 0, got {float(d.min()):g}")
    if not np.array_equal(d, d.T):
        raise InputError("dist must be symmetric; got dist[i, j] != dist[j, i] somewhere")
    return d


def _check_tau(tau: float) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        t = float("nan")
    if np.isnan(t):
        raise InputError(f"tau must be a number, got {tau!r}")
    return t


def _graph(dist: np.ndarray, tau: float) -> np.ndarray:
    adj = dist <= tau
    np.fill_diagonal(adj, False)
    return adj


def _budget(budget: int | None, on_budget: str, where: str) -> _Counter:
    if on_budget not in ("raise", "best", "mark"):
        raise InputError(f"on_budget must be 'raise', 'best' or 'mark', got {on_budget!r}")
    value = config.default("clique_node_budget") if budget is None else budget
    return _Counter(int(config.check("clique_node_budget", value)), on_budget, where)


# ---------------------------------------------------------------------------- public API
def maximum_clique(adj: np.ndarray, *, budget: int | None = None, on_budget: str = "raise") -> list[int]:
    """The vertices (sorted) of a maximum clique of the graph ``adj`` (n, n) bool; [] for n = 0.

    Exact. The diagonal is ignored. Among several maximum cliques, the one whose
    sorted members come first lexicographically.
    """
    a = _check_adjacency(adj)
    counter = _budget(budget, on_budget, "of this graph")
    if len(a) == 0:
        return []
    return _best_clique(a, None, np.arange(len(a)), 0, counter) or []


def clique_groups(dist: np.ndarray, tau: float, min_size: int, max_groups: int, *, budget: int | None = None,
                  on_budget: str = "raise") -> list[CliqueGroup]:
    """Disjoint cliques of the graph {dist <= tau}, largest first, each of at least ``min_size`` members.

    The first group is a maximum clique of the whole graph; it is removed and the
    next is a maximum clique of what remains, and so on, while it has at least
    ``min_size`` members, up to ``max_groups`` groups. Each group: ``members``
    (sorted indices), ``medoid`` (the member with the smallest mean distance to
    the other members; ties to the smaller index; a single member is its own),
    ``mean_distance`` (mean of dist[i, j] over pairs i < j of members; 0 for one).
    Ties between maximum cliques go to the smaller mean distance, then to the
    sorted members that come first (beyond TIE_LIMIT tied cliques, a greedy
    deterministic choice: see the module docstring). Each group's search has its own
    ``budget``; ``exact`` is False on a group whose size the budget left a lower bound
    (only with ``on_budget="best"`` or ``"mark"``).
    """
    d = _check_distances(dist)
    t = _check_tau(tau)
    for name, value, low in (("min_size", min_size, 1), ("max_groups", max_groups, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    _budget(budget, on_budget, "")  # checks both before any work
    adj = _graph(d, t)
    remaining = np.arange(len(d))
    groups: list[CliqueGroup] = []
    while len(groups) < max_groups and len(remaining) >= min_size:
        counter = _budget(budget, on_budget, f"at tau={t:g}")
        members = _best_clique(adj[np.ix_(remaining, remaining)], d, remaining, min_size - 1, counter)
        if members is None:
            break
        groups.append(_group(d, members, exact=not counter.bound))
        remaining = np.setdiff1d(remaining, members, assume_unique=True)
    return groups


def _group(dist: np.ndarray, members: list[int], exact: bool = True) -> CliqueGroup:
    members = sorted(members)
    if len(members) == 1:
        return CliqueGroup((members[0],), members[0], 0.0, exact)
    sub = dist[np.ix_(members, members)].astype(np.float64)
    np.fill_diagonal(sub, 0.0)  # the row sums are then the sums over the other members
    medoid = _first_smallest(sub.sum(axis=1), lambda i: math.fsum(sub[i].tolist()))
    return CliqueGroup(tuple(members), members[medoid], _mean_distance(dist, members), exact)


def largest_clique_curve(dist: np.ndarray, taus: Sequence[float], *, budget: int | None = None,
                         on_budget: str = "raise") -> np.ndarray:
    """Size of the largest clique of {dist <= tau} at each tau (int64, in the order given).

    ``clique_curve``'s sizes; with ``on_budget="best"`` or ``"mark"`` a size may be a lower bound.
    """
    return clique_curve(dist, taus, budget=budget, on_budget=on_budget)[0]


def clique_curve(dist: np.ndarray, taus: Sequence[float], *, budget: int | None = None,
                 on_budget: str = "mark") -> tuple[np.ndarray, np.ndarray]:
    """(size, exact) at each tau: the largest clique of {dist <= tau} (int64) and whether that
    size is certainly the maximum (bool), in the order given.

    Exact, and non-decreasing in tau (raising tau only adds edges), which the
    search uses: taus that give the same graph are solved once; the smallest and
    largest graphs are solved, then the middle one between two solved graphs of
    different sizes, recursively (graphs between two of equal size have that size
    too). Each solve starts from the clique of the smaller graph (still a clique)
    and stops at the size of the larger one (an upper bound).

    Each distinct graph's solve has its own ``budget``. A solve the budget stops keeps
    the largest clique found, a lower bound, marked inexact; it is then no upper bound
    for smaller graphs, and graphs between it and a smaller graph of equal size are
    inexact too (their size lies between the two, and the larger one's is not known); a
    smaller graph of equal size to an exact larger one is exact however its solve ended.
    """
    d = _check_distances(dist)
    ts = [_check_tau(t) for t in taus]
    _budget(budget, on_budget, "")  # checks both before any work
    n = len(d)
    out = np.zeros(len(ts), dtype=np.int64)
    if n == 0 or not ts:
        return out, np.ones(len(ts), dtype=bool)
    upper = np.sort(d[np.triu_indices(n, 1)])
    # edges of the graph at each tau, comparing in dist's precision as ``dist <= tau`` does
    edges = np.searchsorted(upper, np.asarray(ts, dtype=np.float64).astype(upper.dtype), side="right")
    graphs = sorted(set(edges.tolist()))  # distinct graphs, smallest first
    rep = {e: upper[e - 1] for e in graphs if e}  # a tau giving exactly that graph
    asked = {e: min(t for t, x in zip(ts, edges.tolist()) if x == e) for e in graphs}  # for messages
    cliques: dict[int, list[int]] = {}
    exact: dict[int, bool] = {}

    def solve(k: int, seed: list[int], limit: int) -> None:
        e = graphs[k]
        counter = _budget(budget, on_budget, f"at tau={asked[e]:g}")
        larger = _larger_clique(_graph(d, rep[e]), len(seed), seed, counter, limit) if e else None
        cliques[k] = larger if larger is not None and len(larger) > len(seed) else seed
        exact[k] = not counter.bound

    def fill(lo: int, hi: int) -> None:
        if hi - lo <= 1:
            return
        if len(cliques[lo]) == len(cliques[hi]):
            # sizes are non-decreasing: a known maximum at hi bounds everything below it
            for k in range(lo + 1, hi):
                cliques[k], exact[k] = cliques[lo], exact[hi]
            exact[lo] = exact[lo] or exact[hi]
            return
        mid = (lo + hi) // 2
        solve(mid, cliques[lo], len(cliques[hi]) if exact[hi] else n)
        fill(lo, mid)
        fill(mid, hi)

    solve(0, [0], n)
    if len(graphs) > 1:
        solve(len(graphs) - 1, cliques[0], n)
        fill(0, len(graphs) - 1)
    size = {e: len(cliques[k]) for k, e in enumerate(graphs)}
    certain = {e: exact[k] for k, e in enumerate(graphs)}
    return (np.array([size[e] for e in edges.tolist()], dtype=np.int64),
            np.array([certain[e] for e in edges.tolist()], dtype=bool))
