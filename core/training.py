"""The training set: ingest a folder of images with captions, and count duplicates.

Ingest (``add_training``): every png/jpg/jpeg/webp file under the folder (recursive,
in sorted order) is read with ``core.images.load_image``; files it refuses (empty,
truncated, corrupt, not an image) are skipped and listed with the reason. A good
file is copied to ``WS/training/<sha[:2]>/<sha>.<ext>`` (identical content is
stored once) before its ``training_images`` row is inserted, so a row never points
to a missing file. The resolved source path is unique: adding the same folder again
adds nothing, adding another folder adds only its files. The pixel index and the
duplicate counts are brought up to date at the end.

Captions (``read_captions``): a CSV with a header holding ``caption`` and ``file``
(or ``path``) columns, or JSON Lines with the same keys. A key is matched against
the image's path relative to the ingested folder (``sub/a.png``), falling back to
the bare file name (``a.png``) when no key has that relative path and exactly one
key has that name.

Duplicates (the paper's duplicate count k): two training images are linked when the
normalised L2 of their pixel embeddings (``pixel_size`` x ``pixel_size``, an exact
lower bound of their full-resolution normalised L2) is <= ``duplicate_threshold``,
and files with identical bytes are always linked. Groups are the connected
components of these links (union-find); every row stores ``duplicate_count`` (its
group's size) and ``duplicate_group`` (the smallest training id in the group).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import tempfiles
from .embed import PixelEmbedder
from .errors import ImageError, InputError
from .images import load_image, sha256_file
from .index import TrainingIndex
from .records import TrainingImage
from .store import Workspace, now

TRAINING_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
KEY_COLUMNS = ("file", "path")
INSERT_BATCH = 256


@dataclass(frozen=True)
class TrainingReport:
    added: int
    skipped: list[tuple[str, str]]  # (file, reason)
    already_present: int = 0
    captioned: int = 0  # added images that received a caption
    captions_filled: int = 0  # images already present that had no caption and received one
    unmatched_captions: int = 0  # caption keys that matched no file of the folder
    duplicate_groups: int = 0  # groups of 2 or more images after the update
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- captions

def _norm_key(key: str) -> str:
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such captions file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; pass a CSV or JSONL captions file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8") from None


def _add_caption(out: dict[str, str], key: object, caption: object, where: str) -> None:
    if not isinstance(key, str) or not key.strip():
        raise InputError(f"{where}: empty or missing file name")
    if caption is None:
        return
    if not isinstance(caption, str):
        raise InputError(f"{where}: caption must be text, got {caption!r}")
    key, caption = _norm_key(key), caption.strip()
    if not caption:
        return
    if key in out and out[key] != caption:
        raise InputError(f"{where}: {key!r} already has a different caption; keep one caption per file")
    out[key] = caption


def _read_csv(path: Path, text: str) -> dict[str, str]:
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path}: empty captions file; give a header row with file,caption")
        names = [h.strip().lower() for h in header]
        if "caption" not in names or not any(k in names for k in KEY_COLUMNS):
            raise InputError(f"{path}: the header ({', '.join(header) or 'empty'}) needs a 'caption' column and a "
                             "'file' or 'path' column")
        ki = names.index(next(k for k in KEY_COLUMNS if k in names))
        ci = names.index("caption")
        out: dict[str, str] = {}
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}: line {reader.line_num}"
            if len(row) <= max(ki, ci):
                raise InputError(f"{where}: {len(row)} fields, the header has {len(header)}")
            _add_caption(out, row[ki], row[ci], where)
        return out
    except csv.Error as e:
        raise InputError(f"{path}: not a valid CSV file ({e})") from None


def _read_jsonl(path: Path, text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):  # only \n ends a record (captions may hold U+2028 etc.)
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: each line must be a JSON object with file and caption")
        lower = {str(k).lower(): v for k, v in obj.items()}
        key = next((lower[k] for k in KEY_COLUMNS if k in lower), None)
        if key is None or "caption" not in lower:
            raise InputError(f"{where}: needs a 'caption' key and a 'file' or 'path' key, got {', '.join(map(str, obj)) or 'none'}")
        _add_caption(out, key, lower["caption"], where)
    return out


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions by normalised file key, from a CSV (file/path, caption columns) or JSON Lines file.

    Keys use '/' separators with any leading './' removed; captions are stripped, and
    empty or null captions are left out. The format is chosen by suffix (.csv; .jsonl,
    .ndjson, .json), otherwise by the first character ('{' means JSON Lines).
    """
    path = Path(path).expanduser()
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty captions file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        out = _read_csv(path, text)
    elif suffix in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{"):
        out = _read_jsonl(path, text)
    else:
        out = _read_csv(path, text)
    return out


class CaptionMatcher:
    """Look up a caption by relative path, falling back to an unambiguous bare file name."""

    def __init__(self, captions: dict[str, str]):
        self.captions = captions
        by_name: dict[str, list[str]] = {}
        for key in captions:
            by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
        self.by_name = {name: keys[0] for name, keys in by_name.items() if len(keys) == 1}
        self.used: set[str] = set()

    def __call__(self, relpath: str) -> str | None:
        key = relpath if relpath in self.captions else self.by_name.get(relpath.rsplit("/", 1)[-1])
        if key is None:
            return None
        self.used.add(key)
        return self.captions[key]


# ---------------------------------------------------------------------------- ingest

def list_training_files(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every png/jpg/jpeg/webp file under ``folder`` (recursive, sorted), outside ``exclude``."""
    files = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        if exclude is not None and (here.resolve() == exclude or exclude in here.resolve().parents):
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(names):
            if Path(name).suffix.lower() in TRAINING_SUFFIXES:
                files.append(here / name)
    return files


def _stored_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix


def _copy_atomic(src: Path, dest: Path) -> None:
    with tempfiles.atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _reason(path: Path, error: Exception) -> str:
    text = str(error)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def add_training(ws: Workspace, folder: str | Path, captions: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> TrainingReport:
    """Ingest ``folder`` into the workspace; see the module docstring for the rules."""
    from tqdm import tqdm

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; pass the folder that holds the training images")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; pass the folder that holds the training images")
    folder = folder.resolve()
    tempfiles.remove_stale(ws.root / "training")  # copies a killed ingest left half-written
    match = CaptionMatcher(read_captions(captions) if captions is not None else {})
    settings = ws.settings()
    embedder = PixelEmbedder(settings["pixel_size"])
    messages: list[str] = []
    index = TrainingIndex.open(ws, "pixel", embedder=embedder, on_message=messages.append)

    files = list_training_files(folder, exclude=ws.root)
    with ws.connect() as con:
        known_sources = {r[0]: r[1] is not None for r in con.execute("SELECT source_path, caption FROM training_images")}
        stored = {r[0]: r[1] for r in con.execute("SELECT sha256, path FROM training_images")}

    skipped: list[tuple[str, str]] = []
    pending: list[tuple[tuple, np.ndarray]] = []
    new_ids: list[int] = []
    new_vectors: list[np.ndarray] = []
    fill: list[tuple[str, str]] = []  # (caption, source) for present images that have none yet
    already = captioned = 0

    def flush() -> None:
        nonlocal already
        if not pending:
            return
        with ws.transaction() as con:
            for row, vector in pending:
                cur = con.execute(
                    "INSERT OR IGNORE INTO training_images(path, source_path, caption, sha256, width, height, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                if cur.rowcount == 1:
                    new_ids.append(int(cur.lastrowid))
                    new_vectors.append(vector)
                else:  # another process added this source meanwhile
                    already += 1
        pending.clear()

    bar = tqdm(total=len(files), desc="training images", unit="img", disable=None)
    try:
        for done, path in enumerate(files, 1):
            source = str(path.resolve())
            caption = match(path.relative_to(folder).as_posix())
            if source in known_sources:
                already += 1
                if caption is not None and not known_sources[source]:
                    fill.append((caption, source))
            else:
                known_sources[source] = True
                try:
                    sha = sha256_file(path)
                    img = load_image(path)
                except ImageError as e:
                    skipped.append((str(path), _reason(path, e)))
                except OSError as e:
                    skipped.append((str(path), f"cannot be read ({e.strerror or e})"))
                else:
                    rel = stored.setdefault(sha, f"training/{sha[:2]}/{sha}.{_stored_suffix(path)}")
                    dest = ws.resolve(rel)
                    if not dest.is_file():
                        _copy_atomic(path, dest)
                    captioned += caption is not None
                    vector = embedder.embed([img])[0]
                    pending.append(((rel, source, caption, sha, img.width, img.height, now()), vector))
                    if len(pending) >= INSERT_BATCH:
                        flush()
            bar.update(1)
            if progress:
                progress(done, len(files))
        flush()
    finally:
        bar.close()

    if fill:
        with ws.transaction() as con:
            con.executemany("UPDATE training_images SET caption = ? WHERE source_path = ? AND caption IS NULL", fill)
    if new_ids:
        index.add(np.asarray(new_ids, dtype=np.int64), np.stack(new_vectors))
        groups = update_duplicates(ws, new_ids=new_ids, index=index)
    else:
        _ensure_duplicates(ws)
        groups = _count_groups(ws)
    return TrainingReport(added=len(new_ids), skipped=skipped, already_present=already, captioned=captioned,
                          captions_filled=len(fill), unmatched_captions=len(set(match.captions) - match.used),
                          duplicate_groups=groups, messages=messages)


# ---------------------------------------------------------------------------- duplicates

class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb


def _count_groups(ws: Workspace) -> int:
    with ws.connect() as con:
        return con.execute("SELECT COUNT(DISTINCT duplicate_group) FROM training_images WHERE duplicate_count > 1").fetchone()[0]


def update_duplicates(ws: Workspace, *, new_ids: Iterable[int] | None = None, index: TrainingIndex | None = None,
                      progress: Callable[[int, int], None] | None = None) -> int:
    """Recompute duplicate groups; return the number of groups with 2 or more images.

    With ``new_ids`` (images just added), the stored groups are kept and only links
    touching the new images are searched, provided the stored groups were computed with
    the current ``duplicate_threshold`` and pixel embedder; otherwise every image is
    searched again.
    """
    threshold = float(ws.get_setting("duplicate_threshold"))
    if index is None:
        index = TrainingIndex.open(ws, "pixel")
    with ws.connect() as con:
        rows = con.execute("SELECT id, sha256, duplicate_group, duplicate_count FROM training_images ORDER BY id").fetchall()
    if not rows:
        index.set_meta("duplicate_threshold", threshold)
        return 0
    ids = np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))
    pos = {int(i): p for p, i in enumerate(ids)}
    uf = _UnionFind(len(rows))

    new = set(int(i) for i in new_ids) if new_ids is not None else None
    incremental = (new is not None and index.meta.get("duplicate_threshold") == threshold
                   and all(r["duplicate_group"] is not None for r in rows if r["id"] not in new))
    if incremental:
        for r in rows:
            if r["id"] not in new and r["duplicate_group"] in pos:
                uf.union(pos[r["id"]], pos[r["duplicate_group"]])
        queries = np.asarray(sorted(new), dtype=np.int64)
    else:
        queries = ids
    by_sha: dict[str, int] = {}
    for p, r in enumerate(rows):
        first = by_sha.setdefault(r["sha256"], p)
        if first != p:
            uf.union(first, p)

    done = 0
    for a, b, _ in index.pairs_within(threshold, queries):
        for x, y in zip(a.tolist(), b.tolist()):
            if x in pos and y in pos:
                uf.union(pos[x], pos[y])
        done = min(len(queries), done + 1024)
        if progress:
            progress(done, len(queries))

    roots = [uf.find(p) for p in range(len(rows))]
    sizes = Counter(roots)
    changes = []
    for p, r in enumerate(rows):
        group, count = int(ids[roots[p]]), sizes[roots[p]]  # the root is the group's smallest position = smallest id
        if r["duplicate_group"] != group or r["duplicate_count"] != count:
            changes.append((count, group, int(r["id"])))
    if changes:
        with ws.transaction() as con:
            con.executemany("UPDATE training_images SET duplicate_count = ?, duplicate_group = ? WHERE id = ?", changes)
    index.set_meta("duplicate_threshold", threshold)
    return sum(1 for s in sizes.values() if s > 1)


def _ensure_duplicates(ws: Workspace) -> None:
    """Recompute duplicate groups when they are missing or were computed with other settings."""
    threshold = float(ws.get_setting("duplicate_threshold"))
    with ws.connect() as con:
        row = con.execute("SELECT params FROM indexes WHERE embedder = 'pixel'").fetchone()
        ungrouped = con.execute("SELECT COUNT(*) FROM training_images WHERE duplicate_group IS NULL").fetchone()[0]
        total = con.execute("SELECT COUNT(*) FROM training_images").fetchone()[0]
    if total == 0:
        return
    saved = json.loads(row["params"]) if row is not None else {}
    if ungrouped or saved.get("duplicate_threshold") != threshold or saved.get("embedder") != PixelEmbedder(
            ws.get_setting("pixel_size")).params:
        update_duplicates(ws)


def duplicate_groups(ws: Workspace) -> list[tuple[str, int, int]]:
    """Every duplicate group, most duplicated first: (caption, count, training id).

    The caption is the one most members share (ties: the one of the smallest id) and
    the training id is the smallest id carrying it; a group without any caption gives
    ('', count, smallest id). Groups of equal size are ordered by smallest id.
    """
    _ensure_duplicates(ws)
    with ws.connect() as con:
        rows = con.execute("SELECT id, caption, duplicate_group FROM training_images ORDER BY id").fetchall()
    members: dict[int, list[sqlite3.Row]] = {}
    for r in rows:
        members.setdefault(r["duplicate_group"], []).append(r)
    out = []
    for group, rs in members.items():
        caps = Counter(r["caption"] for r in rs if r["caption"])
        if caps:
            best = max(caps.values())
            rep = next(r for r in rs if r["caption"] and caps[r["caption"]] == best)
            out.append((rep["caption"], len(rs), int(rep["id"]), int(group)))
        else:
            out.append(("", len(rs), int(rs[0]["id"]), int(group)))
    out.sort(key=lambda t: (-t[1], t[3]))
    return [(c, n, tid) for c, n, tid, _ in out]


def top_duplicated(ws: Workspace, n: int) -> list[tuple[str, int, int]]:
    """The n most duplicated groups: (caption of a representative ('' if none), group size, its training id)."""
    if int(n) < 1:
        raise InputError(f"--top must be at least 1, got {n}")
    return duplicate_groups(ws)[:int(n)]


def prompt_line(caption: str) -> str:
    """A caption as one prompt line: runs of whitespace (newlines included) become one space."""
    return " ".join(caption.split())


def write_prompts_file(ws: Workspace, n: int, out_path: str | Path) -> int:
    """Write the captions of the n most duplicated captioned groups, one per line; return the line count.

    Groups without a caption are skipped (the next group takes their place); a caption
    already written is not repeated. The file is written atomically.
    """
    if int(n) < 1:
        raise InputError(f"--top must be at least 1, got {n}")
    lines: list[str] = []
    seen: set[str] = set()
    for caption, _, _ in duplicate_groups(ws):
        line = prompt_line(caption)
        if line and line not in seen:
            seen.add(line)
            lines.append(line)
            if len(lines) == int(n):
                break
    if not lines:
        raise InputError("no training image has a caption; add the training folder with --captions first")
    out_path = Path(out_path).expanduser()
    if out_path.is_dir():
        raise InputError(f"{out_path} is a folder; pass a file name for the prompts")
    tempfiles.write_text_atomic(out_path, "\n".join(lines) + "\n")
    return len(lines)


# ---------------------------------------------------------------------------- reading back

def training_images(ws: Workspace, ids: Iterable[int] | None = None) -> list[TrainingImage]:
    """Training image records, by id order (or in the order of ``ids``; unknown ids are left out)."""
    cols = "id, path, source_path, caption, sha256, width, height, duplicate_count, duplicate_group"
    with ws.connect() as con:
        if ids is None:
            rows = con.execute(f"SELECT {cols} FROM training_images ORDER BY id").fetchall()
        else:
            wanted = [int(i) for i in ids]
            found = {}
            for s in range(0, len(wanted), 900):
                chunk = wanted[s:s + 900]
                for r in con.execute(f"SELECT {cols} FROM training_images WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    found[r["id"]] = r
            rows = [found[i] for i in wanted if i in found]
    return [TrainingImage(**dict(r)) for r in rows]
