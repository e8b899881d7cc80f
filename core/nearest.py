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

Search. Bounds at a coarse size (8 x 8) for the whole training set, then at a fine size
(16 x 16) for the images the coarse bound cannot rule out, then exact distances in order of
the fine bound, a chunk at a time; the search stops when the k-th smallest exact distance is
at most every bound not yet measured (no unmeasured image can then be nearer). Bounds are
computed by matrix products in float32 and lowered by a rigorous rounding margin
(gamma_n (|q| + |t|)^2 on the squared distance, n the dimension), so a rounding error can
only cost an extra exact distance, never a wrong answer.

Dense level. Where the pooled bounds cannot separate the nearest images from the rest (a
generation that copies nothing lies about as far from its nearest training images as from
thousands of others, and their differences are in the detail pooling averages away), a query
that has measured DENSE_AFTER images without being settled takes a third
bound: the full working-size distance to every training image from one float32 product, lowered
by the same rounding margin. It is tight, so the exact distances then measured are about the k
nearest; it costs one matrix product of the query against the training set (brute force's
cost, without its per-pair exact distances). It is used when the training set's working-size
pixels fit in DENSE_BYTES, held as one matrix that also serves the exact distances.

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
from typing import Callable

import numpy as np

from . import tempfiles
from .store import Workspace

COARSE = 8  # side of the coarse pooled images (whole training set; 4 x 4 let 30x more look-alikes through)
FINE = 16  # side of the fine pooled images (survivors of the coarse bound)
CACHE_BYTES = 2 << 30  # working-size training pixels kept decoded
QUERY_BLOCK_BYTES = 256 << 20  # float32 bytes of one block of coarse bounds (queries x training)
FIRST_CHUNK = 8  # exact distances per generation in the first refine round (doubling after)
STAGE = 256  # images in a query's first stage of coarse bounds (each later stage four times as many)
DENSE_BYTES = 2 << 30  # training sets whose working-size pixels fit in this are held as one matrix (the dense level)
DENSE_AFTER = 16  # exact distances after which an unsettled query takes the dense bound
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


def pool_levels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coarse, fine) pooled vectors of ``pool``; the coarse level comes from the fine one when the sizes
    nest (a block mean of equal block means is the block mean), so the images are read once."""
    s = images.shape[1]
    fine = pool(images, FINE)
    side_f, side_c = min(FINE, s), min(COARSE, s)
    if s % side_f == 0 and side_f % side_c == 0:
        c = images.shape[3]
        grid = fine.reshape(len(fine), side_f, side_f, c) * math.sqrt(side_f * side_f * c)
        return pool(grid, side_c), fine
    return pool(images, COARSE), fine


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

    def __init__(self, size: int, ids: np.ndarray, coarse: np.ndarray, fine: np.ndarray,
                 loader: Callable[[list[int]], np.ndarray]):
        """``loader(ids)``: the working-size arrays (len(ids), size, size, 3) float32 of those training ids."""
        self.size, self.loader = size, loader
        self.ids = ids
        self.coarse, self.fine = coarse, fine
        self.coarse_norm = np.linalg.norm(coarse, axis=1).astype(np.float32)
        self.fine_norm = np.linalg.norm(fine, axis=1).astype(np.float32)
        self._pixels: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep = max(16, CACHE_BYTES // (size * size * 3 * 4))
        self._dense: np.ndarray | None = None  # (n, S * S * 3) float32 working-size pixels, once built
        self._dense_norm: np.ndarray | None = None

    def dense(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole training set's working-size pixels as one (n, S * S * 3) float32 matrix and its
        row norms, built on first use; None when it would exceed DENSE_BYTES."""
        dim = self.size * self.size * 3
        if len(self.ids) * dim * 4 > DENSE_BYTES:
            return None
        if self._dense is None:
            m = np.empty((len(self.ids), dim), np.float32)
            for start in range(0, len(self.ids), 1024):
                ids = self.ids[start:start + 1024]
                m[start:start + len(ids)] = self.pixels(ids, keep=False).reshape(len(ids), dim)
            self._dense_norm = np.sqrt((m.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32) if len(m) else np.zeros(0, np.float32)
            self._dense = m
            self._pixels.clear()  # the matrix serves every later request
        return self._dense, self._dense_norm

    @classmethod
    def from_loader(cls, size: int, ids: np.ndarray, loader: Callable[[list[int]], np.ndarray],
                    block: int = 256) -> "TrainingPyramid":
        """A pyramid of training images given by ``loader`` (no cache file): for data outside a workspace."""
        ids = np.asarray(ids, dtype=np.int64)
        dims = (3 * min(COARSE, size) ** 2, 3 * min(FINE, size) ** 2)
        self = cls(size, ids, np.zeros((len(ids), dims[0]), np.float32), np.zeros((len(ids), dims[1]), np.float32), loader)
        self._pool_rows(np.arange(len(ids)), block)
        return self

    def _pool_rows(self, rows: np.ndarray, block: int, progress=None) -> None:
        for start in range(0, len(rows), block):
            r = rows[start:start + block]
            self.coarse[r], self.fine[r] = pool_levels(self.pixels(self.ids[r], keep=False))
            if progress:
                progress("pool training", start + len(r), len(rows))
        self.coarse_norm = np.linalg.norm(self.coarse, axis=1).astype(np.float32)
        self.fine_norm = np.linalg.norm(self.fine, axis=1).astype(np.float32)

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
                if old_c.shape[1:] == (dims[0],) and old_f.shape[1:] == (dims[1],) and len(old_ids) == len(old_c) == len(old_f):
                    pos = np.searchsorted(old_ids, ids)
                    pos = np.minimum(pos, max(len(old_ids) - 1, 0))
                    have = (old_ids[pos] == ids) if len(old_ids) else have
                    # a damaged row (NaN or inf would silently fail every bound test) is pooled again
                    have &= np.isfinite(old_c[pos]).all(axis=1) & np.isfinite(old_f[pos]).all(axis=1) if len(old_ids) else have
                    coarse[have], fine[have] = old_c[pos[have]], old_f[pos[have]]
            except (OSError, ValueError, KeyError):
                have[:] = False  # an unreadable cache is rebuilt
        from .images import load_working

        def loader(want: list[int]) -> np.ndarray:
            out = np.empty((len(want), size, size, 3), np.float32)

            def one(k: int) -> None:
                out[k] = load_working(ws.resolve(paths[want[k]]), size)

            with ThreadPoolExecutor(max_workers=4) as threads:
                list(threads.map(one, range(len(want))))
            return out

        self = cls(size, ids, coarse, fine, loader)
        missing = np.flatnonzero(~have)
        if len(missing):
            self._pool_rows(missing, 64, progress)
        if len(missing) or not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tempfiles.remove_stale(cache.parent)
            with tempfiles.atomic_path(cache, ".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, ids=ids, coarse=coarse, fine=fine)
        return self

    def pixels(self, ids: np.ndarray, keep: bool = True) -> np.ndarray:
        """Working-size arrays (len(ids), S, S, 3) float32 of training images by id."""
        if self._dense is not None:
            rows = np.searchsorted(self.ids, np.asarray(ids, np.int64).reshape(-1))
            return self._dense[rows].reshape(len(rows), self.size, self.size, 3)
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
        if todo:
            out[todo] = self.loader([ids[k] for k in todo])
            if keep:
                for k in todo:
                    self._pixels[ids[k]] = out[k]
                while len(self._pixels) > self._keep:
                    self._pixels.popitem(last=False)
        return out


def certified_nearest(queries: np.ndarray, pyramid: TrainingPyramid, k: int, *, show: int = 0,
                      budget: int = 5000, device: str = "cpu") -> Nearest:
    """The k nearest training images of each query (certified: see the module docstring), and up to
    ``show`` nearest of the images measured (at least k), by exact normalised L2 at the working size.

    ``queries``: (Q, S, S, 3) float32 working-size arrays (S = the pyramid's size).

    Per query the training set is taken in stages of growing coarse bound (the STAGE images of
    smallest coarse bound, then four times as many, ...): a stage's images get their fine bound
    (the larger of the two bounds is kept), and are measured exactly in order of bound, a chunk
    at a time, while their bound is below both the k-th exact distance found and the stage's edge
    (every image of a later stage has a coarse bound beyond it). The query is done when the k-th
    exact distance is at most the stage's edge and every bound measured so far.
    """
    q_n = len(queries)
    n = len(pyramid.ids)
    k = max(1, min(k, n))
    m = max(k, min(show, n))
    budget = max(int(budget), m)  # the shown neighbours are always measured
    if q_n == 0 or n == 0:
        z = np.zeros((q_n, 0))
        return Nearest(z.astype(np.int64), z.astype(np.float32), np.ones(q_n, bool), np.zeros(q_n, np.float32),
                       np.zeros(q_n, np.int32), z.astype(np.float32))
    qc, qf = (v.astype(np.float32) for v in pool_levels(queries))
    qcn, qfn = np.linalg.norm(qc, axis=1), np.linalg.norm(qf, axis=1)
    measured: list[dict[int, float]] = [dict() for _ in range(q_n)]
    lower = np.zeros(q_n, np.float32)
    certified = np.zeros(q_n, bool)
    block = max(1, QUERY_BLOCK_BYTES // (4 * n))
    for start in range(0, q_n, block):
        qs = np.arange(start, min(q_n, start + block))
        coarse = np.sqrt(_bound_sq(qc[qs], pyramid.coarse, qcn[qs], pyramid.coarse_norm))
        _search_block(queries, qs, coarse, qf, qfn, pyramid, k, m, budget, measured, lower, certified, device)

    ids = np.zeros((q_n, m), np.int64)
    l2 = np.full((q_n, m), np.inf, np.float32)
    count = np.zeros(q_n, np.int32)
    for q in range(q_n):
        items = sorted(measured[q].items(), key=lambda kv: (kv[1], int(pyramid.ids[kv[0]])))[:m]
        for j, (r, d) in enumerate(items):
            ids[q, j], l2[q, j] = pyramid.ids[r], d
        count[q] = len(measured[q])
    rows = np.searchsorted(pyramid.ids, ids)
    pooled = np.empty((q_n, m), np.float32)
    for start in range(0, q_n, 64):  # (64, m, fine dim) float64 at a time
        diff = qf[start:start + 64, None, :].astype(np.float64) - pyramid.fine[rows[start:start + 64]].astype(np.float64)
        pooled[start:start + 64] = np.sqrt((diff ** 2).sum(axis=2))
    return Nearest(ids, l2, certified, lower, count, pooled)


def _search_block(queries: np.ndarray, qs: np.ndarray, coarse: np.ndarray, qf: np.ndarray, qfn: np.ndarray,
                  pyramid: TrainingPyramid, k: int, m: int, budget: int, measured: list[dict[int, float]],
                  lower: np.ndarray, certified: np.ndarray, device: str = "cpu") -> None:
    """The staged search of ``certified_nearest`` for the queries ``qs``, whose coarse bounds are ``coarse``."""
    from .distances import paired_distances_grids

    n = coarse.shape[1]
    ub = np.full(len(qs), np.inf)  # the k-th smallest exact distance so far
    edge = np.full(len(qs), -np.inf)  # every image with coarse bound <= edge has entered the candidates
    staged = np.zeros(len(qs), np.int64)  # images entered so far (by coarse order)
    cand_rows: list[np.ndarray] = [np.zeros(0, np.int64) for _ in qs]  # entered, not measured, by bound
    cand_lb: list[np.ndarray] = [np.zeros(0, np.float32) for _ in qs]
    chunk = np.full(len(qs), FIRST_CHUNK)
    done = np.zeros(len(qs), bool)
    dense_ok = len(qs) > 0 and pyramid.size ** 2 * 3 * n * 4 <= DENSE_BYTES
    switched = np.zeros(len(qs), bool)

    def densify(waiting: np.ndarray) -> None:
        """Queries ``waiting`` take the dense bound: every image not measured yet is a candidate,
        by the larger of its coarse and full working-size bounds."""
        t, tn = pyramid.dense()
        dim = t.shape[1]
        for start in range(0, len(waiting), 64):
            part = waiting[start:start + 64]
            qv = queries[qs[part]].reshape(len(part), dim).astype(np.float32)
            qn = np.sqrt((qv.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
            full = np.sqrt(_bound_sq(qv, t, qn, tn) / dim)
            for j, i in enumerate(part.tolist()):
                seen = np.fromiter(measured[int(qs[i])].keys(), np.int64)
                rows = np.setdiff1d(np.arange(n), seen, assume_unique=True)
                bound = np.maximum(full[j, rows], coarse[i, rows]).astype(np.float32)
                order = np.argsort(bound, kind="stable")
                cand_rows[i], cand_lb[i] = rows[order], bound[order]
                staged[i], edge[i], switched[i] = n, np.inf, True

    def enter(i: int) -> None:
        """The next stage of query i: the images of the next larger coarse bounds."""
        want = n if staged[i] * 4 >= n else max(STAGE, int(staged[i]) * 4)
        row = coarse[i]
        if want >= n:
            new = np.flatnonzero(row > edge[i]) if staged[i] else np.arange(n)
            edge[i] = np.inf
        else:
            t = float(np.partition(row, want - 1)[want - 1])
            new = np.flatnonzero((row > edge[i]) & (row <= t))
            edge[i] = t
        staged[i] += len(new)
        q = int(qs[i])
        fine = np.sqrt(_bound_sq(qf[q:q + 1], pyramid.fine[new], qfn[q:q + 1], pyramid.fine_norm[new])[0])
        bound = np.maximum(fine, row[new])  # both are lower bounds: the larger is the better one
        rows = np.concatenate([cand_rows[i], new])
        lbs = np.concatenate([cand_lb[i], bound.astype(np.float32)])
        order = np.argsort(lbs, kind="stable")
        cand_rows[i], cand_lb[i] = rows[order], lbs[order]

    while not done.all():
        if dense_ok:
            counts = np.fromiter((len(measured[int(q)]) for q in qs), np.int64, len(qs))
            waiting = np.flatnonzero(~done & ~switched & (counts >= DENSE_AFTER))
            if len(waiting):
                densify(waiting)
        pairs = []
        for i in np.flatnonzero(~done):
            q = int(qs[i])
            while True:
                lbs = cand_lb[i]
                short = len(measured[q]) < m  # the shown neighbours are measured whatever their bound
                if len(lbs) and (short or lbs[0] < min(ub[i], edge[i])):
                    break  # something to measure in this stage
                if (ub[i] <= edge[i] and not short) or staged[i] >= n:
                    done[i] = True  # no image left can be nearer than the k-th found
                    break
                enter(i)
            if done[i]:
                continue
            room = budget - len(measured[q])
            if room <= 0:
                done[i] = True  # out of budget: not certified
                continue
            take = min(int(chunk[i]), room)
            cut = max(1, int(np.searchsorted(cand_lb[i][:take], min(ub[i], edge[i]), side="left")),
                      min(take, m - len(measured[q])))
            pairs.append((i, q, cand_rows[i][:cut]))
            cand_rows[i], cand_lb[i] = cand_rows[i][cut:], cand_lb[i][cut:]
            chunk[i] = min(int(chunk[i]) * 2, 1024)
        if not pairs:
            break
        qi = np.concatenate([np.full(len(r), q, np.int64) for _, q, r in pairs])
        rows = np.concatenate([r for _, _, r in pairs])
        uniq, inv = np.unique(rows, return_inverse=True)
        train = pyramid.pixels(pyramid.ids[uniq])
        l2, _ = paired_distances_grids(queries, train, (1,), ia=qi, ib=inv.reshape(-1), device=device)
        l2 = l2.cpu().numpy().astype(np.float64)
        at = 0
        for i, q, r in pairs:
            for row, d in zip(r.tolist(), l2[at:at + len(r)].tolist()):
                measured[q][row] = d
            at += len(r)
            if len(measured[q]) >= k:
                ub[i] = np.partition(np.fromiter(measured[q].values(), float), k - 1)[k - 1]
    for i, q in enumerate(qs.tolist()):
        pending = float(cand_lb[i][0]) if len(cand_lb[i]) else np.inf
        unseen = edge[i] if staged[i] < n else np.inf  # the next stage's images have coarse bounds beyond the edge
        certified[q] = min(pending, unseen) >= ub[i]
        lower[q] = min(float(ub[i]), pending, unseen)
