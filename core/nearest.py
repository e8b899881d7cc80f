"""Certified nearest training images under the verdict's metric: normalised L2 at the working size.

The extraction verdict (PAPER.md) asks whether *some* training image lies within delta of a
generation, so the nearest training image must be the true nearest of the whole training set,
not the best of an embedding's top-k: templated images (same layout and colours, different
detail) agree after pooling and crowd a true copy out of any fixed top-k. This module finds
it by filter and refine (as in GEMINI):

Lower bound. Area pooling an S x S image to s x s (``core.embed.area_matrix``) takes weighted
means whose weights sum to 1 per output pixel, and every input pixel's weights sum to
(s / S)^2 over the output pixels (each input pixel is split among them). By Jensen's
inequality, (sum_j w_ij x_j)^2 <= sum_j w_ij x_j^2, so summing over output pixels,
|A x|^2 <= (s / S)^2 |x|^2, that is::

    l2_s(pool(a), pool(b)) <= l2_S(a, b)         (normalised L2 at each size)

The bound holds only when both sides are pooled from the very arrays the exact distance
reads: training images are pooled here from their working-size arrays
(``core.images.load_working``), as the queries are.

Search. Bounds at a coarse size (4 x 4) for the whole training set, then at a fine size
(16 x 16) for the images the coarse bound cannot rule out, then exact distances in order of
the fine bound, a chunk at a time; the search stops when the k-th smallest exact distance is
at most every bound not yet measured (no unmeasured image can then be nearer). Bounds are
computed by matrix products in float32 and lowered by a rigorous rounding margin
(gamma_n (|q| + |t|)^2 on the squared distance, n the dimension), so a rounding error can
only cost an extra exact distance, never a wrong answer.

Budget. A generation may compute at most ``budget`` exact distances (setting
``nearest_budget``). When the budget stops a search, the answer is the best found and is
marked not certified, with ``lower``, a lower bound of the true k-th nearest distance.

Training pooled vectors are cached per working size in ``WS/index/pooled-<S>.npz`` (derived
data, rebuilt for training images added or removed); working-size training pixels for the
exact distances are decoded on demand and kept in a bounded cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import tempfiles
from .store import Workspace

COARSE = 4  # side of the coarse pooled images (whole training set)
FINE = 16  # side of the fine pooled images (survivors of the coarse bound)
CACHE_BYTES = 2 << 30  # working-size training pixels kept decoded
QUERY_BLOCK_BYTES = 256 << 20  # float32 bytes of one block of coarse bounds (queries x training)
FIRST_CHUNK = 8  # exact distances per generation in the first refine round (doubling after)
_U = 2.0 ** -24


@dataclass
class Nearest:
    """The nearest training images of a batch of generations (rows), nearest first."""
    ids: np.ndarray  # (Q, m) int64 training ids, by exact l2 then id; m = max(k, show) or fewer
    l2: np.ndarray  # (Q, m) float32 exact normalised L2 at the working size
    certified: np.ndarray  # (Q,) bool: ids[:, :k] are certainly the k nearest of the whole training set
    lower: np.ndarray  # (Q,) float32: a lower bound of the true k-th nearest distance (= l2[:, k-1] when certified)
    exact_count: np.ndarray  # (Q,) int32: exact distances computed
    pooled: np.ndarray  # (Q, m) float32: normalised L2 of the fine pooled images (a lower bound of l2)


def pool(images: np.ndarray, side: int, chunk: int = 16) -> np.ndarray:
    """(N, S, S, C) float images -> (N, side * side * C) float64 area means scaled by 1/sqrt(dim):
    the Euclidean distance of two rows is the normalised L2 of the pooled images.
    Computed in float64, ``chunk`` images at a time."""
    n, s, c = images.shape[0], images.shape[1], images.shape[3]
    side = min(side, s)
    dim = side * side * c
    out = np.empty((n, side, side, c), np.float64)
    a = None
    if s % side:
        from .embed import area_matrix

        a = area_matrix(s, side)
    for start in range(0, n, chunk):
        x = np.asarray(images[start:start + chunk], dtype=np.float64)
        if a is None:  # block means: the same numbers as the area matrix, faster
            f = s // side
            out[start:start + len(x)] = x.reshape(len(x), side, f, side, f, c).mean(axis=(2, 4))
        else:
            rows = np.tensordot(a, x, axes=([1], [1]))  # (o, n, w, c)
            out[start:start + len(x)] = np.tensordot(rows, a, axes=([2], [1])).transpose(1, 0, 3, 2)
    return out.reshape(n, dim) / math.sqrt(dim)


def _bound_sq(q: np.ndarray, t: np.ndarray, qn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """Squared distances of every (query, training) pair from one float32 product, lowered by the
    product's worst-case rounding error, so never above the true value: (Q, T) float32 >= 0."""
    dim = q.shape[1]
    gamma = (dim + 8) * _U / (1 - (dim + 8) * _U) * 2.0  # inputs rounded to float32 too: twice the bound
    d2 = qn[:, None] ** 2 + tn[None, :] ** 2 - 2.0 * (q @ t.T)
    margin = gamma * (qn[:, None] + tn[None, :]) ** 2
    return np.maximum(d2 - margin, 0.0)


class TrainingPyramid:
    """Pooled working-size vectors of every training image, and their pixels on demand."""

    def __init__(self, ws: Workspace, size: int, paths: dict[int, str], ids: np.ndarray, coarse: np.ndarray,
                 fine: np.ndarray):
        self.ws, self.size, self.paths = ws, size, paths
        self.ids = ids
        self.coarse, self.fine = coarse, fine
        self.coarse_norm = np.linalg.norm(coarse, axis=1).astype(np.float32)
        self.fine_norm = np.linalg.norm(fine, axis=1).astype(np.float32)
        self._pixels: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep = max(16, CACHE_BYTES // (size * size * 3 * 4))

    @classmethod
    def load(cls, ws: Workspace, size: int, paths: dict[int, str], progress=None) -> "TrainingPyramid":
        """The pyramid of the workspace's training images (``paths``: id -> relative path) at ``size``,
        from the cache file where it holds them, pooling (and decoding) only the others."""
        ids = np.asarray(sorted(paths), dtype=np.int64)
        cache = ws.root / "index" / f"pooled-{size}.npz"
        dims = (3 * min(COARSE, size) ** 2, 3 * min(FINE, size) ** 2)
        coarse = np.zeros((len(ids), dims[0]), np.float32)
        fine = np.zeros((len(ids), dims[1]), np.float32)
        have = np.zeros(len(ids), bool)
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    old_ids, old_c, old_f = z["ids"], z["coarse"], z["fine"]
                if old_c.shape[1:] == (dims[0],) and old_f.shape[1:] == (dims[1],):
                    pos = np.searchsorted(old_ids, ids)
                    pos = np.minimum(pos, max(len(old_ids) - 1, 0))
                    have = (old_ids[pos] == ids) if len(old_ids) else have
                    coarse[have], fine[have] = old_c[pos[have]], old_f[pos[have]]
            except (OSError, ValueError, KeyError):
                have[:] = False  # an unreadable cache is rebuilt
        self = cls(ws, size, paths, ids, coarse, fine)
        missing = np.flatnonzero(~have)
        block = 64
        for start in range(0, len(missing), block):
            rows = missing[start:start + block]
            pixels = self.pixels(ids[rows], keep=False)
            coarse[rows] = pool(pixels, COARSE)
            fine[rows] = pool(pixels, FINE)
            if progress:
                progress("pool training", start + len(rows), len(missing))
        if len(missing) or (cache.is_file() and len(ids) != int(have.sum())) or not cache.is_file():
            self.coarse_norm = np.linalg.norm(coarse, axis=1).astype(np.float32)
            self.fine_norm = np.linalg.norm(fine, axis=1).astype(np.float32)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tempfiles.remove_stale(cache.parent)
            with tempfiles.atomic_path(cache, ".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, ids=ids, coarse=coarse, fine=fine)
        return self

    def pixels(self, ids: np.ndarray, keep: bool = True) -> np.ndarray:
        """Working-size arrays (len(ids), S, S, 3) float32 of training images by id."""
        from .images import load_working

        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        out = np.empty((len(ids), self.size, self.size, 3), np.float32)
        todo = []
        for k, i in enumerate(ids):
            a = self._pixels.get(i)
            if a is None:
                todo.append(k)
            else:
                self._pixels.move_to_end(i)
                out[k] = a

        def one(k: int) -> None:
            out[k] = load_working(self.ws.resolve(self.paths[ids[k]]), self.size)

        if todo:
            with ThreadPoolExecutor(max_workers=4) as pool_:
                list(pool_.map(one, todo))
            if keep:
                for k in todo:
                    self._pixels[ids[k]] = out[k]
                while len(self._pixels) > self._keep:
                    self._pixels.popitem(last=False)
        return out


def certified_nearest(queries: np.ndarray, pyramid: TrainingPyramid, k: int, *, show: int = 0,
                      budget: int = 5000) -> Nearest:
    """The k nearest training images of each query (certified: see the module docstring), and up to
    ``show`` nearest of the images measured (at least k), by exact normalised L2 at the working size.

    ``queries``: (Q, S, S, 3) float32 working-size arrays (S = the pyramid's size).
    """
    from .distances import paired_distances_grids

    q_n = len(queries)
    n = len(pyramid.ids)
    k = max(1, min(k, n))
    m = max(k, min(show, n))
    budget = max(int(budget), m)  # the shown neighbours are always measured
    if q_n == 0 or n == 0:
        z = np.zeros((q_n, 0))
        return Nearest(z.astype(np.int64), z.astype(np.float32), np.ones(q_n, bool), np.zeros(q_n, np.float32),
                       np.zeros(q_n, np.int32), z.astype(np.float32))
    qc = pool(queries, COARSE).astype(np.float32)
    qf = pool(queries, FINE).astype(np.float32)
    qcn, qfn = np.linalg.norm(qc, axis=1), np.linalg.norm(qf, axis=1)

    # per query: candidate rows (into pyramid.ids) with their fine bounds, ascending
    cand_rows: list[np.ndarray] = [np.zeros(0, np.int64)] * q_n
    cand_lb: list[np.ndarray] = [np.zeros(0, np.float32)] * q_n
    measured: list[dict[int, float]] = [dict() for _ in range(q_n)]
    ub = np.full(q_n, np.inf)  # the k-th smallest exact distance so far

    def measure(pairs: list[tuple[int, np.ndarray]]) -> None:
        """Exact distances of (query, training rows) pairs, all queries at once."""
        qi = np.concatenate([np.full(len(r), q, np.int64) for q, r in pairs])
        rows = np.concatenate([r for _, r in pairs])
        uniq, inv = np.unique(rows, return_inverse=True)
        train = pyramid.pixels(pyramid.ids[uniq])
        l2, _ = paired_distances_grids(queries, train, (1,), ia=qi, ib=inv.reshape(-1))
        l2 = l2.cpu().numpy().astype(np.float64)
        for q_, r_, d_ in zip(qi.tolist(), rows.tolist(), l2.tolist()):
            measured[q_][r_] = d_
        for q_ in set(qi.tolist()):
            ds = sorted(measured[q_].values())
            ub[q_] = ds[k - 1] if len(ds) >= k else np.inf

    # 1. coarse bounds for the whole training set, a block of queries at a time; the first few
    #    images by coarse bound are measured at once, so that the bound has something to beat
    first = min(n, max(m, min(FIRST_CHUNK, budget)))
    block = max(1, QUERY_BLOCK_BYTES // (4 * n))
    for start in range(0, q_n, block):
        qs = np.arange(start, min(q_n, start + block))
        lb = np.sqrt(_bound_sq(qc[qs], pyramid.coarse, qcn[qs], pyramid.coarse_norm))
        top = np.argpartition(lb, first - 1, axis=1)[:, :first] if first < n else np.tile(np.arange(n), (len(qs), 1))
        measure([(int(q), top[i].astype(np.int64)) for i, q in enumerate(qs)])
        for i, q in enumerate(qs):
            q = int(q)
            rows = np.flatnonzero(lb[i] < ub[q])
            rows = rows[~np.isin(rows, list(measured[q]))]
            if len(rows):
                # 2. fine bounds for the coarse survivors
                f2 = _bound_sq(qf[q:q + 1], pyramid.fine[rows], qfn[q:q + 1], pyramid.fine_norm[rows])[0]
                flb = np.sqrt(f2)
                keep = flb < ub[q]
                rows, flb = rows[keep], flb[keep]
                order = np.argsort(flb, kind="stable")
                cand_rows[q], cand_lb[q] = rows[order], flb[order].astype(np.float32)

    # 3. refine: exact distances in fine-bound order, a doubling chunk per round, until no unmeasured
    #    candidate's bound is below the k-th exact distance, or the budget is spent
    pos = np.zeros(q_n, np.int64)
    chunk = FIRST_CHUNK
    while True:
        pairs = []
        for q in range(q_n):
            rows, lbs, p = cand_rows[q], cand_lb[q], int(pos[q])
            if p >= len(rows) or lbs[p] >= ub[q]:
                continue
            room = budget - len(measured[q])
            if room <= 0:
                continue
            take = min(chunk, room)
            end = p + take
            # within a chunk, stop at the first bound that the current k-th distance already beats
            cut = int(np.searchsorted(lbs[p:end], ub[q], side="left"))
            end = p + max(cut, 1)
            pairs.append((q, rows[p:end]))
            pos[q] = end
        if not pairs:
            break
        measure(pairs)
        chunk = min(chunk * 2, 1024)

    ids = np.zeros((q_n, m), np.int64)
    l2 = np.full((q_n, m), np.inf, np.float32)
    certified = np.zeros(q_n, bool)
    lower = np.zeros(q_n, np.float32)
    count = np.zeros(q_n, np.int32)
    got = 0
    for q in range(q_n):
        items = sorted(measured[q].items(), key=lambda kv: (kv[1], int(pyramid.ids[kv[0]])))[:m]
        got = max(got, len(items))
        for j, (r, d) in enumerate(items):
            ids[q, j], l2[q, j] = pyramid.ids[r], d
        count[q] = len(measured[q])
        rows, lbs, p = cand_rows[q], cand_lb[q], int(pos[q])
        pending = lbs[p:][~np.isin(rows[p:], list(measured[q]))] if p < len(rows) else lbs[:0]
        next_bound = float(pending.min()) if len(pending) else np.inf
        certified[q] = next_bound >= ub[q]
        lower[q] = min(float(ub[q]), next_bound)
    pooled = np.zeros_like(l2)
    if m:
        rows = np.searchsorted(pyramid.ids, ids)
        diff = qf[:, None, :].astype(np.float64) - pyramid.fine[rows].astype(np.float64)
        pooled = np.sqrt((diff ** 2).sum(axis=2)).astype(np.float32)
    return Nearest(ids, l2, certified, lower, count, pooled)


def measured_fraction(result: Nearest, training: int) -> float:
    """Exact distances computed as a fraction of brute force (every generation against every image)."""
    return float(result.exact_count.sum()) / max(1, len(result.exact_count) * training)


def describe(certified: Sequence[bool]) -> str:
    c = np.asarray(certified, bool)
    return f"{int(c.sum())} of {len(c)} certified"
