"""Sets of images named by a folder or a manifest, with an optional condition per image.

A folder: every image under it (recursively), sorted by relative path; when it holds a
``captions.csv`` (columns ``file,caption``) those captions are the conditions. A manifest: a
CSV or JSONL file with a ``path`` (or ``file``) column and optionally ``caption`` or ``label``
(a class id or name); paths are relative to the manifest's folder. Other columns (such as
``member`` in the digits demo's ``split.csv``) are ignored unless asked for (``column``).

The membership attack and the shadow models read their images through here, so a pool, a
member set and a non-member set can be named the same way.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .images import is_image_name

CAPTIONS_FILE = "captions.csv"


@dataclass(frozen=True)
class ImageSet:
    source: Path  # the folder or manifest as given
    root: Path  # paths are relative to this folder
    rel: tuple[str, ...]  # POSIX relative paths, in order
    conditions: tuple[str | None, ...]  # caption or class label per image, None when not given
    extra: tuple[dict[str, str], ...] = ()  # the manifest's other columns per row (empty for a folder)

    @property
    def files(self) -> list[Path]:
        return [self.root / r for r in self.rel]

    def __len__(self) -> int:
        return len(self.rel)


def _rows_of(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"{path}: line {n} is not a JSON object; a JSONL manifest holds one object a line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {n} is not a JSON object; a JSONL manifest holds one object a line")
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
        return rows
    return [dict(r) for r in csv.DictReader(text.splitlines())]


def read_image_set(source: str | Path, *, what: str = "image set") -> ImageSet:
    """The images named by a folder or a manifest (module docstring); InputError when there are none."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{what} {source}: no such folder or manifest")
    if source.is_dir():
        captions: dict[str, str] = {}
        cap_file = source / CAPTIONS_FILE
        if cap_file.is_file():
            for r in _rows_of(cap_file):
                if "file" in r and r.get("caption"):
                    captions[Path(r["file"]).as_posix()] = r["caption"]
        rel = tuple(p.relative_to(source).as_posix() for p in sorted(source.rglob("*")) if p.is_file() and is_image_name(p))
        if not rel:
            raise InputError(f"{what} {source}: the folder holds no images (png, jpg, webp, ...)")
        return ImageSet(source, source, rel, tuple(captions.get(r) for r in rel))
    rows = _rows_of(source)
    if not rows:
        raise InputError(f"{what} {source}: the manifest lists no images; give a header and one row per image")
    key = "path" if "path" in rows[0] else "file" if "file" in rows[0] else None
    if key is None:
        raise InputError(f"{what} {source}: the manifest needs a 'path' (or 'file') column, got {sorted(rows[0])}")
    cond = "caption" if "caption" in rows[0] else "label" if "label" in rows[0] else None
    rel, conditions, extra = [], [], []
    for n, r in enumerate(rows, 2):
        p = (r.get(key) or "").strip()
        if not p:
            raise InputError(f"{what} {source}: row {n} has an empty {key}")
        if not (source.parent / p).is_file():
            raise InputError(f"{what} {source}: row {n} names {p!r}, which is not a file next to the manifest")
        rel.append(Path(p).as_posix())
        value = (r.get(cond) or "").strip() if cond else ""
        conditions.append(value or None)
        extra.append({k: v for k, v in r.items() if k not in (key, cond)})
    if len(set(rel)) != len(rel):
        dup = next(p for p in rel if rel.count(p) > 1)
        raise InputError(f"{what} {source}: lists {dup!r} more than once")
    return ImageSet(source, source.parent, tuple(rel), tuple(conditions), tuple(extra))


def file_digests(files: list[Path]) -> list[str]:
    """sha256 of each file's bytes."""
    out = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out.append(h.hexdigest())
    return out
