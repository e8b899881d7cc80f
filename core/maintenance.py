"""Backups and consistency checks of a workspace."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from . import inpaint
from .errors import WorkspaceError
from .store import DB_NAME, Workspace

# Folders copied by a backup; cache/ is derived data and index/ is rebuilt from the database when missing.
BACKUP_FOLDERS = ("generations", "training", "index", "inpainting", "membership")
# Every stored file a row names (membership: the scored images' copies); inpainting runs add theirs.
_FILES_SQL = "SELECT path FROM generations UNION SELECT path FROM training_images UNION SELECT image FROM membership_scores"


@dataclass
class VerifyReport:
    checked_files: int = 0
    missing: list[str] = field(default_factory=list)
    integrity: str = "ok"
    orphans: list[str] = field(default_factory=list)  # image files no row refers to (harmless, e.g. left by a kill)

    @property
    def ok(self) -> bool:
        return self.integrity == "ok" and not self.missing


def backup(ws: Workspace, out: str | Path) -> Path:
    """A consistent copy of a live workspace: SQLite's online backup of the database, then the files it names.

    Files are copied after the database snapshot, so every file a copied row names exists in the copy
    (rows are only ever inserted after their file is complete).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise WorkspaceError(f"{out} exists and is not empty; choose a new folder for the backup")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (DB_NAME + ".partial")
    with ws.connect() as src:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    tmp.replace(out / DB_NAME)
    copy = Workspace(out)
    for sub in BACKUP_FOLDERS + ("cache",):
        (out / sub).mkdir(exist_ok=True)
    with copy.connect() as con:
        paths = [r[0] for r in con.execute(_FILES_SQL)]
    paths += inpaint.run_paths(copy)
    for rel in paths:
        src_file = ws.resolve(rel)
        dst_file = copy.resolve(rel)
        dst_file.parent.mkdir(parents=True, exist_ok=True)
        if not dst_file.exists():
            shutil.copy2(src_file, dst_file)
    for f in (ws.root / "index").glob("*"):
        if f.is_file() and not f.name.startswith(".tmp"):
            shutil.copy2(f, out / "index" / f.name)
    return out


def verify(ws: Workspace) -> VerifyReport:
    """Check the database (PRAGMA integrity_check) and that every file a row names exists and is inside the workspace."""
    report = VerifyReport()
    with ws.connect() as con:
        report.integrity = "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
        paths = [r[0] for r in con.execute(_FILES_SQL)]
    paths += inpaint.run_paths(ws)
    known = set()
    for rel in paths:
        report.checked_files += 1
        try:
            p = ws.resolve(rel)
        except WorkspaceError:
            report.missing.append(rel)
            continue
        known.add(p)
        if not p.is_file() or p.stat().st_size == 0:
            report.missing.append(rel)
    for sub in ("generations", "training", "inpainting", "membership"):
        for p in (ws.root / sub).rglob("*"):
            if p.is_file() and p.resolve() not in known:
                report.orphans.append(p.relative_to(ws.root).as_posix())  # lexical: a symlink may lead outside
    return report
