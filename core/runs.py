"""Audit runs as stored: their bookkeeping, their cache folder, and clean-up after a killed process.

A run is a row of ``audit_runs`` (its parameters as JSON, status 'running' until its results
are stored, then 'done') and a folder WS/cache/run-<id>/ of derived arrays (see ``core.audit``).
While it runs, its process holds an exclusive lock on the folder's ``.lock``; a run left
'running' whose lock can be taken was abandoned by a killed process and is removed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .records import AuditParams
from .store import FILES_PER_FOLDER, Workspace


@dataclass(frozen=True)
class RunInfo:
    id: int
    created_at: str
    finished_at: str | None
    status: str
    params: AuditParams


def cache_dir(ws: Workspace, run_id: int) -> Path:
    """The run's folder of derived arrays, WS/cache/run-<id>/."""
    return ws.root / "cache" / f"run-{run_id}"


def distance_file(prompt_id: int, grid: int, run_grid: int) -> str:
    """A prompt's cached distance matrix, relative to the run's folder: p<id // 1000>/prompt-<id>.npy at the
    run's grid, p<id // 1000>/prompt-<id>-g<G>.npy at others (a folder per thousand prompts, so that
    no folder holds more than a few thousand files however many prompts a run audits)."""
    name = f"prompt-{prompt_id}.npy" if grid == run_grid else f"prompt-{prompt_id}-g{grid}.npy"
    return f"p{int(prompt_id) // FILES_PER_FOLDER}/{name}"


def legacy_distance_file(prompt_id: int, grid: int, run_grid: int) -> str:
    """Where runs cached before the sharded layout kept the matrix: directly in the run's folder."""
    return distance_file(prompt_id, grid, run_grid).split("/", 1)[1]


def tiled_file(grid: int, run_grid: int) -> str:
    return "nn_tiled.npy" if grid == run_grid else f"nn_tiled-g{grid}.npy"


RUN_LOCK = ".lock"


def own_run(cache: Path):
    """Hold an exclusive lock on the run's cache/run-<id>/.lock until closed; the OS releases it when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: abandoned runs are then left in place (they are never listed)
        return None
    f = open(cache / RUN_LOCK, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def remove_abandoned_runs(ws: Workspace) -> list[int]:
    """Delete the audit runs a killed process left 'running', with their cache folders; return their ids.

    A running audit holds an exclusive lock (flock) on WS/cache/run-<id>/.lock, released by the
    operating system when its process ends, however it ends; a 'running' run whose lock can be
    taken has no process left to finish it.
    """
    try:
        import fcntl
    except ImportError:
        return []
    with ws.connect() as con:
        running = [r[0] for r in con.execute("SELECT id FROM audit_runs WHERE status = 'running'")]
    removed = []
    for run_id in running:
        cache = cache_dir(ws, run_id)
        try:
            lock = open(cache / RUN_LOCK, "a")
        except FileNotFoundError:  # its cache folder is gone: no process can be holding its lock
            lock = None
        try:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # still being audited
            with ws.transaction() as con:
                gone = con.execute("DELETE FROM audit_runs WHERE id = ? AND status = 'running'", (run_id,)).rowcount
            if gone:  # (a run that finished meanwhile keeps its cache)
                shutil.rmtree(cache, ignore_errors=True)
                removed.append(run_id)
        finally:
            if lock is not None:
                lock.close()
    return removed


def list_runs(ws: Workspace) -> list[RunInfo]:
    with ws.connect() as con:
        rows = con.execute("SELECT * FROM audit_runs WHERE status = 'done' ORDER BY id").fetchall()
    return [RunInfo(r["id"], r["created_at"], r["finished_at"], r["status"], AuditParams(**json.loads(r["params"]))) for r in rows]


def latest_run(ws: Workspace) -> int | None:
    with ws.connect() as con:
        row = con.execute("SELECT MAX(id) FROM audit_runs WHERE status = 'done'").fetchone()
    return row[0]


def run_params(ws: Workspace, run_id: int) -> AuditParams:
    with ws.connect() as con:
        row = con.execute("SELECT params FROM audit_runs WHERE id = ? AND status = 'done'", (run_id,)).fetchone()
    if row is None:
        raise InputError(f"no finished audit run {run_id} in {ws.root}; run `memaudit audit {ws.root}`")
    return AuditParams(**json.loads(row["params"]))


def require_run(ws: Workspace, run_id: int | None) -> int:
    """``run_id``, or the latest finished run when None; a one-line error when there is none."""
    run_id = run_id if run_id is not None else latest_run(ws)
    if run_id is None:
        raise InputError(f"{ws.root} has no audit run yet; run `memaudit audit {ws.root}`")
    run_params(ws, run_id)
    return run_id
