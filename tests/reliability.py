"""Helpers for the reliability tests: the real CLI in a subprocess, kill -9 at an observed point,
and one consistency check of a workspace after any interruption.

``assert_consistent`` is the definition of "nothing lost, nothing half-written" used by the
crash, concurrency and bad-input tests: SQLite's integrity and foreign-key checks pass,
``memaudit verify`` exits 0, every generation and training row names a complete file whose
SHA-256 is the one recorded, no row is duplicated, and (unless told otherwise) no file is
left that no row names, temporary or not (right after a kill, before the rerun, such
leftovers are allowed: the rerun must clear them).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
           PYTHONDONTWRITEBYTECODE="1")


def cli(*argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m core.cli ARGV`` in a fresh process (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "core.cli", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def kill_when(argv: list[object], point: Callable[[], bool], *, what: str, timeout: float = 300,
              poll: float = 0.01) -> None:
    """Start ``memaudit ARGV`` and SIGKILL it the moment ``point()`` holds (polled every ``poll`` s).

    Fails when the command ends before the point is reached: then nothing was interrupted.
    """
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if point():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {timeout} s")
            time.sleep(poll)
        raise AssertionError(f"the command finished before the kill point ({what}) was reached; "
                             f"exit {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def scalar(db: Path, sql: str, *args: object) -> int:
    """One value from a fresh read-only-by-use connection (polling a database another process writes)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql, args).fetchone()[0]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise
    finally:
        con.close()


def files_under(root: Path, *subs: str) -> list[Path]:
    return sorted(p for sub in subs for p in (root / sub).rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(root: Path, *, just_killed: bool = False) -> dict:
    """Check a workspace after an interruption; returns ``memaudit verify --json``'s report.

    ``just_killed``: the check right after a kill, before any rerun, where a file written but not
    yet named by a row (or a temporary file being written) may be left; a rerun must clear them.
    """
    root = Path(root)
    con = sqlite3.connect(root / "audit.db", timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = con.execute("SELECT path, sha256 FROM generations UNION ALL SELECT path, sha256 FROM training_images").fetchall()
        assert not con.execute("SELECT model_id, prompt_id, seed, steps, guidance, width, height FROM generations "
                               "WHERE source = 'generate' GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING COUNT(*) > 1").fetchall()
        assert not con.execute("SELECT origin FROM generations WHERE source = 'import' GROUP BY origin HAVING COUNT(*) > 1").fetchall()
        assert not con.execute("SELECT source_path FROM training_images GROUP BY source_path HAVING COUNT(*) > 1").fetchall()
        unfinished = con.execute("SELECT COUNT(*) FROM audit_runs WHERE status != 'done'").fetchone()[0]
        assert just_killed or unfinished == 0, "an unfinished audit run is left"
        runs = {r[0] for r in con.execute("SELECT id FROM audit_runs")}
    finally:
        con.close()
    for rel, digest in rows:
        path = root / rel
        assert path.is_file(), f"{rel} is named by a row but missing"
        assert sha256(path) == digest, f"{rel} is not the file its row recorded (half-written?)"
    temp = [p for p in files_under(root, "generations", "training", "index", "cache") if p.name.startswith(".tmp")]
    assert just_killed or not temp, f"temporary files left behind: {temp}"
    caches = {p.name for p in (root / "cache").iterdir()} if (root / "cache").is_dir() else set()
    assert just_killed or caches <= {f"run-{r}" for r in runs}, f"cache folders of runs that do not exist: {caches}"
    done = cli("verify", root, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    if not just_killed:
        assert report["orphans"] == [], f"files no row names: {report['orphans']}"
    return report


def write_image_folder(folder: Path, n: int, *, size: int = 32, seed: int = 0) -> list[Path]:
    """``n`` PNG crops of real photographs (every 10th an exact copy of the one before, every 7th a noisy copy)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), np.stack([data.camera()] * 3, -1)]
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    prev = None
    for i in range(n):
        if i % 10 == 9 and prev is not None:
            arr = prev
        elif i % 7 == 6 and prev is not None:
            arr = np.clip(prev.astype(np.int16) + rng.integers(-3, 4, prev.shape), 0, 255).astype(np.uint8)
        else:
            src = sources[i % len(sources)]
            s = int(rng.integers(48, 160))
            y, x = int(rng.integers(0, src.shape[0] - s)), int(rng.integers(0, src.shape[1] - s))
            arr = np.asarray(Image.fromarray(src[y:y + s, x:x + s, :3]).resize((size, size), Image.Resampling.BOX))
        prev = arr
        path = folder / f"sub{i % 3}" / f"img{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(path)
        out.append(path)
    return out


def small_audited_workspace(root: Path, prompts: int = 24, per_prompt: int = 4):
    """(ws, run_id): 8 real 32 px training photographs, ``prompts`` prompts of noisy copies, audited.

    Every prompt gets a candidate (its largest clique), so there are at least ``prompts`` candidates.
    """
    from core.audit import run_audit
    from core.importer import import_generations
    from core.store import Workspace
    from core.training import add_training
    from workspaces import _noisy, training_arrays

    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "gens").mkdir(parents=True, exist_ok=True)
    train = training_arrays(32)
    for name, arr in train.items():
        Image.fromarray(arr).save(root / "train" / f"{name}.png")
    rng = np.random.default_rng(0)
    names = list(train)
    with open(root / "gens" / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        for p in range(prompts):
            for j in range(per_prompt):
                name = f"p{p}-{j}.png"
                Image.fromarray(_noisy(train[names[p % len(names)]], rng)).save(root / "gens" / name)
                w.writerow([name, f"prompt {p}", j])
    ws = Workspace.init(root / "ws")
    add_training(ws, root / "train")
    import_generations(ws, root / "gens" / "manifest.csv")
    return ws, run_audit(ws)


def events_json(root: Path) -> list[dict]:
    con = sqlite3.connect(Path(root) / "audit.db", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM label_events ORDER BY id")]
    finally:
        con.close()


__all__ = ["ROOT", "ENV", "cli", "kill_when", "scalar", "files_under", "sha256", "assert_consistent",
           "write_image_folder", "small_audited_workspace", "events_json"]


# ---------------------------------------------------------------------------- a reviewer process
def label_worker(ws_root: str, reviewer: str, n: int, seed: int, log_path: str) -> None:
    """Write ``n`` label operations as ``reviewer`` (labels, some delivered twice, and undos), logging each.

    The log (JSON lines: op, token, candidate, label, event id) lets the test replay what this
    reviewer did and compare it with the database. Each operation is checked at once for
    read-your-writes: a label just written is the reviewer's current label of its pair.
    """
    import random

    from core import labels
    from core.results import candidates
    from core.store import Workspace

    ws = Workspace.open(ws_root)
    cands = candidates(ws)
    rng = random.Random(seed)
    with open(log_path, "w") as log:
        for i in range(n):
            r = rng.random()
            if r < 0.12:
                token = f"{reviewer}:undo:{i}"
                event = labels.undo_last(ws, reviewer, token=token)
                log.write(json.dumps({"op": "undo", "token": token, "event": event}) + "\n")
                continue
            c = rng.choice(cands)
            label = rng.choice(("exact_copy", "near_copy", "not_memorized", "unsure"))
            token = f"{reviewer}:{i}"
            event = labels.add_label(ws, c.id, label, reviewer, note=f"op {i}", token=token)
            if r > 0.9:  # the same click delivered again (a retried request): stored once
                assert labels.add_label(ws, c.id, label, reviewer, note=f"op {i}", token=token) == event
            now = labels.current_labels(ws).get((c.medoid_generation_id, c.nearest_training_id), {})
            assert now.get(reviewer) == label, (reviewer, i, now)
            log.write(json.dumps({"op": "label", "token": token, "candidate": c.id, "label": label, "event": event}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "label-worker":
        label_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
