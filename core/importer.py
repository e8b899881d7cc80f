"""Importing images generated elsewhere, listed in a manifest, into a workspace.

Manifest: CSV with a header row holding the columns ``path`` and ``prompt`` (and
optionally ``seed``; other columns are ignored), or JSON Lines with one object a line
holding the same keys. ``path`` is relative to the manifest's folder; ``prompt`` is the
text the image was made from ('' or null for an unconditional model). Prompts are
stripped of surrounding whitespace, as ``read_prompts`` does, so imported and generated
images of one prompt meet under one prompt id.

Every image is fully decoded before it is copied, so corrupt, truncated, empty and
non-image files are skipped and listed with the reason, never half-imported. A path
leading outside the manifest's folder (absolute, ``..``, or through a symlink) is
refused and listed. The copy lands in the prompt's folder (``core.store.generation_folder``:
a new subfolder every thousand images imported for the prompt) with ``source='import'`` and ``origin`` = the resolved original path, so importing the same
manifest again skips what is already there.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import tempfiles
from .errors import ImageError, InputError, WorkspaceError
from .images import IMAGE_SUFFIXES, load_image
from .store import Workspace, generation_folder, now, prompt_folder
from .textfiles import read_utf8

REQUIRED_COLUMNS = ("path", "prompt")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_INSERT_CHUNK = 256
_FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class ManifestRow:
    line: int  # line of the manifest the row ends on (1-based)
    path: str  # as written, stripped
    prompt: str  # stripped; '' for unconditional
    seed: int | None = None


@dataclass(frozen=True)
class ImportReport:
    imported: int
    skipped: list[tuple[str, str]]  # (path as written in the manifest, reason)


# ---------------------------------------------------------------------------------- parsing
def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse a manifest file (CSV or JSONL, chosen by suffix, else by a first character '{')."""
    path = Path(path)
    text = read_utf8(path, "manifest file", "pass the manifest file (CSV or JSONL)", "save the manifest as UTF-8")
    suffix = path.suffix.lower()
    fmt = "jsonl" if suffix in JSONL_SUFFIXES else "csv" if suffix in (".csv", ".txt") else (
        "jsonl" if text.lstrip().startswith("{") else "csv")
    return parse_manifest(text, fmt, name=str(path))


def parse_manifest(text: str, fmt: str, *, name: str = "manifest") -> list[ManifestRow]:
    """Rows of a manifest's text, in file order. ``fmt`` is 'csv' or 'jsonl'. Structural problems raise InputError."""
    if fmt == "csv":
        rows = _parse_csv(text, name)
    elif fmt == "jsonl":
        rows = _parse_jsonl(text, name)
    else:
        raise ValueError(f"fmt must be 'csv' or 'jsonl', got {fmt!r}")
    if not rows:
        raise InputError(f"{name} lists no images; add rows with the columns path,prompt[,seed]")
    return rows


def _seed(value: Any, name: str, line: int) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{name} line {line}: seed {value!r} is not a whole number; fix or remove it")
    try:
        seed = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise InputError(f"{name} line {line}: seed {value!r} is not a whole number; fix or remove it") from None
    if not _INT64[0] <= seed <= _INT64[1]:
        raise InputError(f"{name} line {line}: seed {value!r} does not fit in 64 bits; fix or remove it")
    return seed


def _parse_csv(text: str, name: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{name} is empty; write a header row path,prompt[,seed] and one row per image")
        columns = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{name} lacks the column(s) {', '.join(missing)}; its header must name path,prompt[,seed] (found {','.join(header)!r})")
        at = {c: columns.index(c) for c in (*REQUIRED_COLUMNS, "seed") if c in columns}
        rows = []
        for record in reader:
            if not any(field.strip() for field in record):
                continue
            get = lambda c: record[at[c]] if c in at and at[c] < len(record) else ""  # noqa: E731
            rows.append(ManifestRow(reader.line_num, get("path").strip(), get("prompt").strip(), _seed(get("seed"), name, reader.line_num)))
        return rows
    except csv.Error as e:
        raise InputError(f"{name} line {reader.line_num}: not valid CSV ({e}); fix the file") from None


def _parse_jsonl(text: str, name: str) -> list[ManifestRow]:
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputError(f"{name} line {n}: not valid JSON ({e}); write one JSON object a line") from None
        if not isinstance(obj, dict):
            raise InputError(f"{name} line {n}: expected a JSON object with keys path and prompt, got {type(obj).__name__}")
        missing = [k for k in REQUIRED_COLUMNS if k not in obj]
        if missing:
            raise InputError(f"{name} line {n} lacks the key(s) {', '.join(missing)}; every line needs path and prompt (seed optional)")
        path, prompt = obj["path"], obj["prompt"]
        if not isinstance(path, str) or not (prompt is None or isinstance(prompt, str)):
            raise InputError(f"{name} line {n}: path must be a string and prompt a string or null")
        rows.append(ManifestRow(n, path.strip(), (prompt or "").strip(), _seed(obj.get("seed"), name, n)))
    return rows


# ---------------------------------------------------------------------------------- importing
def _locate(base: Path, written: str) -> tuple[Path | None, str]:
    """The resolved file a manifest path names, or None and why it is refused."""
    if not written:
        return None, "empty path"
    if os.path.isabs(written) or written.startswith(("/", "\\")) or (len(written) > 1 and written[1] == ":"):
        return None, "absolute path refused; paths must be relative to the manifest's folder"
    lexical = Path(os.path.normpath(base / written))
    if lexical != base and base not in lexical.parents:
        return None, "path leads outside the manifest's folder (..); refused"
    resolved = lexical.resolve()
    if resolved != base and base not in resolved.parents:
        return None, "path leads outside the manifest's folder through a symlink; refused"
    return resolved, ""


def _suffix(path: Path, data: bytes) -> str:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _FORMAT_SUFFIX.get(img.format or "", ".img")


def import_generations(ws: Workspace, manifest_path: str | Path,
                       progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Copy the images a manifest lists into the workspace as generations (source 'import').

    Skips (and lists with a reason) rows whose file is missing, unreadable or not a valid image,
    rows leading outside the manifest's folder, repeated rows, and files imported before.
    ``progress(done, total)`` is called after every row. A full disk stops the import with a
    WorkspaceError; rows imported before it are kept and the rest are imported by a rerun.
    """
    manifest = Path(manifest_path)
    rows = read_manifest(manifest)
    base = manifest.resolve().parent
    skipped: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    prompt_ids: dict[str, int] = {}
    ordinals: dict[int, int] = {}  # prompt id -> images of it imported so far (places the next one's subfolder)
    pending: list[dict[str, Any]] = []
    imported = 0

    def flush() -> None:
        nonlocal imported
        if pending:
            imported += _insert(ws, pending)
            pending.clear()

    # asked row by row through the import index: a workspace of millions of imports is not read into memory
    with ws.connect() as lookup:
        def done_before(origin: str) -> bool:
            return lookup.execute("SELECT 1 FROM generations WHERE source = 'import' AND origin = ?", (origin,)).fetchone() is not None

        try:
            for i, row in enumerate(rows, start=1):
                reason = _import_one(ws, row, base, manifest, done_before, seen, prompt_ids, ordinals, pending)
                if reason:
                    skipped.append((row.path, reason))
                if len(pending) >= _INSERT_CHUNK:
                    flush()
                if progress:
                    progress(i, len(rows))
        finally:
            flush()
    return ImportReport(imported=imported, skipped=skipped)


def _import_one(ws: Workspace, row: ManifestRow, base: Path, manifest: Path, done_before: Callable[[str], bool],
                seen: dict[str, int], prompt_ids: dict[str, int], ordinals: dict[int, int],
                pending: list[dict[str, Any]]) -> str:
    """Copy one row's image and queue its database row; return why it was skipped, or ''."""
    src, reason = _locate(base, row.path)
    if src is None:
        return f"line {row.line}: {reason}"
    origin = str(src)
    if origin in seen:
        return f"line {row.line}: same file as line {seen[origin]}; imported once"
    seen[origin] = row.line
    if done_before(origin):
        return f"line {row.line}: already imported"
    try:
        img = load_image(src)
    except ImageError as e:
        message = str(e)
        return f"line {row.line}: {message[len(str(src)) + 2:] if message.startswith(str(src) + ': ') else message}"
    try:
        data = src.read_bytes()
    except OSError as e:
        return f"line {row.line}: cannot read the file ({e.strerror or e})"
    sha = hashlib.sha256(data).hexdigest()
    if row.prompt not in prompt_ids:
        pid = prompt_ids[row.prompt] = ws.prompt_id(row.prompt)
        with ws.connect() as con:
            ordinals[pid] = con.execute("SELECT COUNT(*) FROM generations WHERE prompt_id = ? AND source = 'import'",
                                        (pid,)).fetchone()[0]
        tempfiles.remove_stale(ws.root / prompt_folder(pid))  # left by a killed import (this layout or the earlier one)
        tempfiles.remove_stale(ws.root / "generations" / str(pid))
    pid = prompt_ids[row.prompt]
    # the origin's hash keeps two files with identical bytes (a model repeating itself) apart
    folder = generation_folder(pid, "i", ordinals[pid])
    rel = f"{folder}/import-{sha[:12]}-{hashlib.sha256(origin.encode('utf-8')).hexdigest()[:8]}{_suffix(src, data)}"
    try:
        tempfiles.write_bytes_atomic(ws.root / rel, data)
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise WorkspaceError(f"the disk is full while copying {src} into {ws.root}; free some space and run the "
                                 "import again (images already imported are kept and skipped)") from None
        raise WorkspaceError(f"cannot write {ws.root / rel} ({e.strerror or e}); check the workspace folder's permissions") from None
    created = now()
    params = {"manifest": str(manifest.resolve()), "line": row.line, "manifest_path": row.path,
              "origin": origin, "imported_at": created}
    ordinals[pid] += 1
    pending.append({"prompt_id": pid, "seed": row.seed, "path": rel, "sha256": sha, "width": img.width,
                    "height": img.height, "origin": origin, "params": json.dumps(params, sort_keys=True),
                    "created_at": created})
    return ""


def _insert(ws: Workspace, rows: list[dict[str, Any]]) -> int:
    import sqlite3

    try:
        with ws.transaction() as con:
            n = 0
            for r in rows:
                if con.execute("SELECT 1 FROM generations WHERE source = 'import' AND origin = ?", (r["origin"],)).fetchone():
                    continue  # imported meanwhile by another process
                con.execute(
                    "INSERT INTO generations(prompt_id, model_id, seed, path, sha256, width, height, steps, guidance, "
                    "scheduler, source, origin, params, created_at) VALUES (:prompt_id, NULL, :seed, :path, :sha256, "
                    ":width, :height, NULL, NULL, NULL, 'import', :origin, :params, :created_at)", r)
                n += 1
            return n
    except sqlite3.OperationalError as e:
        if "full" in str(e):
            raise WorkspaceError(f"the disk is full while writing {ws.db_path}; free some space and run the import again") from None
        raise

