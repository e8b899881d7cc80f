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

import os
import re
from pathlib import Path

PREFIX = ".tmp-"
_OWNED = re.compile(r"^\.tmp-(\d+)-")


def prefix() -> str:
    """``.tmp-<pid>-``: the prefix for this process's temporary files (pass to tempfile.mkstemp)."""
    return f"{PREFIX}{os.getpid()}-"


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
