"""Cliques at the paper's scale: 500 generations per prompt, realistic and adversarial graphs.

Each case is a symmetric distance matrix over 500 vertices (``--smoke``: 60); the
graph at tau = 0.1 links pairs with distance <= 0.1. Unrelated pairs get
distances uniform in [0.15, 0.6] unless stated. Timed per prompt (best of 3):

* ``maximum_clique`` of the graph at tau = 0.1;
* ``clique_groups(dist, 0.1, 3, 10)``: what the audit stores per prompt;
* ``largest_clique_curve`` over the audit's 61 taus 0, 0.005, ..., 0.3 (at high
  tau the unrelated pairs start to link too, so this is the heavier part), each distinct
  graph with its own budget; ``curve_exact`` says whether the audit's curve
  (``clique_curve``, which marks a budget-stopped point as a lower bound) is exact at
  every tau, ``exact_taus`` at how many.

Cases: no close pairs (most prompts); sparse random edges (1% and 5% of pairs);
a planted 400-clique (a memorised prompt) with 1% random edges; two planted
cliques (250 + 150); 400 noisy copies of one image whose own distances straddle
tau. Copies are modelled as points c + s_i g_i (g_i standard normal in 64-d, s_i
uniform), so d_ij^2 ~ s_i^2 + s_j^2 as for images with independent noise; the
planted cliques' copies are all within 0.099. Adversarial cases: a 400-clique
with independent uniform distances in [0.02, 0.08] inside (at tau between them,
a dense random graph of 400 vertices: the hardest kind for exact search), the
same missing 20 disjoint edges at tau = 0.1 (2^20 maximum cliques to break a
tie between), a complete 25-partite graph with parts of 3 (3^25 maximum
cliques), a dense random cluster (120 vertices, 90% of pairs linked), and a
dense random graph over all 500 vertices (half the pairs linked). Where the
node budget (setting clique_node_budget, default) stops a search, the table
says so and the time to stop is shown.

    python -m benchmarks.bench_cliques [--smoke]
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from benchmarks.common import cli, print_table, timeit, write_json
from core import config
from core.curves import TAU_GRID
from core.cliques import CliqueBudgetExceeded, clique_curve, clique_groups, largest_clique_curve, maximum_clique

TAU = 0.1
TAUS = TAU_GRID


def symmetric(d: np.ndarray) -> np.ndarray:
    d = np.triu(d, 1)
    return (d + d.T).astype(np.float32)


def unrelated(rng: np.random.Generator, n: int) -> np.ndarray:
    return symmetric(rng.uniform(0.15, 0.6, (n, n)))


def sparse(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    d = unrelated(rng, n)
    linked = symmetric(rng.random((n, n)) < p) > 0
    return np.where(linked, symmetric(rng.uniform(0.0, TAU, (n, n))), d)


def copies(rng: np.random.Generator, k: int, lo: float, hi: float, dim: int = 64) -> np.ndarray:
    """Distances between k copies of one image: points c + s_i g_i (g_i standard normal in dim-d,
    s_i uniform in [lo, hi]), scaled so that d_ij^2 ~ s_i^2 + s_j^2 (what noisy copies give)."""
    x = rng.standard_normal((k, dim)) * rng.uniform(lo, hi, (k, 1))
    sq = (x * x).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) / dim)
    return symmetric(d)


def planted(rng: np.random.Generator, n: int, sizes: list[int], p: float = 0.01, iid: bool = False) -> np.ndarray:
    """Cliques at tau = 0.1 over sparse random edges. Inside a clique the distances are those of
    noisy copies (at most 0.099), or with ``iid`` independent uniform in [0.02, 0.08]."""
    d = sparse(rng, n, p)
    perm = rng.permutation(n)
    start = 0
    for k in sizes:
        m = perm[start:start + k]
        start += k
        inside = symmetric(rng.uniform(0.02, 0.08, (k, k))) if iid else np.minimum(copies(rng, k, 0.01, 0.06), 0.099)
        np.fill_diagonal(inside, 0)
        d[np.ix_(m, m)] = inside
    return d


def noisy_copies(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k copies whose own distances straddle tau = 0.1, among unrelated images."""
    d = unrelated(rng, n)
    d[:k, :k] = copies(rng, k, 0.02, 0.11)
    np.fill_diagonal(d, 0)
    return d


def missing_edges(rng: np.random.Generator, n: int, k: int, holes: int) -> np.ndarray:
    d = planted(rng, n, [k], p=0.0, iid=True)
    members = np.flatnonzero((d <= TAU).sum(1) >= k - 2)
    for a, b in members[: 2 * holes].reshape(-1, 2):
        d[a, b] = d[b, a] = 0.2
    return d


def multipartite(rng: np.random.Generator, n: int, parts: int, size: int) -> np.ndarray:
    d = unrelated(rng, n)
    m = rng.permutation(n)[: parts * size]
    label = np.arange(parts * size) // size
    block = np.where(label[:, None] == label[None, :], 0.5, 0.05)
    d[np.ix_(m, m)] = symmetric(block)
    return d


def dense_cluster(rng: np.random.Generator, n: int, k: int, p: float) -> np.ndarray:
    d = unrelated(rng, n)
    m = rng.permutation(n)[:k]
    d[np.ix_(m, m)] = symmetric(np.where(rng.random((k, k)) < p, 0.05, 0.2))
    return d


def cases(n: int) -> list[tuple[str, Callable[[np.random.Generator], np.ndarray], str]]:
    s = n / 500
    big, a, b = int(400 * s), int(250 * s), int(150 * s)
    parts = min(25, n // 3)
    holes = min(20, big // 4)
    return [
        ("no close pairs", lambda r: unrelated(r, n), "typical"),
        ("random edges, 1% of pairs", lambda r: sparse(r, n, 0.01), "typical"),
        ("random edges, 5% of pairs", lambda r: sparse(r, n, 0.05), "stress"),
        (f"planted {big}-clique + 1% edges", lambda r: planted(r, n, [big]), "typical"),
        (f"two planted cliques {a} + {b}", lambda r: planted(r, n, [a, b]), "typical"),
        (f"{big} noisy copies (geometric)", lambda r: noisy_copies(r, n, big), "typical"),
        (f"{big}-clique missing {holes} edges", lambda r: missing_edges(r, n, big, holes), "adversarial"),
        (f"{big}-clique, iid distances inside", lambda r: planted(r, n, [big], iid=True), "adversarial"),
        (f"complete {parts}-partite, parts of 3", lambda r: multipartite(r, n, parts, 3), "adversarial"),
        (f"dense random cluster {int(120 * s)} at 90%", lambda r: dense_cluster(r, n, int(120 * s), 0.9),
         "adversarial"),
        (f"dense random graph {n} at 50%", lambda r: dense_cluster(r, n, n, 0.5), "guard"),
    ]


def attempt(fn: Callable[[], object], repeat: int) -> tuple[object, float, str | None]:
    """(result, best seconds, None), or (None, seconds until the budget stopped it, message)."""
    start = time.perf_counter()
    try:
        value = fn()
    except CliqueBudgetExceeded as e:
        return None, time.perf_counter() - start, str(e)
    best = time.perf_counter() - start
    if repeat > 1:
        best = min(best, timeit(fn, repeat=repeat - 1, warmup=0)["best_s"])
    return value, best, None


def measure(name: str, dist: np.ndarray, kind: str, repeat: int) -> dict:
    adj = dist <= TAU
    np.fill_diagonal(adj, False)
    row: dict = {"case": name, "kind": kind, "n": len(dist), "edges_at_0.1": int(adj.sum()) // 2}
    stopped = []
    for key, fn in (("max_clique", lambda: maximum_clique(adj)),
                    ("groups", lambda: clique_groups(dist, TAU, 3, 10)),
                    ("curve", lambda: largest_clique_curve(dist, TAUS))):
        value, seconds, message = attempt(fn, repeat)
        if message:
            row[f"{key}_ms"] = f"budget ({seconds:.1f} s)"
            stopped.append(f"{key}: {message}")
            continue
        row[f"{key}_ms"] = seconds * 1e3
        if key == "max_clique":
            row["omega"] = len(value)
        elif key == "groups":
            row["groups"] = [g.size for g in value]
        else:
            row["curve_at_0.1_0.2_0.3"] = [int(value[np.searchsorted(TAUS, x)]) for x in (0.1, 0.2, 0.3)]
    start = time.perf_counter()
    _, exact = clique_curve(dist, TAUS, on_budget="mark")
    row["audit_curve_ms"] = (time.perf_counter() - start) * 1e3
    row["curve_exact"], row["exact_taus"] = bool(exact.all()), f"{int(exact.sum())}/{len(exact)}"
    if not stopped:
        row["per_prompt_ms"] = row["groups_ms"] + row["curve_ms"]
    row["stopped"] = stopped
    return row


def run(n: int, repeat: int) -> dict:
    rows = []
    for i, (name, make, kind) in enumerate(cases(n)):
        dist = make(np.random.default_rng(i))
        rows.append(measure(name, dist, kind, repeat))
    print_table(rows, ["case", "kind", "edges_at_0.1", "omega", "groups", "max_clique_ms", "groups_ms", "curve_ms",
                       "per_prompt_ms", "curve_at_0.1_0.2_0.3", "exact_taus"],
                f"cliques on {n} vertices (tau = {TAU}; curve over {len(TAUS)} taus)")
    for r in rows:
        for line in r["stopped"]:
            print(f"{r['case']}: {line}")
    summary = {kind: max((r[k] for r in rows if r["kind"] == kind for k in ("max_clique_ms", "groups_ms")
                          if isinstance(r.get(k), float)), default=None)
               for kind in ("typical", "stress", "adversarial", "guard")}
    print("slowest maximum_clique or clique_groups call (ms): "
          + ", ".join(f"{k} {v:.0f}" for k, v in summary.items() if v is not None))
    inexact = [r["case"] for r in rows if r["kind"] != "guard" and not r["curve_exact"]]
    print(f"cases (guard excepted) whose audit curve hit the budget at some tau: {len(inexact)}"
          + (f" ({', '.join(inexact)})" if inexact else "") + "\n")
    return {"n": n, "tau": TAU, "taus": len(TAUS), "budget": config.default("clique_node_budget"),
            "rows": rows, "slowest_ms": summary, "inexact_curves": inexact}


def main(smoke: bool = False) -> dict:
    result = run(60, 1) if smoke else run(500, 3)
    write_json("cliques", smoke, result)
    return result


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
