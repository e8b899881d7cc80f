"""Per-image duplicate counts of the training set (the paper's duplicate count k).

The count of a training image is the number of training images, itself included, within
the duplicate threshold of it::

    count(x) = |{ y : l2_S(x, y) <= duplicate_threshold  [and cos_clip(x, y) >= duplicate_clip_similarity] }|

where ``l2_S`` is the normalised L2 of the two images at the fixed working size S x S
(setting ``duplicate_size``; the working-resolution rule of ``core.images``: centre square,
area filter, 8-bit pixels scaled to [0, 1]), computed exactly from the 8-bit arrays in
integer arithmetic. It is not the size of a connected component: two distinct images that
both resemble a third do not count each other. Files with identical bytes are always within
the threshold of each other.

When ``duplicate_clip_similarity`` is above 0, a pair must also have a cosine similarity of
CLIP image embeddings (the ``clip`` index: settings ``clip_model``, ``clip_pretrained``) of
at least that value, as the paper's prompt selection found near-duplicates with CLIP
embeddings; identical files need no CLIP check.

How pairs are found (filter and refine, no pair missed): every image's S x S array is
area-pooled to 8 x 8 and to 16 x 16 from that same array. Area pooling is an averaging map,
so by Jensen's inequality the normalised L2 of two pooled arrays is at most that of the
arrays (``core.embed``): both are true lower bounds of ``l2_S``. A faiss range search over
the 8 x 8 vectors (exhaustive, radius squared widened by ``RANGE_MARGIN`` for float32
rounding in faiss' expansion) nominates candidate pairs; the 16 x 16 bound, computed by
direct differences, prunes those farther than the threshold (with a float32 tolerance);
the rest are measured exactly. A pair is only ever dropped by a bound that exceeds the
threshold, so the stored pairs are exactly the pairs within it.

State. ``duplicate_pairs`` holds every confirmed pair (a < b) with its exact L2;
``training_images.duplicates_checked`` marks the images whose pairs with every other image
are stored; ``duplicate_count`` is ``1 +`` the pairs touching the image, updated in the same
transaction as the pairs, batch by batch. Images added later are checked against all
images, so the counts of existing images grow with them; a run killed part-way leaves
unchecked images, which the next run checks (counts are consistent at every commit).
``duplicate_params`` records the threshold, size and CLIP setting the pairs were found
with; a change of any of them recomputes every pair.

Groups for browsing (``duplicate_group``), never for counting: images in order of
decreasing count (then id), each image not yet in a group starting a group with every image
within the threshold of it that is not in a group yet. Every member is within the threshold
of its group's first image (no chains), and the first image has the group's largest count.

The S x S arrays are cached in ``WS/index/dup<S>/`` (derived data: an image missing there
is read again from its workspace copy).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from . import tempfiles
from .config import SQLITE_MAX_VARIABLES
from .errors import WorkspaceError
from .store import Workspace

COARSE = 8  # side of the pooled array searched with faiss
FINE = 16  # side of the pooled array that prunes candidates before the exact measure
# Added to the squared radius of the faiss range search: faiss computes |x|^2 + |y|^2 - 2 x.y in
# float32, whose error for these vectors (|x| <= 1, 192 dimensions) stays below 1e-4.
RANGE_MARGIN = 1e-3
FINE_TOLERANCE = 1e-5  # float32 rounding of the pooled vectors (values in [0, 1])
QUERY_BATCH = 2048  # images checked per transaction
EXACT_CHUNK = 1024  # pairs measured exactly at once (1024 x 3 S^2 int32)
MAX_CHUNKS = 16  # cache files before they are merged into one


@dataclass(frozen=True)
class DuplicateReport:
    checked: int  # images checked in this call
    pairs: int  # pairs stored after it
    candidates: int  # pairs the pooled bounds left for the exact measure in this call
    groups: int  # browsing groups of 2 or more images


# ---------------------------------------------------------------------------- working arrays

def working_array(img, size: int) -> np.ndarray:
    """uint8 (size, size, 3): a PIL image by the working-resolution rule, before scaling to [0, 1]."""
    from .images import to_working

    return np.rint(to_working(img, size) * 255.0).astype(np.uint8)


def exact_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised L2 of uint8 arrays a[i] and b[i] (same shape), exact: integer sums, one rounding at the end."""
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"exact_l2 needs two uint8 arrays of one shape, got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    n = len(a)
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, EXACT_CHUNK):
        d = flat_a[s:s + EXACT_CHUNK].astype(np.int32)
        d -= flat_b[s:s + EXACT_CHUNK]
        out[s:s + EXACT_CHUNK] = np.einsum("ij,ij->i", d, d, dtype=np.int64)
    return np.sqrt(out / flat_a.shape[1]) / 255.0


def pair_l2(arrays: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Exact normalised L2 between arrays[src[i]] and arrays[dst[i]], gathered chunk by chunk."""
    out = np.empty(len(src), dtype=np.float64)
    for s in range(0, len(src), EXACT_CHUNK):
        out[s:s + EXACT_CHUNK] = exact_l2(arrays[src[s:s + EXACT_CHUNK]], arrays[dst[s:s + EXACT_CHUNK]])
    return out


def pooled(arrays: np.ndarray, side: int) -> np.ndarray:
    """float32 (n, 3 side^2): area-pooled uint8 arrays scaled so that Euclidean distance = normalised L2.

    When ``side`` divides S, area pooling is the mean of each block, summed here in integers
    (exact); otherwise ``core.embed.PixelEmbedder``'s fractional area weights are used.
    """
    n, size = len(arrays), arrays.shape[1]
    dim = 3 * side * side
    out = np.empty((n, dim), dtype=np.float32)
    if size % side == 0:
        r = size // side
        scale = 1.0 / (r * r * 255.0 * np.sqrt(dim))
        for s in range(0, n, 4096):
            block = np.asarray(arrays[s:s + 4096]).reshape(-1, side, r, side, r, 3)
            sums = block.sum(axis=(2, 4), dtype=np.uint32)
            out[s:s + 4096] = (sums.reshape(len(block), dim) * scale).astype(np.float32)
        return out
    from .embed import PixelEmbedder

    embedder = PixelEmbedder(side)
    for s in range(0, n, 4096):
        out[s:s + 4096] = embedder.embed(np.asarray(arrays[s:s + 4096]))
    return out


class ArrayCache:
    """The S x S uint8 arrays of training images, by id, in ``WS/index/dup<S>/*.npz`` (each file holds ids and arrays)."""

    def __init__(self, ws: Workspace, size: int):
        self.ws = ws
        self.size = int(size)
        self.folder = ws.root / "index" / f"dup{self.size}"

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz")) if self.folder.is_dir() else []

    def load(self, wanted: np.ndarray, progress: Callable[[int, int], None] | None = None,
             fresh: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        """uint8 (len(wanted), S, S, 3) in the order of ``wanted``: from ``fresh``, the cache, or the workspace copies."""
        tempfiles.remove_stale(self.folder)
        for other in self.folder.parent.glob("dup[0-9]*"):  # caches of other sizes are no longer used
            if other.is_dir() and other != self.folder:
                for f in other.iterdir():
                    f.unlink()
                other.rmdir()
        wanted = np.asarray(wanted, dtype=np.int64)
        out = np.zeros((len(wanted), self.size, self.size, 3), dtype=np.uint8)
        have = np.zeros(len(wanted), dtype=bool)
        order = np.argsort(wanted)
        sorted_wanted = wanted[order]
        files = self._files()
        for f in files:
            try:
                with np.load(f) as z:
                    ids, arrays = z["ids"], z["arrays"]
            except (OSError, ValueError, KeyError, EOFError):
                f.unlink(missing_ok=True)  # unreadable: its images are read again below
                continue
            if arrays.shape[1:] != (self.size, self.size, 3) or len(ids) != len(arrays):
                f.unlink(missing_ok=True)
                continue
            at = np.searchsorted(sorted_wanted, ids)
            hit = (at < len(sorted_wanted)) & (sorted_wanted[np.minimum(at, len(sorted_wanted) - 1)] == ids)
            pos = order[at[hit]]
            out[pos] = arrays[hit]
            have[pos] = True
        missing = [int(i) for i in wanted[~have]]
        new_ids, new_arrays = [], []
        if fresh:
            for p in np.flatnonzero(~have):
                a = fresh.get(int(wanted[p]))
                if a is not None:
                    out[p] = a
                    have[p] = True
                    new_ids.append(int(wanted[p]))
                    new_arrays.append(a)
            missing = [int(i) for i in wanted[~have]]
        if missing:
            read = self._read_files(missing, progress)
            for p in np.flatnonzero(~have):
                out[p] = read[int(wanted[p])]
            new_ids += missing
            new_arrays += [read[i] for i in missing]
        if new_ids:
            self._write(np.asarray(new_ids, dtype=np.int64), np.stack(new_arrays))
            if len(files) + 1 > MAX_CHUNKS:
                self._write(wanted, out, replace=self._files())
        return out

    def _read_files(self, ids: list[int], progress: Callable[[int, int], None] | None) -> dict[int, np.ndarray]:
        from .images import load_image

        with self.ws.connect() as con:
            paths = {r[0]: r[1] for r in con.execute("SELECT id, path FROM training_images")}
        out = {}
        for done, tid in enumerate(ids, 1):
            try:
                out[tid] = working_array(load_image(self.ws.resolve(paths[tid])), self.size)
            except Exception as e:
                raise WorkspaceError(f"training image {tid} ({paths.get(tid)}) cannot be read from the workspace ({e}); "
                                     "restore the file") from None
            if progress and (done % 256 == 0 or done == len(ids)):
                progress(done, len(ids))
        return out

    def _write(self, ids: np.ndarray, arrays: np.ndarray, replace: Iterable[Path] = ()) -> None:
        """One cache file holding ``ids`` and their arrays, written atomically; then the files it replaces go."""
        dest = self.folder / f"chunk-{int(ids.min()):012d}-{int(ids.max()):012d}-{len(ids)}.npz"
        with tempfiles.atomic_path(dest, ".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, arrays=arrays)
        for old in replace:
            if old != dest:
                old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- parameters

def current_params(settings: Mapping) -> dict:
    """What the stored pairs depend on; a change of any of it recomputes every pair."""
    params = {"threshold": float(settings["duplicate_threshold"]), "size": int(settings["duplicate_size"]),
              "clip_similarity": float(settings["duplicate_clip_similarity"])}
    if params["clip_similarity"] > 0:
        from .embed import embedder_params

        params["clip"] = embedder_params("clip", dict(settings))
    return params


def _stored_params(con: sqlite3.Connection) -> dict | None:
    row = con.execute("SELECT params FROM duplicate_params WHERE id = 1").fetchone()
    return json.loads(row[0]) if row is not None else None


def is_current(ws: Workspace) -> bool:
    """True when every image is checked with the present settings and the groups are up to date."""
    params = current_params(ws.settings())
    with ws.connect() as con:
        row = con.execute("SELECT params, groups_current FROM duplicate_params WHERE id = 1").fetchone()
        unchecked = con.execute("SELECT EXISTS(SELECT 1 FROM training_images WHERE duplicates_checked = 0)").fetchone()[0]
        any_image = con.execute("SELECT EXISTS(SELECT 1 FROM training_images)").fetchone()[0]
    if not any_image:
        return True
    return row is not None and json.loads(row["params"]) == params and bool(row["groups_current"]) and not unchecked


# ---------------------------------------------------------------------------- the update

def update(ws: Workspace, *, fresh: Mapping[int, np.ndarray] | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> DuplicateReport:
    """Bring the duplicate counts and groups up to date; see the module docstring.

    ``fresh``: S x S uint8 arrays of images just ingested (saves reading their files again).
    """
    settings = ws.settings()
    params = current_params(settings)
    threshold, size = params["threshold"], params["size"]
    with ws.connect() as con:
        stored = _stored_params(con)
    if stored != params:
        with ws.transaction() as con:  # other settings: every pair again
            con.execute("DELETE FROM duplicate_pairs")
            con.execute("UPDATE training_images SET duplicates_checked = 0, duplicate_count = 1")
            con.execute("INSERT INTO duplicate_params(id, params, groups_current) VALUES (1, ?, 0) "
                        "ON CONFLICT(id) DO UPDATE SET params = excluded.params, groups_current = 0", (json.dumps(params),))
    with ws.connect() as con:
        rows = con.execute("SELECT id, sha256, duplicates_checked FROM training_images ORDER BY id").fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    todo = np.flatnonzero(np.fromiter((r[2] == 0 for r in rows), dtype=bool, count=len(rows)))
    candidates = 0
    if len(todo):
        arrays = ArrayCache(ws, size).load(ids, fresh=fresh,
                                           progress=(lambda d, n: progress("reading", d, n)) if progress else None)
        sha = [r[1] for r in rows]
        clip = _clip_vectors(ws, ids) if params["clip_similarity"] > 0 else None
        candidates = _check(ws, ids, arrays, sha, todo, threshold, params["clip_similarity"], clip, progress)
    groups = _update_groups(ws)
    with ws.connect() as con:
        pairs = con.execute("SELECT COUNT(*) FROM duplicate_pairs").fetchone()[0]
    return DuplicateReport(checked=len(todo), pairs=pairs, candidates=candidates, groups=groups)


def ensure(ws: Workspace) -> None:
    """Update the counts when they are not current (new images, changed settings, an interrupted run)."""
    if not is_current(ws):
        update(ws)


def _clip_vectors(ws: Workspace, ids: np.ndarray) -> np.ndarray:
    """CLIP embeddings (L2-normalised) of ``ids``, from the clip index (built or completed as needed)."""
    from .index import TrainingIndex

    index = TrainingIndex.open(ws, "clip")
    at = np.searchsorted(index.ids, ids)
    if len(ids) and not (index.ids[np.minimum(at, len(index.ids) - 1)] == ids).all():
        raise WorkspaceError("the clip index does not cover every training image; run `memaudit add-training` again")
    return np.asarray(index.vectors[at], dtype=np.float32)


class PairFinder:
    """Every pair within ``threshold`` (exact L2 of the uint8 arrays) that involves a given image; pure, no workspace."""

    def __init__(self, arrays: np.ndarray, threshold: float):
        import faiss

        if arrays.ndim != 4 or arrays.shape[-1] != 3 or arrays.dtype != np.uint8:
            raise ValueError(f"PairFinder needs uint8 arrays of shape (n, S, S, 3), got {arrays.dtype} {arrays.shape}")
        self.arrays = arrays
        self.threshold = float(threshold)
        self.coarse = pooled(arrays, COARSE)
        self.index = faiss.IndexFlatL2(self.coarse.shape[1])
        self.index.add(self.coarse)
        # 16 x 16 vectors are pooled only for images that appear in a candidate pair, once each
        self.fine = np.zeros((len(arrays), 3 * FINE * FINE), dtype=np.float32)
        self.have_fine = np.zeros(len(arrays), dtype=bool)

    def _fine(self, rows: np.ndarray) -> None:
        need = np.unique(rows[~self.have_fine[rows]])
        if len(need):
            self.fine[need] = pooled(self.arrays[need], FINE)
            self.have_fine[need] = True

    def candidates(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions (p, q), p in ``rows``, q != p, whose pooled lower bounds do not exceed the threshold."""
        rows = np.asarray(rows, dtype=np.int64)
        lims, _, found = self.index.range_search(np.ascontiguousarray(self.coarse[rows]), self.threshold ** 2 + RANGE_MARGIN)
        src = np.repeat(rows, np.diff(lims).astype(np.int64))
        dst = found.astype(np.int64)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        self._fine(src)
        self._fine(dst)
        bound = np.empty(len(src), dtype=np.float32)
        for s in range(0, len(src), 65_536):
            bound[s:s + 65_536] = np.sqrt(np.square(self.fine[src[s:s + 65_536]] - self.fine[dst[s:s + 65_536]]).sum(axis=1))
        keep = bound <= self.threshold + FINE_TOLERANCE
        return src[keep], dst[keep]

    def pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(p, q, exact L2, candidates measured): every q within the threshold of each p in ``rows``."""
        src, dst = self.candidates(rows)
        dist = pair_l2(self.arrays, src, dst)
        ok = dist <= self.threshold
        return src[ok], dst[ok], dist[ok], len(src)


def _check(ws: Workspace, ids: np.ndarray, arrays: np.ndarray, sha: list[str], todo: np.ndarray, threshold: float,
           clip_similarity: float, clip: np.ndarray | None, progress: Callable[[str, int, int], None] | None) -> int:
    """Find, confirm and store the pairs of every image in ``todo`` (positions) with every image; return the candidates."""
    finder = PairFinder(arrays, threshold)
    candidates = 0
    for s in range(0, len(todo), QUERY_BATCH):
        batch = todo[s:s + QUERY_BATCH]
        src, dst, dist, measured = finder.pairs(batch)
        candidates += measured
        sim = np.full(len(src), np.nan)
        if clip is not None and len(src):
            sim = np.einsum("ij,ij->i", clip[src].astype(np.float64), clip[dst].astype(np.float64))
            same_file = np.fromiter((sha[a] == sha[b] for a, b in zip(src, dst)), dtype=bool, count=len(src))
            ok = same_file | (sim >= clip_similarity)
            src, dst, dist, sim = src[ok], dst[ok], dist[ok], sim[ok]
        a, b = np.minimum(ids[src], ids[dst]), np.maximum(ids[src], ids[dst])
        pairs = [(int(x), int(y), float(d), None if np.isnan(v) else float(v)) for x, y, d, v in zip(a, b, dist, sim)]
        touched = sorted({int(i) for i in ids[batch]} | {int(i) for i in a} | {int(i) for i in b})
        with ws.transaction() as con:
            con.executemany("INSERT OR IGNORE INTO duplicate_pairs(a, b, l2, similarity) VALUES (?, ?, ?, ?)", pairs)
            for c in range(0, len(touched), SQLITE_MAX_VARIABLES):
                chunk = touched[c:c + SQLITE_MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                con.execute(f"UPDATE training_images SET duplicate_count = 1 "
                            f"+ (SELECT COUNT(*) FROM duplicate_pairs WHERE a = training_images.id) "
                            f"+ (SELECT COUNT(*) FROM duplicate_pairs WHERE b = training_images.id) WHERE id IN ({marks})", chunk)
            done = [int(i) for i in ids[batch]]
            for c in range(0, len(done), SQLITE_MAX_VARIABLES):
                chunk = done[c:c + SQLITE_MAX_VARIABLES]
                con.execute(f"UPDATE training_images SET duplicates_checked = 1 WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            con.execute("UPDATE duplicate_params SET groups_current = 0 WHERE id = 1")
        if progress:
            progress("comparing", min(s + QUERY_BATCH, len(todo)), len(todo))
    return candidates


def star_groups(ids: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Browsing group of every image (the id of its group's first image), from the pairs (a, b); see the module docstring."""
    n = len(ids)
    pa, pb = np.searchsorted(ids, a), np.searchsorted(ids, b)
    src, dst = np.concatenate([pa, pb]), np.concatenate([pb, pa])
    order = np.argsort(src, kind="stable")
    dst = dst[order]
    start = np.searchsorted(src[order], np.arange(n + 1))
    group = np.full(n, -1, dtype=np.int64)
    for p in np.lexsort((ids, -counts)):
        if group[p] >= 0:
            continue
        group[p] = ids[p]
        members = dst[start[p]:start[p + 1]]
        free = members[group[members] < 0]
        group[free] = ids[p]
    return group


def _update_groups(ws: Workspace) -> int:
    with ws.connect() as con:
        row = con.execute("SELECT groups_current FROM duplicate_params WHERE id = 1").fetchone()
        rows = con.execute("SELECT id, duplicate_count, duplicate_group FROM training_images ORDER BY id").fetchall()
        current = row is not None and bool(row[0]) and all(r[2] is not None for r in rows)
        if not current:
            pairs = np.asarray(con.execute("SELECT a, b FROM duplicate_pairs").fetchall(), dtype=np.int64).reshape(-1, 2)
    if not current:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        counts = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        group = star_groups(ids, counts, pairs[:, 0], pairs[:, 1])
        changes = [(int(g), int(r[0])) for r, g in zip(rows, group) if r[2] != g]
        with ws.transaction() as con:
            con.executemany("UPDATE training_images SET duplicate_group = ? WHERE id = ?", changes)
            con.execute("UPDATE duplicate_params SET groups_current = 1 WHERE id = 1")
    with ws.connect() as con:
        return con.execute("SELECT COUNT(*) FROM (SELECT duplicate_group FROM training_images "
                           "GROUP BY duplicate_group HAVING COUNT(*) > 1)").fetchone()[0]
