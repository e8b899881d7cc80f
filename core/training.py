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

Duplicates (the paper's duplicate count k): every row's ``duplicate_count`` is the number
of training images, itself included, within ``duplicate_threshold`` of it by exact
normalised L2 at ``duplicate_size`` (optionally confirmed by CLIP similarity), and
``duplicate_group`` a browsing group; ``core.duplicates`` computes both, for the new images
and every existing image they resemble, at the end of each ingest.
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

from . import duplicates, tempfiles
from .config import SQLITE_MAX_VARIABLES
from .embed import PixelEmbedder
from .errors import ImageError, InputError
from .images import load_image, sha256_file
from .index import TrainingIndex
from .records import TrainingImage
from .store import Workspace, now
from .textfiles import read_utf8

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
    duplicate_groups: int = 0  # browsing groups of 2 or more images after the update
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- captions

def _norm_key(key: str) -> str:
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


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
            shown = " ".join(", ".join(header).split()) or "empty"  # one line, even if a quoted cell holds a newline
            raise InputError(f"{path}: the header ({shown}) needs a 'caption' column and a "
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
    text = read_utf8(path, "captions file", "pass a CSV or JSONL captions file")
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
    dup_size = int(settings["duplicate_size"])
    messages: list[str] = []
    index = TrainingIndex.open(ws, "pixel", embedder=embedder, on_message=messages.append)

    files = list_training_files(folder, exclude=ws.root)
    with ws.connect() as con:
        known_sources = {r[0]: r[1] is not None for r in con.execute("SELECT source_path, caption FROM training_images")}
        stored = {r[0]: r[1] for r in con.execute("SELECT sha256, path FROM training_images")}

    skipped: list[tuple[str, str]] = []
    pending: list[tuple[tuple, np.ndarray, np.ndarray]] = []
    new_ids: list[int] = []
    new_vectors: list[np.ndarray] = []
    new_arrays: dict[int, np.ndarray] = {}  # working arrays of the duplicate counts, by new id
    fill: list[tuple[str, str]] = []  # (caption, source) for present images that have none yet
    already = captioned = 0

    def flush() -> None:
        nonlocal already
        if not pending:
            return
        with ws.transaction() as con:
            for row, vector, array in pending:
                cur = con.execute(
                    "INSERT OR IGNORE INTO training_images(path, source_path, caption, sha256, width, height, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                if cur.rowcount == 1:
                    new_ids.append(int(cur.lastrowid))
                    new_vectors.append(vector)
                    new_arrays[new_ids[-1]] = array
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
                    pending.append(((rel, source, caption, sha, img.width, img.height, now()), vector,
                                    duplicates.working_array(img, dup_size)))
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
    else:
        _rewrite_stale_index_row(ws, index)
    groups = duplicates.update(ws, fresh=new_arrays).groups
    return TrainingReport(added=len(new_ids), skipped=skipped, already_present=already, captioned=captioned,
                          captions_filled=len(fill), unmatched_captions=len(set(match.captions) - match.used),
                          duplicate_groups=groups, messages=messages)


def _rewrite_stale_index_row(ws: Workspace, index: TrainingIndex) -> None:
    """Save the pixel index when its ``indexes`` row lags its files (a kill between the two writes).

    ``TrainingIndex.open`` accepts complete files under a stale row; a rerun that adds nothing
    would otherwise leave the row's count behind the index it describes.
    """
    with ws.connect() as con:
        row = con.execute("SELECT count, max_training_id FROM indexes WHERE embedder = 'pixel'").fetchone()
    if row is None or (row["count"], row["max_training_id"]) != (index.count, index.max_training_id):
        index.save()


# ---------------------------------------------------------------------------- duplicates

def duplicate_groups(ws: Workspace) -> list[tuple[str, int, int]]:
    """One row per browsing group, most duplicated first: (caption, duplicate count, training id).

    The caption is the one most members share (ties: the one of the member with the highest
    count, then the smallest id); the row names the member with the highest duplicate count
    among those carrying it (ties: the smallest id) and gives that image's own count. A group
    without any caption gives ('', the count of its first image, its first image's id). Rows
    of equal count are ordered by id.
    """
    duplicates.ensure(ws)
    with ws.connect() as con:
        rows = con.execute("SELECT id, caption, duplicate_count, duplicate_group FROM training_images ORDER BY id").fetchall()
    members: dict[int, list[sqlite3.Row]] = {}
    for r in rows:
        members.setdefault(r["duplicate_group"], []).append(r)
    out = []
    for group, rs in members.items():
        shared = Counter(r["caption"] for r in rs if r["caption"])
        best = max(shared.values(), default=0)
        carriers = [r for r in rs if r["caption"] and shared[r["caption"]] == best] or [r for r in rs if r["id"] == group]
        rep = min(carriers, key=lambda r: (-r["duplicate_count"], r["id"]))
        out.append((rep["caption"] or "", int(rep["duplicate_count"]), int(rep["id"])))
    out.sort(key=lambda t: (-t[1], t[2]))
    return out


def top_duplicated(ws: Workspace, n: int) -> list[tuple[str, int, int]]:
    """The n most duplicated groups: (caption of a representative ('' if none), its duplicate count, its training id)."""
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
            for s in range(0, len(wanted), SQLITE_MAX_VARIABLES):
                chunk = wanted[s:s + SQLITE_MAX_VARIABLES]
                for r in con.execute(f"SELECT {cols} FROM training_images WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    found[r["id"]] = r
            rows = [found[i] for i in wanted if i in found]
    return [TrainingImage(**dict(r)) for r in rows]
