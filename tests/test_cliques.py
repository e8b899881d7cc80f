"""core.cliques: exact maximum clique against brute force, groups, curves, the budget guard, input errors."""

from __future__ import annotations

import itertools
import math
import warnings

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from core import config
from core.cliques import (
    TIE_LIMIT, CliqueBudgetExceeded, CliqueBudgetWarning, clique_curve, clique_groups, largest_clique_curve, maximum_clique,
)
from core.errors import InputError, MemauditError
from core.records import CliqueGroup


def random_graph(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    a = np.triu(rng.random((n, n)) < p, 1)
    return a | a.T


def random_distances(rng: np.random.Generator, n: int, decimals: int = 2) -> np.ndarray:
    """Symmetric distances with a zero diagonal, rounded so that ties are common."""
    d = np.round(rng.random((n, n)), decimals)
    d = np.triu(d, 1)
    return (d + d.T).astype(np.float32)


def all_cliques_brute(adj: np.ndarray) -> list[list[int]]:
    """Every maximum clique by trying every subset, largest sizes first (n <= 12)."""
    n = len(adj)
    for k in range(n, 0, -1):
        found = [list(c) for c in itertools.combinations(range(n), k)
                 if all(adj[i, j] for i, j in itertools.combinations(c, 2))]
        if found:
            return found
    return [[]]


def mean_distance(d: np.ndarray, members: list[int]) -> float:
    """Mean over pairs, from the correctly rounded sum (so that equal sums tie exactly)."""
    pairs = list(itertools.combinations(members, 2))
    return math.fsum(float(d[i, j]) for i, j in pairs) / len(pairs) if pairs else 0.0


def groups_brute(d: np.ndarray, tau: float, min_size: int, max_groups: int) -> list[list[int]]:
    """The definition with networkx: remove the tie-broken maximum clique, repeat."""
    adj = d <= tau
    np.fill_diagonal(adj, False)
    remaining = list(range(len(d)))
    out: list[list[int]] = []
    while len(out) < max_groups and len(remaining) >= min_size:
        g = nx.from_numpy_array(adj[np.ix_(remaining, remaining)].astype(int))
        cliques = [sorted(remaining[i] for i in c) for c in nx.find_cliques(g)]
        omega = max(len(c) for c in cliques)
        if omega < min_size:
            break
        best = min((c for c in cliques if len(c) == omega), key=lambda c: (mean_distance(d, c), c))
        out.append(best)
        remaining = [r for r in remaining if r not in best]
    return out


# ---------------------------------------------------------------------------- maximum clique
def test_maximum_clique_against_subsets_on_many_small_graphs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 12))
        adj = random_graph(rng, n, float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])))
        want = min(all_cliques_brute(adj)) if n else []
        assert maximum_clique(adj) == want


def test_maximum_clique_against_networkx_on_larger_graphs():
    rng = np.random.default_rng(1)
    for _ in range(60):
        p = float(rng.choice([0.05, 0.2, 0.5, 0.8, 0.95]))
        n = int(rng.integers(12, 36 if p > 0.9 else 60))  # networkx lists every maximal clique: keep it quick
        adj = random_graph(rng, n, p)
        cliques = [sorted(c) for c in nx.find_cliques(nx.from_numpy_array(adj.astype(int)))]
        omega = max(len(c) for c in cliques)
        assert maximum_clique(adj) == min(c for c in cliques if len(c) == omega)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 10).flatmap(lambda n: st.lists(st.booleans(), min_size=n * n, max_size=n * n).map(
    lambda bits: np.array(bits, dtype=bool).reshape(n, n))))
def test_maximum_clique_property(m):
    adj = m | m.T
    clique = maximum_clique(adj)
    assert clique == sorted(clique)
    assert all(adj[i, j] for i, j in itertools.combinations(clique, 2))  # a clique (the diagonal is ignored)
    assert len(clique) == max(len(c) for c in all_cliques_brute(adj & ~np.eye(len(adj), dtype=bool)))


def test_maximum_clique_accepts_0_1_integers_and_ignores_the_diagonal():
    adj = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    assert maximum_clique(adj) == [0, 1]
    assert maximum_clique(np.eye(3, dtype=bool)) == [0]


def test_colouring_is_a_partition_into_independent_sets():
    """The colour bound is only valid if the classes (re-numbering included) are independent sets."""
    from core.cliques import _Graph

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        adj = random_graph(rng, n, float(rng.choice([0.2, 0.5, 0.8, 0.95])))
        g = _Graph(adj, np.arange(n))
        p = int(rng.integers(1, 2 ** n)) if n < 63 else g.full
        kmin = int(rng.integers(0, 8))
        low, order, colours = g.partition(p, kmin)
        high = {}
        for v, c in zip(order, colours):
            high.setdefault(c, []).append(v)
        assert len(low) <= kmin and all(c > kmin for c in colours) and colours == sorted(colours)
        classes = [[v for v in range(n) if m >> v & 1] for m in low] + list(high.values())
        members = sorted(v for cls in classes for v in cls)
        assert members == [v for v in range(n) if p >> v & 1]  # every vertex of p once
        for cls in classes:
            assert not any(adj[i, j] for i, j in itertools.combinations(cls, 2))


def test_clique_beside_a_denser_part_with_higher_core_numbers():
    """A 6-clique whose core numbers (5) are below those of a random part without a 6-clique."""
    rng = np.random.default_rng(8)
    dense = random_graph(rng, 60, 0.3)
    assert max(len(c) for c in nx.find_cliques(nx.from_numpy_array(dense.astype(int)))) < 6
    adj = np.zeros((66, 66), bool)
    adj[:60, :60] = dense
    adj[60:, 60:] = True
    np.fill_diagonal(adj, False)
    assert max(nx.core_number(nx.from_numpy_array(adj.astype(int))).values()) > 5
    assert maximum_clique(adj) == list(range(60, 66))
    assert largest_clique_curve(np.where(adj, 0.05, 0.5), [0.1]).tolist() == [6]


# ---------------------------------------------------------------------------- groups
def test_group_records_hand_computed():
    # 0-1-2 a triangle with distances 0.01, 0.02, 0.05; 3 linked to nothing
    d = np.array([[0, 0.01, 0.02, 0.9],
                  [0.01, 0, 0.05, 0.9],
                  [0.02, 0.05, 0, 0.9],
                  [0.9, 0.9, 0.9, 0]], dtype=np.float32)
    groups = clique_groups(d, 0.1, 1, 10)
    assert groups[0] == CliqueGroup((0, 1, 2), 0, pytest.approx((0.01 + 0.02 + 0.05) / 3))
    assert groups[0].size == 3
    # the rest: a single vertex, its own medoid, mean 0
    assert groups[1] == CliqueGroup((3,), 3, 0.0)
    assert len(groups) == 2
    assert clique_groups(d, 0.1, 2, 10) == groups[:1]
    assert clique_groups(d, 0.1, 4, 10) == []
    assert clique_groups(d, 0.1, 1, 1) == groups[:1]
    assert clique_groups(d, 0.1, 1, 0) == []
    # medoid ties go to the smaller index
    flat = np.full((3, 3), 0.05, np.float32)
    np.fill_diagonal(flat, 0)
    assert clique_groups(flat, 0.1, 2, 1)[0].medoid == 0


def test_ties_go_to_smaller_mean_distance_then_smaller_indices():
    # two disjoint triangles {0, 1, 2} and {3, 4, 5}; the second is tighter
    d = np.full((6, 6), 0.9, np.float32)
    for tri, v in (((0, 1, 2), 0.08), ((3, 4, 5), 0.02)):
        for i, j in itertools.combinations(tri, 2):
            d[i, j] = d[j, i] = v
    np.fill_diagonal(d, 0)
    groups = clique_groups(d, 0.1, 3, 5)
    assert [g.members for g in groups] == [(3, 4, 5), (0, 1, 2)]
    # equal means: the smaller indices first
    d[3, 4] = d[4, 3] = d[3, 5] = d[5, 3] = d[4, 5] = d[5, 4] = 0.08
    assert [g.members for g in clique_groups(d, 0.1, 3, 5)] == [(0, 1, 2), (3, 4, 5)]
    # edges (cliques of two): the shortest edge first
    d = np.full((4, 4), 0.9, np.float32)
    np.fill_diagonal(d, 0)
    d[0, 1] = d[1, 0] = 0.05
    d[2, 3] = d[3, 2] = 0.01
    assert [g.members for g in clique_groups(d, 0.1, 2, 5)] == [(2, 3), (0, 1)]


def test_groups_against_the_definition_on_many_random_matrices():
    rng = np.random.default_rng(2)
    for _ in range(150):
        n = int(rng.integers(1, 22))
        d = random_distances(rng, n)
        tau = float(rng.choice([0.05, 0.2, 0.35, 0.6]))
        min_size, max_groups = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        got = clique_groups(d, tau, min_size, max_groups)
        assert [list(g.members) for g in got] == groups_brute(d, tau, min_size, max_groups)
        for g in got:
            assert g.mean_distance == pytest.approx(mean_distance(d, list(g.members)), abs=1e-6)
            sums = [math.fsum(float(d[m, o]) for o in g.members if o != m) for m in g.members]
            assert g.medoid == g.members[int(np.argmin(sums))]


def test_planted_cliques_are_found_exactly():
    rng = np.random.default_rng(3)
    n = 500
    d = random_distances(rng, n, 4) * 0.8 + 0.2  # background: nothing within tau
    background = np.triu(rng.random((n, n)) < 0.02, 1)
    d[background | background.T] = 0.08  # 2% random edges
    np.fill_diagonal(d, 0)
    perm = rng.permutation(n)
    big, small = np.sort(perm[:400]), np.sort(perm[400:460])
    for members, lo in ((big, 0.02), (small, 0.01)):
        block = 0.05 * rng.random((len(members), len(members))) + lo
        block = np.triu(block, 1)
        d[np.ix_(members, members)] = block + block.T
    groups = clique_groups(d, 0.1, 3, 10)
    assert groups[0].members == tuple(big)
    assert groups[1].members == tuple(small)
    assert all(g.size < 10 for g in groups[2:])
    assert largest_clique_curve(d, [0.1]).tolist() == [400]
    adj = d <= 0.1
    assert maximum_clique(adj) == list(big)


def test_many_tied_maximum_cliques_stay_deterministic():
    """A complete 16-partite graph with parts of 3: 3^16 maximum cliques, far over TIE_LIMIT."""
    parts = np.repeat(np.arange(16), 3)
    d = np.where(parts[:, None] == parts[None, :], 0.5, 0.05).astype(np.float32)
    np.fill_diagonal(d, 0)
    first = clique_groups(d, 0.1, 2, 5)
    assert [g.size for g in first] == [16, 16, 16]
    assert sorted(m for g in first for m in g.members) == list(range(48))
    assert clique_groups(d, 0.1, 2, 5) == first
    assert 3 ** 16 > TIE_LIMIT


def test_lexicographic_tie_break_beyond_the_tie_limit():
    """K_{2,...,2} with 11 parts, vertices shuffled: 2^11 maximum cliques; the lexicographic first wins."""
    rng = np.random.default_rng(6)
    perm = rng.permutation(22)
    part = np.empty(22, int)
    part[perm] = np.arange(22) // 2
    adj = part[:, None] != part[None, :]
    cliques = [sorted(c) for c in nx.find_cliques(nx.from_numpy_array(adj.astype(int)))]
    assert len(cliques) == 2 ** 11 > TIE_LIMIT
    assert maximum_clique(adj) == min(cliques)
    # with distances: a maximum clique, the same every time
    d = np.where(adj, rng.random((22, 22)) * 0.05, 0.5).astype(np.float32)
    d = np.triu(d, 1) + np.triu(d, 1).T
    g = clique_groups(d, 0.1, 2, 1)[0]
    assert g.size == 11 and sorted(part[list(g.members)]) == list(range(11))
    assert clique_groups(d, 0.1, 2, 1)[0] == g


def test_torch_distances_are_accepted():
    d = torch.tensor([[0.0, 0.05], [0.05, 0.0]])
    assert clique_groups(d, 0.1, 2, 1)[0].members == (0, 1)


# ---------------------------------------------------------------------------- curve
def test_curve_against_networkx():
    rng = np.random.default_rng(4)
    for _ in range(60):
        n = int(rng.integers(1, 30))
        d = random_distances(rng, n)
        taus = [float(t) for t in rng.choice([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0], size=6)]
        got = largest_clique_curve(d, taus)
        for tau, size in zip(taus, got):
            adj = d <= tau
            np.fill_diagonal(adj, False)
            assert size == max(len(c) for c in nx.find_cliques(nx.from_numpy_array(adj.astype(int))))
        order = np.argsort(taus, kind="stable")
        assert np.all(np.diff(got[order]) >= 0)
    # tau compares as `dist <= tau` does, in dist's precision: a stored 0.3 is within tau = 0.3
    d32 = np.array([[0, 0.3, 0.3], [0.3, 0, 0.3], [0.3, 0.3, 0]], np.float32)
    assert largest_clique_curve(d32, [0.3, 0.29]).tolist() == [3, 1]
    assert clique_groups(d32, 0.3, 1, 1)[0].size == 3
    assert largest_clique_curve(np.zeros((0, 0)), [0.1]).tolist() == [0]
    assert largest_clique_curve(np.zeros((3, 3)), []).tolist() == []
    assert largest_clique_curve(np.zeros((3, 3)), [-1.0, 0.0]).tolist() == [1, 3]


# ---------------------------------------------------------------------------- the guard
def dense_random(n: int = 150, p: float = 0.9, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    adj = random_graph(rng, n, p)
    d = np.where(adj, 0.05, 0.5).astype(np.float32)
    np.fill_diagonal(d, 0)
    return d


def test_budget_raises_one_clear_sentence():
    d = dense_random()
    with pytest.raises(CliqueBudgetExceeded, match=r"at tau=0\.1 exactly needs more than 50 search steps "
                                                   r"\(setting clique_node_budget\).*lower the edge threshold tau"):
        clique_groups(d, 0.1, 3, 1, budget=50)
    assert issubclass(CliqueBudgetExceeded, MemauditError)
    with pytest.raises(CliqueBudgetExceeded, match="of this graph"):
        maximum_clique(d <= 0.1, budget=50)
    with pytest.raises(CliqueBudgetExceeded, match="at tau=0.1"):
        largest_clique_curve(d, [0.01, 0.1], budget=50)


def test_budget_best_warns_and_returns_a_clique():
    d = dense_random()
    adj = d <= 0.1
    with pytest.warns(CliqueBudgetWarning, match="using the largest clique found so far"):
        groups = clique_groups(d, 0.1, 3, 2, budget=50, on_budget="best")
    assert len(groups) == 2
    for g in groups:
        assert all(adj[i, j] for i, j in itertools.combinations(g.members, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = maximum_clique(dense_random(40, 0.5) <= 0.1)  # small: well within the default budget
    assert len(exact) >= 3


def test_budget_mark_flags_lower_bounds_silently():
    d = dense_random(100, 0.5)  # solved exactly within the default budget, not within 50 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = clique_groups(d, 0.1, 3, 2, budget=50, on_budget="mark")
        sizes, exact = clique_curve(d, [0.01, 0.1], budget=50)
    assert groups and not groups[0].exact  # the budget stopped the search: the size is a lower bound
    truth = len(maximum_clique(d <= 0.1))
    assert groups[0].size <= truth
    assert sizes[1] <= truth and not exact[1]
    assert sizes[0] == 1 and exact[0]  # no edge at 0.01: solved within any budget
    # with the default budget the same graph is solved exactly, and says so
    groups = clique_groups(d, 0.1, 3, 2, on_budget="mark")
    assert groups[0].exact and groups[0].size == truth
    assert clique_curve(d, [0.1])[1].tolist() == [True]


def test_curve_budget_is_per_graph_not_shared():
    """Many easy graphs must not use up one shared budget: each distinct graph has its own."""
    rng = np.random.default_rng(3)
    n = 120
    d = rng.uniform(0.2, 1.0, (n, n)).astype(np.float32)
    d = np.minimum(d, d.T)
    members = rng.choice(n, 40, replace=False)
    d[np.ix_(members, members)] = rng.uniform(0.0, 0.1, (40, 40))
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, 0)
    taus = np.round(np.arange(0.0, 0.3001, 0.005), 4)
    full, full_exact = clique_curve(d, taus)
    # find the smallest budget that solves every graph alone; the curve with it must be exact everywhere
    per_graph = 1
    for t in taus:
        while not clique_groups(d, float(t), 1, 1, budget=per_graph, on_budget="mark")[0].exact:
            per_graph *= 2
    sizes, exact = clique_curve(d, taus, budget=per_graph * 4)
    assert exact.all() and full_exact.all()
    assert sizes.tolist() == full.tolist()


def test_budget_setting_is_declared():
    s = config.SETTINGS["clique_node_budget"]
    assert s.default >= 100_000 and "tau" in s.help
    with pytest.raises(ValueError, match="clique_node_budget must be >= 1"):
        clique_groups(np.zeros((2, 2)), 0.1, 1, 1, budget=0)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("dist, message", [
    (np.zeros((2, 3)), r"dist must be a square \(n, n\) matrix of distances, got shape \(2, 3\)"),
    (np.array([[0, np.nan], [np.nan, 0]]), "dist contains NaN"),
    (np.array([[0, -0.1], [-0.1, 0]]), "dist must hold distances >= 0"),
    (np.array([[0, 0.1], [0.2, 0]]), "dist must be symmetric"),
    (np.array([["a", "b"], ["c", "d"]]), "dist must hold numbers"),
])
def test_bad_distances_raise(dist, message):
    with pytest.raises(InputError, match=message):
        clique_groups(dist, 0.1, 1, 1)
    with pytest.raises(InputError, match=message):
        largest_clique_curve(dist, [0.1])


def test_bad_arguments_raise():
    d = np.zeros((3, 3))
    with pytest.raises(InputError, match="min_size must be an integer >= 1, got 0"):
        clique_groups(d, 0.1, 0, 1)
    with pytest.raises(InputError, match="max_groups must be an integer >= 0, got -1"):
        clique_groups(d, 0.1, 1, -1)
    with pytest.raises(InputError, match="tau must be a number, got 'x'"):
        clique_groups(d, "x", 1, 1)
    with pytest.raises(InputError, match="tau must be a number"):
        largest_clique_curve(d, [float("nan")])
    with pytest.raises(InputError, match="on_budget must be 'raise', 'best' or 'mark'"):
        clique_groups(d, 0.1, 1, 1, on_budget="ignore")
    with pytest.raises(InputError, match=r"adj must be a square \(n, n\) matrix"):
        maximum_clique(np.zeros(3, bool))
    with pytest.raises(InputError, match="adj must be symmetric"):
        maximum_clique(np.triu(np.ones((3, 3), bool), 1))
    with pytest.raises(InputError, match="adj must hold booleans"):
        maximum_clique(np.full((2, 2), 0.5))
