"""A real dashboard server for tests: started as `memaudit dashboard` starts it, on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_dashboard(ws_root: str | Path, port: int, log_path: Path, *, cwd: str | Path, env: dict[str, str],
                      timeout: float = 90) -> Iterator[str]:
    """Start the launcher's own command for ``ws_root``, yield its base URL once /_stcore/health
    answers ok, and stop it afterwards (terminate, then kill after 10 s)."""
    from core import launch

    with open(log_path, "w") as log:
        proc = subprocess.Popen(launch.command(ws_root, port=port), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
