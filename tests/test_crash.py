"""kill -9 during generate, add-training and audit, at points observed in the workspace itself
(rows in audit.db, files on disk): the rerun finishes the job with exact counts, no duplicate
row, no missing, orphaned or half-written file, and a database that passes integrity_check.

Each test runs the real ``python -m core.cli`` in a subprocess and kills it with SIGKILL; the
fast variants kill once, the slow ones at several points of one job, each rerun being killed
again until the last one finishes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.store import Workspace
from reliability import assert_consistent, cli, files_under, kill_when, scalar, write_image_folder
from workspaces import FLAGGED, planted_files

PROMPTS = ("a red cube on a table", "a blue ball")
PER_PROMPT = 24
SEED = 100


def gen_argv(ws: Path, model: Path, prompts: Path, batch: int = 4) -> list[object]:
    return ["generate", ws, "--model", model, "--prompts", prompts, "--per-prompt", PER_PROMPT, "--steps", 2,
            "--batch-size", batch, "--seed", SEED, "--device", "cpu"]


def rows_of(ws: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(ws / "audit.db", timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def generated(ws: Path) -> dict[tuple[str, int], str]:
    """(prompt, seed) -> path of every generated row."""
    return {(t, s): p for t, s, p in rows_of(ws, "SELECT p.text, g.seed, g.path FROM generations g "
                                                  "JOIN prompts p ON p.id = g.prompt_id")}


def assert_generation_complete(ws: Path) -> None:
    assert_consistent(ws)
    got = generated(ws)
    assert sorted(got) == sorted((p, SEED + j) for p in PROMPTS for j in range(PER_PROMPT))
    assert len(files_under(ws, "generations")) == len(PROMPTS) * PER_PROMPT


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# ---------------------------------------------------------------------------- generate
def test_kill_during_generate_then_rerun_finishes(tmp_path, tiny_text2image, prompts_file, capsys):
    ws = Workspace.init(tmp_path / "ws").root
    total = len(PROMPTS) * PER_PROMPT
    kill_when(gen_argv(ws, tiny_text2image, prompts_file),
              lambda: scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations") >= 8, what="8 generation rows")
    kept = scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations")
    assert 8 <= kept < total
    assert_consistent(ws, just_killed=True)

    assert main([*map(str, gen_argv(ws, tiny_text2image, prompts_file)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["skipped_existing"], report["generated"]) == (kept, total - kept)
    assert_generation_complete(ws)


@pytest.mark.slow
def test_kill_generate_at_three_points_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_text2image, prompts_file):
    ws = Workspace.init(tmp_path / "ws").root
    total = len(PROMPTS) * PER_PROMPT
    for at in (1, total // 2, total - 4):  # the first batch, the middle, the last batch
        kill_when(gen_argv(ws, tiny_text2image, prompts_file),
                  lambda: scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations") >= at, what=f"{at} rows")
        assert scalar(ws / "audit.db", "SELECT COUNT(*) FROM generations") < total
        assert_consistent(ws, just_killed=True)
    done = cli(*gen_argv(ws, tiny_text2image, prompts_file), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["generated"] > 0
    assert_generation_complete(ws)

    # the resumed images are the images of their seeds: an uninterrupted run gives the same pixels
    # (to within the one 8-bit level that batching may change, core/generate.py)
    ref = Workspace.init(tmp_path / "ref").root
    assert cli(*gen_argv(ref, tiny_text2image, prompts_file)).returncode == 0
    a, b = generated(ws), generated(ref)
    for key in a:
        x = np.asarray(Image.open(ws / a[key]), dtype=np.int16)
        y = np.asarray(Image.open(ref / b[key]), dtype=np.int16)
        assert np.abs(x - y).max() <= 1, key


# ---------------------------------------------------------------------------- add-training
N_TRAINING = 600


@pytest.fixture(scope="module")
def training_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash-training") / "train"
    write_image_folder(folder, N_TRAINING)
    return folder


def training_state(ws: Path) -> dict[str, tuple[int, frozenset[str]]]:
    """source file name -> (duplicate count, names of its group's members): comparable across workspaces."""
    rows = rows_of(ws, "SELECT source_path, duplicate_count, duplicate_group FROM training_images")
    groups: dict[int, set[str]] = {}
    for src, _, group in rows:
        groups.setdefault(group, set()).add(Path(src).name)
    return {Path(src).name: (count, frozenset(groups[group])) for src, count, group in rows}


def assert_index_consistent(ws: Path) -> None:
    """The pixel index agrees with the database without any repair."""
    import faiss

    from core.index import TrainingIndex

    messages: list[str] = []
    index = TrainingIndex.open(Workspace.open(ws), "pixel", on_message=messages.append)
    assert messages == []
    db_ids = [r[0] for r in rows_of(ws, "SELECT id FROM training_images ORDER BY id")]
    assert index.ids.tolist() == db_ids
    assert faiss.read_index(str(ws / "index" / "pixel.faiss")).ntotal == len(db_ids) == len(np.load(ws / "index" / "pixel.npy"))
    ((count, max_id),) = rows_of(ws, "SELECT count, max_training_id FROM indexes WHERE embedder = 'pixel'")
    assert (count, max_id) == (len(db_ids), db_ids[-1])


def assert_counts_current(ws: Path) -> None:
    """Every duplicate count is 1 + the stored pairs touching the image, every image is checked, and the
    counts equal those of a recomputation from nothing."""
    from core import duplicates

    state = rows_of(ws, "SELECT id, duplicate_count, duplicates_checked, "
                        "(SELECT COUNT(*) FROM duplicate_pairs WHERE a = t.id OR b = t.id) FROM training_images t ORDER BY id")
    assert all(checked == 1 and count == 1 + pairs for _, count, checked, pairs in state)
    w = Workspace.open(ws)
    assert duplicates.is_current(w)
    con = sqlite3.connect(ws / "audit.db", timeout=30)
    try:
        with con:
            con.execute("DELETE FROM duplicate_pairs")
            con.execute("UPDATE training_images SET duplicate_count = 1, duplicate_group = NULL, duplicates_checked = 0")
    finally:
        con.close()
    duplicates.update(w)
    assert rows_of(ws, "SELECT id, duplicate_count FROM training_images ORDER BY id") == [(i, c) for i, c, _, _ in state]


def test_kill_during_add_training_then_rerun_finishes(tmp_path, training_folder):
    ws = Workspace.init(tmp_path / "ws").root
    # killed after the first rows are committed, while files are still being copied
    kill_when(["add-training", ws, training_folder],
              lambda: scalar(ws / "audit.db", "SELECT COUNT(*) FROM training_images") > 0, what="first committed rows")
    kept = scalar(ws / "audit.db", "SELECT COUNT(*) FROM training_images")
    assert 0 < kept < N_TRAINING
    assert_consistent(ws, just_killed=True)
    done = cli("add-training", ws, training_folder, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["added"] == N_TRAINING - kept
    assert_consistent(ws)
    assert scalar(ws / "audit.db", "SELECT COUNT(*) FROM training_images") == N_TRAINING
    assert_index_consistent(ws)
    assert_counts_current(ws)


@pytest.mark.slow
def test_kill_add_training_while_counting_duplicates_then_rerun_equals_a_clean_ingest(tmp_path, training_folder):
    ws = Workspace.init(tmp_path / "ws").root
    # the duplicate step caches the working arrays just before it compares and stores pairs
    kill_when(["add-training", ws, training_folder],
              lambda: any((ws / "index").glob("dup*/chunk-*.npz")), what="duplicate arrays cached", poll=0.002)
    assert scalar(ws / "audit.db", "SELECT COUNT(*) FROM training_images") == N_TRAINING
    assert scalar(ws / "audit.db", "SELECT COUNT(*) FROM training_images WHERE duplicates_checked = 0") > 0
    assert_consistent(ws, just_killed=True)
    done = cli("add-training", ws, training_folder, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["added"] == 0
    assert_consistent(ws)
    clean = Workspace.init(tmp_path / "clean").root
    assert cli("add-training", clean, training_folder).returncode == 0
    assert training_state(ws) == training_state(clean)
    assert_counts_current(ws)


@pytest.mark.slow
def test_kill_add_training_at_four_points_then_rerun_equals_a_clean_ingest(tmp_path, training_folder):
    ws = Workspace.init(tmp_path / "ws").root
    db = ws / "audit.db"
    points = [
        ("files copied, no row committed yet", lambda: len(files_under(ws, "training")) >= 40),
        ("some rows committed", lambda: scalar(db, "SELECT COUNT(*) FROM training_images") >= 300),
        ("every row committed, the index being built",
         lambda: scalar(db, "SELECT COUNT(*) FROM training_images") == N_TRAINING),
    ]
    for what, point in points:
        kill_when(["add-training", ws, training_folder], point, what=what, poll=0.002)
        assert_consistent(ws, just_killed=True)
    # the index files now lag the database; a fourth run is killed as soon as the index is written again
    before = (ws / "index" / "pixel.faiss").stat().st_mtime_ns if (ws / "index" / "pixel.faiss").exists() else 0
    try:
        kill_when(["add-training", ws, training_folder],
                  lambda: (ws / "index" / "pixel.faiss").exists() and (ws / "index" / "pixel.faiss").stat().st_mtime_ns != before,
                  what="index rewritten", poll=0.002)
    except AssertionError as e:  # the run may finish between two polls: that is a complete run, also fine
        assert "finished before" in str(e)
    done = cli("add-training", ws, training_folder, "--json")
    assert done.returncode == 0, done.stderr
    assert_consistent(ws)
    assert scalar(db, "SELECT COUNT(*) FROM training_images") == N_TRAINING
    assert_index_consistent(ws)

    clean = Workspace.init(tmp_path / "clean").root
    assert cli("add-training", clean, training_folder).returncode == 0
    assert training_state(ws) == training_state(clean)
    assert_counts_current(ws)


# ---------------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def planted_ingested(tmp_path_factory) -> Path:
    """A workspace with the planted training set and generations, not audited (copied per test)."""
    files = planted_files(tmp_path_factory.mktemp("crash-planted"))
    ws = Workspace.init(files["train"].parent / "ws").root
    assert cli("add-training", ws, files["train"], "--captions", files["captions"]).returncode == 0
    assert cli("import-generations", ws, files["manifest"]).returncode == 0
    return ws


def copy_ws(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def cached_prompts(ws: Path) -> int:
    """Prompts whose distances the running audit has cached (at the run's grid: one file each)."""
    return len([p for p in (ws / "cache").glob("run-*/p*/prompt-*.npy") if "-g" not in p.name])


def curve_workers_alive() -> set[int]:
    """Pids of live (not zombie) ``core.curves`` processes."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"core.curves" in cmd and state != "Z":
            found.add(int(d.name))
    return found


def assert_audit_complete(ws: Path, summary: dict) -> None:
    assert_consistent(ws)
    assert rows_of(ws, "SELECT status, COUNT(*) FROM audit_runs GROUP BY status") == [("done", 1)]
    ((run_id,),) = rows_of(ws, "SELECT id FROM audit_runs")
    assert {p.name for p in (ws / "cache").iterdir()} == {f"run-{run_id}"}
    assert rows_of(ws, f"SELECT COUNT(*) FROM candidates WHERE run_id != {run_id}") == [(0,)]
    assert summary["flagged_prompts"] == len(FLAGGED) and summary["extracted_training_images"] == 4


def test_kill_during_audit_then_rerun_finishes(tmp_path, planted_ingested, capsys):
    ws = copy_ws(planted_ingested, tmp_path / "ws")
    kill_when(["audit", ws], lambda: cached_prompts(ws) >= 2, what="2 prompts audited")
    assert rows_of(ws, "SELECT COUNT(*) FROM candidates") == [(0,)]
    assert main(["audit", str(ws), "--json"]) == 0
    assert_audit_complete(ws, json.loads(capsys.readouterr().out))


def test_kill_during_an_audit_with_curve_workers_ends_the_workers_too(tmp_path, planted_ingested, capsys):
    """The tau-curve worker processes read their tasks from the audit's pipe: when the audit is
    killed, the pipe closes and they end; the rerun finishes as usual."""
    ws = copy_ws(planted_ingested, tmp_path / "ws")
    assert cli("settings", ws, "audit_workers", "2").returncode == 0
    before = curve_workers_alive()
    seen: set[int] = set()

    def point() -> bool:
        seen.update(curve_workers_alive() - before)
        return bool(seen) and cached_prompts(ws) >= 2

    kill_when(["audit", ws], point, what="2 prompts audited with curve workers running", poll=0.002)
    deadline = time.monotonic() + 20
    while seen & curve_workers_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not seen & curve_workers_alive(), "curve workers outlived the killed audit"
    assert main(["audit", str(ws), "--json"]) == 0
    assert_audit_complete(ws, json.loads(capsys.readouterr().out))


@pytest.mark.slow
def test_kill_audit_at_three_points_then_rerun_finishes(tmp_path, planted_ingested):
    ws = copy_ws(planted_ingested, tmp_path / "ws")
    points = [("first prompt cached", lambda: cached_prompts(ws) >= 1),
              ("five prompts cached", lambda: cached_prompts(ws) >= 5),
              ("storing results", lambda: any((ws / "cache").glob("run-*/nn_ids.npy")))]
    for what, point in points:
        kill_when(["audit", ws], point, what=what, poll=0.002)
        con = sqlite3.connect(ws / "audit.db")
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
    done = cli("audit", ws, "--json")
    assert done.returncode == 0, done.stderr
    assert_audit_complete(ws, json.loads(done.stdout))


# ---------------------------------------------------------------------------- what a rerun clears
def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path, planted_ingested):
    """A kill mid-write leaves ``.tmp-<pid>-...``; the next writer of that folder removes it unless its process lives."""
    import os
    import subprocess

    from core import tempfiles
    from core.index import TrainingIndex
    from core.training import add_training

    ws = Workspace.open(copy_ws(planted_ingested, tmp_path / "ws"))
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        planted = {}
        for folder in ("training/ab", "index"):
            (ws.root / folder).mkdir(parents=True, exist_ok=True)
            planted[folder] = (ws.root / folder / f".tmp-{dead}-x1.png", ws.root / folder / f".tmp-{live.pid}-x2.png",
                               ws.root / folder / f".tmp-{os.getpid()}-x3.png")
            for p in planted[folder]:
                p.write_bytes(b"half a file")
        TrainingIndex.open(ws, "pixel")
        assert [p.exists() for p in planted["index"]] == [False, True, True]
        empty = tmp_path / "empty"
        empty.mkdir()
        add_training(ws, empty)
        assert [p.exists() for p in planted["training/ab"]] == [False, True, True]
        assert tempfiles.remove_stale(tmp_path / "missing") == []
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tempfiles.remove_stale(ws.root)) == [f".tmp-{live.pid}-x2.png"] * 2


def test_an_audit_run_is_removed_only_once_its_process_is_gone(tmp_path, planted_ingested):
    """A killed audit's 'running' row and cache go at the next audit; a live one's lock keeps them."""
    import subprocess
    import sys

    from core import runs
    from core.store import now

    ws = Workspace.open(copy_ws(planted_ingested, tmp_path / "ws"))
    with ws.transaction() as con:
        run_id = con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES (?, 'running', '{}')", (now(),)).lastrowid
    cache = ws.root / "cache" / f"run-{run_id}"
    cache.mkdir(parents=True)
    (cache / "prompt-1.npy").write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(cache / runs.RUN_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.remove_abandoned_runs(ws) == []  # its process is alive: still auditing
        assert cache.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert runs.remove_abandoned_runs(ws) == [run_id]
    assert not cache.exists() and rows_of(ws.root, "SELECT COUNT(*) FROM audit_runs") == [(0,)]
    # a run row whose cache folder is gone altogether is abandoned too
    with ws.transaction() as con:
        other = con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES (?, 'running', '{}')", (now(),)).lastrowid
    assert runs.remove_abandoned_runs(ws) == [other]
