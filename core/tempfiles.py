"""Temporary files of atomic writes, and removing the ones a killed process left behind.

Every file memaudit writes into a workspace is first written to a temporary file in the
same folder, named ``.tmp-<pid>-<random><suffix>`` (``prefix()``), then moved into place
with ``os.replace``. A process killed mid-write (kill -9, power loss) leaves its temporary
file; ``remove_stale`` deletes those whose writing process no longer exists, and leaves
alone those of live processes (another command writing the same workspace right now).
A process id reused by an unrelated process only delays the removal to a later run.
The workspace lives on one machine (SQLite's WAL mode needs that), so a process id
names a process of this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

PREFIX = ".tmp-"
_OWNED = re.compile(r"^\.tmp-(\d+)-")


def prefix() -> str:
    """``.tmp-<pid>-``: the prefix for this process's temporary files (pass to tempfile.mkstemp)."""
    return f"{PREFIX}{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write to; on success it is fsynced and moved onto
    ``dest`` (readers see the old file or the complete new one, never a part), on any failure
    it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=prefix(), suffix=dest.suffix if suffix is None else suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale(folder: str | Path) -> list[Path]:
    """Delete the temporary files under ``folder`` (recursively) whose writing process is gone; return them."""
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():  # os.kill(pid, 0) only tests existence on POSIX
        return []
    removed = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            m = _OWNED.match(name)
            if m and not _alive(int(m.group(1))):
                path = Path(dirpath) / name
                try:
                    path.unlink()
                except FileNotFoundError:  # removed meanwhile by another process
                    continue
                removed.append(path)
    return removed
