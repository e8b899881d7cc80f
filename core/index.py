"""The training index: nearest training images of a batch of embeddings, with faiss.

One index per embedder lives in ``WS/index/``:

``<embedder>.npy``       float32 (n, dim) embeddings, row i for training id ``ids[i]``
``<embedder>.ids.npy``   int64 (n,) training ids, strictly increasing
``<embedder>.faiss``     the faiss index, whose faiss ids are the training ids

and the ``indexes`` table records kind, dim, count, max_training_id and params
(the embedder params, plus ``nlist``/``trained_count`` for IVF). Each file is
written to a temporary name and moved into place with ``os.replace``, so a kill
leaves either the old or the new file; the row is written last.
``TrainingIndex.open`` compares files, row and the ``training_images`` table and
repairs what disagrees, with a message: stale faiss file -> rebuilt from the stored
embeddings; missing or mismatched embeddings, or images gone from the database ->
re-embedded / rebuilt; embedder params changed -> rebuilt; training images newer
than the index (e.g. an interrupted ingest) -> added.

Index kind, by the number n of training images:

* ``n <= index_exact_max``: exact, ``IndexIDMap(IndexFlatL2)`` for ``l2`` embedders,
  ``IndexIDMap(IndexFlatIP)`` for ``cosine``.
* ``n > index_exact_max`` (and n >= 1,000, the least an IVF index is trained on):
  ``IVF{nlist},PQ{m}x4fs``, inverted lists of 4-bit product-quantised codes scanned
  with SIMD lookup tables (faiss' "fast scan"), ``m`` = the divisor of dim closest to
  dim / 2 (two dimensions per 16-centroid sub-quantiser: 256 for 512-d CLIP, 384 for
  the 768-d pixel default; coarser codes, e.g. dim / 8, lose true neighbours among the
  candidates on data without low-rank structure). ``nlist =
  min(round(sqrt(n)), n // 39)`` lists (39 training points per list is faiss' minimum),
  k-means trained on ``min(n, 64 nlist)`` vectors drawn with a fixed seed, searched with
  ``nprobe`` = setting ``index_nprobe`` (default 16). The 4-bit codes only nominate:
  IVF retrieves ``rerank x k`` candidates (default ``rerank = 10``) which are re-ranked
  exactly against the stored float32 embeddings, so recall is limited only by the lists
  probed (measured in benchmarks/bench_index.py).

Scores are always recomputed exactly from the float32 embeddings by direct
differences (never the ``|x|^2 + |y|^2 - 2 x.y`` expansion, which loses precision
near zero): Euclidean distances ``||q - x||`` for ``l2`` (ascending), inner products
(cosine similarities for normalised vectors) for ``cosine`` (descending); ties go to
the smaller training id.

Adding images to an existing index appends to it; the faiss index is rebuilt when
it crosses ``index_exact_max`` (exact -> IVF) or when an IVF index has grown past 4x
the size it was trained at (its lists would be unbalanced).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import tempfiles
from .config import SQLITE_MAX_VARIABLES
from .embed import Embedder, embedder_params, get_embedder, require_finite
from .errors import ImageError, WorkspaceError
from .store import Workspace, now

log = logging.getLogger("memaudit.index")

INDEX_DIR = "index"
METRICS = {"pixel": "l2", "clip": "cosine"}
DEFAULT_NPROBE = 16
RERANK = 10
REGROW_FACTOR = 4
MIN_POINTS_PER_LIST = 39
MIN_IVF = 1_000
TRAIN_POINTS_PER_LIST = 64
ADD_CHUNK = 65_536
# Candidate blocks for exact re-scoring are kept under this many float32 values.
RESCORE_BLOCK = 1 << 24


def choose_nlist(n: int) -> int:
    """IVF list count for n vectors: round(sqrt(n)), at most n // 39, at least 1."""
    return max(1, min(int(round(math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def choose_pq_m(dim: int) -> int:
    """Sub-quantisers of the IVF codes: the divisor of dim closest to dim / 2 (ties: the smaller)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / 2), m))


def write_npy_atomic(path: Path, parts: list[np.ndarray], dtype: Any, tail: tuple[int, ...]) -> None:
    """Write the concatenation of ``parts`` as one .npy, atomically, streaming (no full copy in memory)."""
    n = sum(len(p) for p in parts)
    with tempfiles.atomic_path(path, ".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *tail))
        at = 0
        for p in parts:
            for start in range(0, len(p), ADD_CHUNK):
                block = np.asarray(p[start:start + ADD_CHUNK])
                out[at:at + len(block)] = block
                at += len(block)
        out.flush()
        del out


def write_faiss_atomic(index: Any, path: Path) -> None:
    import faiss

    with tempfiles.atomic_path(path, ".faiss") as tmp:
        faiss.write_index(index, str(tmp))


def _train_ivf(index: Any, sample: np.ndarray, nlist: int, metric: int) -> None:
    """Train the coarse k-means on all threads, then the product quantiser on one thread.

    The quantiser's 16-centroid k-means runs are tiny: split across OpenMP threads on a
    busy machine they wait on one another (measured 18x slower with 2 threads than 1).
    """
    import faiss

    ivf = faiss.extract_index_ivf(index)
    km = faiss.Kmeans(sample.shape[1], nlist, niter=20, seed=1234, spherical=metric == faiss.METRIC_INNER_PRODUCT)
    km.train(sample)
    ivf.quantizer.add(km.centroids)  # a trained quantizer holding nlist centroids is kept by IndexIVF.train
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.train(sample)
    finally:
        faiss.omp_set_num_threads(threads)


class TrainingIndex:
    """Embeddings of every training image for one embedder, searchable by faiss.

    Build it with ``TrainingIndex.open(ws, embedder_name)``; ``search`` returns
    training ids and exact scores.
    """

    def __init__(self, ws: Workspace, name: str, params: dict[str, Any], *, exact_max: int, nprobe: int,
                 embedder: Embedder | None = None):
        self.ws = ws
        self.name = name
        self.metric = METRICS[name]
        self.embedder_params = params
        self.exact_max = int(exact_max)
        self.nprobe = int(nprobe)
        self.dim = 0
        self.ids = np.zeros(0, dtype=np.int64)
        self.vectors: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        self.kind = "empty"
        self.meta: dict[str, Any] = {}
        self.messages: list[str] = []
        self._index: Any = None
        self._on_disk = False  # vectors/ids files hold exactly self.ids / self.vectors
        self._embedder = embedder
        folder = ws.root / INDEX_DIR
        self.faiss_path = folder / f"{name}.faiss"
        self.vectors_path = folder / f"{name}.npy"
        self.ids_path = folder / f"{name}.ids.npy"

    # ------------------------------------------------------------------ properties
    @property
    def count(self) -> int:
        return int(len(self.ids))

    @property
    def max_training_id(self) -> int:
        return int(self.ids[-1]) if len(self.ids) else 0

    @property
    def embedder(self) -> Embedder:
        """The embedder this index was built with (built from the workspace settings on first use)."""
        if self._embedder is None:
            self._embedder = get_embedder(self.name, self.ws.settings())
        return self._embedder

    # ------------------------------------------------------------------ open / repair
    @classmethod
    def open(cls, ws: Workspace, embedder_name: str, *, embedder: Embedder | None = None,
             progress: Callable[[int, int], None] | None = None,
             on_message: Callable[[str], None] | None = None) -> "TrainingIndex":
        """Load the index of ``embedder_name``, repairing or completing it against the database.

        Training images in the database but not in the index are embedded (loading their
        workspace copies) and added; everything else that disagrees is rebuilt, and each
        repair is reported through ``on_message`` (default: a logging warning) and kept in
        ``.messages``.
        """
        tempfiles.remove_stale(ws.root / INDEX_DIR)  # files a killed writer left half-written
        settings = ws.settings()
        params = embedder.params if embedder is not None else embedder_params(embedder_name, settings)
        self = cls(ws, embedder_name, params, exact_max=settings["index_exact_max"],
                   nprobe=settings.get("index_nprobe", DEFAULT_NPROBE), embedder=embedder)
        say = on_message or log.warning

        def message(text: str) -> None:
            self.messages.append(text)
            say(text)

        with ws.connect() as con:
            row = con.execute("SELECT * FROM indexes WHERE embedder = ?", (embedder_name,)).fetchone()
            db_ids = np.fromiter((r[0] for r in con.execute("SELECT id FROM training_images ORDER BY id")), dtype=np.int64)

        stored = None
        if row is not None:
            saved = json.loads(row["params"])
            if saved.get("embedder") != params:
                message(f"the {embedder_name} embedder settings changed ({_describe(saved.get('embedder'))} -> "
                        f"{_describe(params)}); rebuilding the {embedder_name} index")
            else:
                stored = self._load_stored(row)
                if stored is None:
                    message(f"the stored {embedder_name} embeddings are missing or do not match the database; "
                            f"re-embedding the training images")
                else:
                    self.meta = {k: v for k, v in saved.items() if k != "embedder"}

        changed = False
        if stored is not None:
            ids, vectors = stored
            self.dim = int(vectors.shape[1])
            keep = np.isin(ids, db_ids)
            if not keep.all():
                message(f"{int((~keep).sum())} indexed training images are no longer in the database; "
                        f"rebuilding the {embedder_name} index")
                self.ids, self.vectors = ids[keep], np.ascontiguousarray(vectors[keep])
                self._on_disk = False
                self.meta = {}
                self._build()
                changed = True
            else:
                self.ids, self.vectors = ids, vectors
                self._on_disk = True
                reason = self._load_faiss(row)
                if reason:
                    message(f"the {embedder_name} faiss index {reason}; rebuilding it from the stored embeddings")
                    self._build()
                    changed = True
        missing = db_ids[~np.isin(db_ids, self.ids)]
        if len(missing):
            if row is not None and stored is not None:
                message(f"{len(missing)} training images are not in the {embedder_name} index yet; adding them")
            self.add(missing, self._embed_ids(missing, progress), save=False)
            changed = True
        if changed or (row is not None and stored is None):
            self.save()
        return self

    def _load_stored(self, row: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """Stored (ids, vectors) when the two files agree with each other, else None.

        The files describe themselves (ids row i <-> vectors row i), so a kill between
        writing them and writing the ``indexes`` row loses nothing; the database decides
        below which of them still belong.
        """
        try:
            ids = np.load(self.ids_path)
            vectors = np.load(self.vectors_path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None
        if ids.dtype != np.int64 or ids.ndim != 1 or vectors.dtype != np.float32 or vectors.ndim != 2:
            return None
        if len(ids) != len(vectors) or (len(ids) and vectors.shape[1] != int(row["dim"])):
            return None
        if not (np.diff(ids) > 0).all():
            return None
        return ids, vectors

    def _load_faiss(self, row: Any) -> str | None:
        """Load the faiss file; return why it cannot be used, or None."""
        if self.count == 0:
            self.kind, self._index = "empty", None
            return None
        if not self.faiss_path.is_file():
            return "file is missing"
        import faiss

        try:
            index = faiss.read_index(str(self.faiss_path))
        except RuntimeError:
            return "file cannot be read"
        if index.ntotal != self.count or index.d != self.dim:
            return (f"file holds {index.ntotal} vectors of dimension {index.d}, the stored embeddings "
                    f"{self.count} of dimension {self.dim}")
        ivf = faiss.try_extract_index_ivf(index)
        kind = "ivf" if ivf is not None else "flat"
        if kind != self._kind_for(self.count):
            return (f"is {kind} but {self.count} images with index_exact_max {self.exact_max} call for "
                    f"{self._kind_for(self.count)}")
        if ivf is not None:
            self.meta["nlist"] = int(ivf.nlist)
            self.meta.setdefault("trained_count", self.count)
        self._index, self.kind = index, kind
        self._apply_nprobe()
        return None

    def _embed_ids(self, ids: np.ndarray, progress: Callable[[int, int], None] | None) -> np.ndarray:
        """Embed the workspace copies of training images ``ids``, in batches."""
        from .images import load_image

        with self.ws.connect() as con:
            paths = {r["id"]: r["path"] for r in con.execute(
                f"SELECT id, path FROM training_images WHERE id IN ({','.join('?' * len(ids))})", [int(i) for i in ids])} \
                if len(ids) <= SQLITE_MAX_VARIABLES else {r["id"]: r["path"] for r in con.execute("SELECT id, path FROM training_images")}
        out = []
        batch = 32
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            images = []
            for tid in chunk:
                path = self.ws.resolve(paths[int(tid)])
                try:
                    images.append(load_image(path))
                except ImageError as e:  # missing, unreadable or damaged: what load_image reports
                    raise WorkspaceError(f"training image {int(tid)} ({paths[int(tid)]}) cannot be read from the workspace "
                                         f"({e}); restore the file") from None
            out.append(self.embedder.embed(images))
            if progress:
                progress(min(start + batch, len(ids)), len(ids))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    # ------------------------------------------------------------------ build / add / save
    def _kind_for(self, n: int) -> str:
        return "empty" if n == 0 else ("flat" if n <= self.exact_max or n < MIN_IVF else "ivf")

    def set_nprobe(self, nprobe: int) -> None:
        """Lists an IVF index probes per query (capped at nlist; no effect on an exact index)."""
        if int(nprobe) < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        self.nprobe = int(nprobe)
        self._apply_nprobe()

    def _apply_nprobe(self) -> None:
        if self.kind == "ivf":
            import faiss

            faiss.extract_index_ivf(self._index).nprobe = min(self.nprobe, int(self.meta.get("nlist", self.nprobe)))

    def _build(self) -> None:
        """(Re)build the faiss index from the stored vectors."""
        import faiss

        n = self.count
        self.kind = self._kind_for(n)
        for key in ("nlist", "trained_count"):
            self.meta.pop(key, None)
        if n == 0:
            self._index = None
            return
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            index = faiss.index_factory(self.dim, "IDMap,Flat", metric)
        else:
            nlist = choose_nlist(n)
            index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{choose_pq_m(self.dim)}x4fs", metric)
            m = min(n, TRAIN_POINTS_PER_LIST * nlist)
            rows = np.sort(np.random.default_rng(0).choice(n, size=m, replace=False))
            _train_ivf(index, np.ascontiguousarray(self.vectors[rows], dtype=np.float32), nlist, metric)
            self.meta.update(nlist=nlist, trained_count=n)
        for start in range(0, n, ADD_CHUNK):
            index.add_with_ids(np.ascontiguousarray(self.vectors[start:start + ADD_CHUNK], dtype=np.float32),
                               np.ascontiguousarray(self.ids[start:start + ADD_CHUNK]))
        self._index = index
        self._apply_nprobe()

    def add(self, ids: np.ndarray, vectors: np.ndarray, *, save: bool = True) -> None:
        """Add embeddings of new training ids; appends when they are newer than every indexed id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(ids) == 0:
            return
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"add needs vectors of shape ({len(ids)}, dim), got {vectors.shape}")
        if self.count and vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} cannot join the {self.name} index of dimension {self.dim}")
        require_finite(vectors, f"the {self.name} embedder")
        if not (np.diff(ids) > 0).all():  # sort (a copy) only when needed
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], vectors[order]
        if (np.diff(ids) == 0).any() or np.isin(ids, self.ids).any():
            raise ValueError(f"training ids already in the {self.name} index cannot be added again")
        self.dim = int(vectors.shape[1])
        appended = self.count == 0 or int(ids[0]) > self.max_training_id
        if appended:
            all_ids = np.concatenate([self.ids, ids])
            parts = [self.vectors, vectors] if self.count else [vectors]
        else:
            all_ids = np.concatenate([self.ids, ids])
            order = np.argsort(all_ids, kind="stable")
            all_ids = all_ids[order]
            parts = [np.concatenate([np.asarray(self.vectors), vectors])[order]]
        self.vectors_path.parent.mkdir(parents=True, exist_ok=True)
        write_npy_atomic(self.vectors_path, parts, np.float32, (self.dim,))
        write_npy_atomic(self.ids_path, [all_ids], np.int64, ())
        self.ids = all_ids
        self.vectors = np.load(self.vectors_path, mmap_mode="r")
        self._on_disk = True
        kind = self._kind_for(self.count)
        grown = self.kind == "ivf" and self.count > REGROW_FACTOR * int(self.meta.get("trained_count", 0))
        if appended and self._index is not None and kind == self.kind and not grown:
            for start in range(0, len(ids), ADD_CHUNK):
                self._index.add_with_ids(np.ascontiguousarray(vectors[start:start + ADD_CHUNK]),
                                         np.ascontiguousarray(ids[start:start + ADD_CHUNK]))
        else:
            self._build()
        if save:
            self.save()

    def save(self) -> None:
        """Write vectors, ids and the faiss index (each atomically), then the ``indexes`` row."""
        self.vectors_path.parent.mkdir(parents=True, exist_ok=True)
        if not self._on_disk:
            write_npy_atomic(self.vectors_path, [self.vectors] if self.count else [], np.float32, (self.dim,))
            write_npy_atomic(self.ids_path, [self.ids], np.int64, ())
            self._on_disk = True
        if self._index is not None:
            write_faiss_atomic(self._index, self.faiss_path)
        elif self.faiss_path.exists():
            self.faiss_path.unlink()
        self._write_row()

    def _write_row(self) -> None:
        params = json.dumps({"embedder": self.embedder_params, **self.meta}, sort_keys=True)
        with self.ws.transaction() as con:
            con.execute(
                "INSERT INTO indexes(embedder, path, kind, dim, count, max_training_id, params, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(embedder) DO UPDATE SET path = excluded.path, "
                "kind = excluded.kind, dim = excluded.dim, count = excluded.count, "
                "max_training_id = excluded.max_training_id, params = excluded.params, updated_at = excluded.updated_at",
                (self.name, f"{INDEX_DIR}/{self.faiss_path.name}", self.kind, self.dim, self.count,
                 self.max_training_id, params, now()))

    def set_meta(self, key: str, value: Any) -> None:
        """Record one derived fact (e.g. the duplicate threshold last used) in the ``indexes`` row."""
        self.meta[key] = value
        self._write_row()

    # ------------------------------------------------------------------ search
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or (self.count and q.shape[1] != self.dim):
            raise ValueError(f"queries must have shape (N, {self.dim}) for the {self.name} index, got {np.shape(queries)}")
        return require_finite(q, "the query embedder")

    def search(self, queries: np.ndarray, k: int, *, rerank: int = RERANK) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest training images of each query: (ids (N, k) int64, scores (N, k) float32).

        ``l2``: Euclidean distances, ascending. ``cosine``: cosine similarities, descending.
        k is clipped to the index size (an empty index gives (N, 0) arrays).
        """
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = self._check_queries(queries)
        k = min(int(k), self.count)
        if k == 0 or len(q) == 0:
            return np.zeros((len(q), k), dtype=np.int64), np.zeros((len(q), k), dtype=np.float32)
        fetch = min(self.count, max(2 * k, k + 8) if self.kind == "flat" else int(rerank) * k)
        _, cand = self._index.search(q, fetch)
        ids, scores = self._rescore(q, cand, k)
        short = (ids < 0).any(axis=1)
        if short.any():  # IVF lists probed held fewer than k vectors: answer those queries exactly
            ids[short], scores[short] = self.brute_force(q[short], k)
        return ids, scores

    def search_images(self, images: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` on the embeddings of ``images`` (PIL list or (N, H, W, C) array)."""
        return self.search(self.embedder.embed(images), k)

    def _scores(self, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact scores of q (B, d) against x (B, C, d) by direct differences."""
        if self.metric == "l2":
            scores = np.sqrt(np.square(x - q[:, None, :]).sum(axis=2))
        else:
            scores = np.einsum("bcd,bd->bc", x, q)
        if not np.isfinite(scores).all():  # queries are checked finite: a stored embedding is damaged
            raise WorkspaceError(f"the stored {self.name} embeddings hold non-finite values (a damaged file); delete "
                                 f"{self.vectors_path} and run the same command again to rebuild it from the training images")
        return scores

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, c = cand.shape
        out_ids = np.full((n, k), -1, dtype=np.int64)
        out_scores = np.zeros((n, k), dtype=np.float32)
        step = max(1, RESCORE_BLOCK // max(1, c * self.dim))
        worst = np.float32(np.inf if self.metric == "l2" else -np.inf)
        for s in range(0, n, step):
            cb = cand[s:s + step]
            valid = cb >= 0
            rows = np.searchsorted(self.ids, np.where(valid, cb, self.ids[0]))
            x = np.asarray(self.vectors[rows.ravel()]).reshape(len(cb), c, self.dim)
            sc = self._scores(q[s:s + step], x).astype(np.float32)
            sc[~valid] = worst
            key = sc if self.metric == "l2" else -sc
            order = np.lexsort((np.where(valid, cb, np.iinfo(np.int64).max), key), axis=-1)[:, :k]
            out_ids[s:s + step] = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(cb, order, 1), -1)
            out_scores[s:s + step] = np.take_along_axis(sc, order, 1)
        return out_ids, out_scores

    def brute_force(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest by scanning every stored embedding (direct differences, same tie rule)."""
        q = self._check_queries(queries)
        k = min(int(k), self.count)
        out_ids = np.zeros((len(q), k), dtype=np.int64)
        out = np.zeros((len(q), k), dtype=np.float32)
        qstep = 64
        step = max(1, RESCORE_BLOCK // (qstep * max(1, self.dim)))
        for qs in range(0, len(q), qstep):
            qb = q[qs:qs + qstep]
            best_ids = np.zeros((len(qb), 0), dtype=np.int64)
            best = np.zeros((len(qb), 0), dtype=np.float32)
            for s in range(0, self.count, step):
                x = np.asarray(self.vectors[s:s + step])
                sc = self._scores(qb, np.broadcast_to(x, (len(qb), *x.shape))).astype(np.float32)
                all_ids = np.concatenate([best_ids, np.broadcast_to(self.ids[s:s + step], sc.shape)], axis=1)
                all_sc = np.concatenate([best, sc], axis=1)
                order = np.lexsort((all_ids, all_sc if self.metric == "l2" else -all_sc), axis=-1)[:, :k]
                best_ids, best = np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_sc, order, 1)
            out_ids[qs:qs + qstep], out[qs:qs + qstep] = best_ids, best
        return out_ids, out

    # ------------------------------------------------------------------ pairs (duplicates)
    def pairs_within(self, radius: float, query_ids: np.ndarray | None = None,
                     batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (ids_a, ids_b, distance) for every pair with exact distance <= radius (l2 indexes only).

        Queries are the stored embeddings of ``query_ids`` (default: all); a pair is
        reported from each query side it is found from, never (i, i), and its distance is
        always the exact one. Exact index: faiss' range search with a 1e-3 margin for
        float32 rounding, then checked exactly, so no pair is missed. IVF index: the k
        nearest (re-ranked exactly), k doubled from 32 for queries whose k-th neighbour
        is still within ``radius``; pairs in lists that are not probed can be missed.
        """
        if self.metric != "l2":
            raise ValueError(f"pairs_within needs an l2 index, {self.name} is {self.metric}")
        if self.count == 0:
            return
        rows = np.arange(self.count) if query_ids is None else np.searchsorted(self.ids, np.asarray(query_ids, dtype=np.int64))
        for s in range(0, len(rows), batch):
            rb = rows[s:s + batch]
            q = np.ascontiguousarray(self.vectors[rb], dtype=np.float32)
            src, dst = (self._range_exact if self.kind == "flat" else self._range_knn)(rb, q, radius)
            keep = src != dst
            src, dst = src[keep], dst[keep]
            dist = np.empty(len(src), dtype=np.float32)
            for c in range(0, len(src), ADD_CHUNK):
                a = np.asarray(self.vectors[src[c:c + ADD_CHUNK]])
                b = np.asarray(self.vectors[dst[c:c + ADD_CHUNK]])
                dist[c:c + ADD_CHUNK] = np.sqrt(np.square(a - b).sum(axis=1))
            ok = dist <= radius
            yield self.ids[src[ok]], self.ids[dst[ok]], dist[ok]

    def _range_exact(self, rows: np.ndarray, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        lims, _, found = self._index.range_search(q, float((radius + 1e-3) ** 2))
        return np.repeat(rows, np.diff(lims).astype(np.int64)), np.searchsorted(self.ids, found)

    def _range_knn(self, rows: np.ndarray, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        src, dst = [], []
        todo = np.arange(len(rows))
        k = min(32, self.count)
        while len(todo):
            ids, d = self.search(q[todo], k)
            inside = (d <= radius) & (ids >= 0)
            again = inside[:, -1] & (k < self.count)  # the k-th neighbour is inside: there may be more
            done = ~again
            src.append(np.repeat(rows[todo[done]], inside[done].sum(axis=1)))
            dst.append(np.searchsorted(self.ids, ids[done][inside[done]]))
            todo = todo[again]
            k = min(2 * k, self.count)
        return np.concatenate(src), np.concatenate(dst)


def _describe(params: Any) -> str:
    if not isinstance(params, dict):
        return "none"
    return ", ".join(f"{k} {v}" for k, v in params.items() if k in ("pixel_size", "clip_model", "clip_pretrained")) or "none"
