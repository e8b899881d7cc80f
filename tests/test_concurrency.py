"""Several reviewers labelling one workspace at once: every label event is stored exactly once,
none is lost, each reviewer's current labels are what their own actions imply, and no
"database is locked" reaches anyone, even while another writer holds the lock for a while.

Reviewers are separate processes (``tests/reliability.py label-worker``, core.labels), threads
of one process (as Streamlit sessions of one server are), ``memaudit label`` commands, and
two browser sessions of one dashboard server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core import labels
from core.results import candidates
from core.store import Workspace
from reliability import ENV, ROOT, assert_consistent, events_json, label_worker, small_audited_workspace


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Workspace, int]:
    return small_audited_workspace(tmp_path_factory.mktemp("concurrency"))


@pytest.fixture
def ws(audited, tmp_path) -> Workspace:
    import shutil

    shutil.copytree(audited[0].root, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def replay(ws: Workspace, logs: dict[str, list[dict]], cli_labels: list[tuple[str, int, str]]) -> dict:
    """What current_labels must hold, from each reviewer's own actions alone; checks every event on the way."""
    by_id = {e["id"]: e for e in events_json(ws.root)}
    pair = {c.id: (c.medoid_generation_id, c.nearest_training_id) for c in candidates(ws)}
    expected: dict[tuple, dict[str, str]] = {}
    for reviewer, ops in logs.items():
        in_force: list[tuple[int, tuple, str]] = []
        for op in ops:
            event = by_id.get(op["event"])
            if op["op"] == "label":
                assert event is not None, f"{reviewer}: event {op['event']} was lost"
                assert (event["token"], event["candidate_id"], event["label"], event["reviewer"]) == \
                       (op["token"], op["candidate"], op["label"], reviewer)
                in_force.append((op["event"], pair[op["candidate"]], op["label"]))
            elif op["event"] is None:
                assert not in_force, f"{reviewer}: undo found nothing although labels were in force"
            else:
                cancelled = in_force.pop()
                assert event["undoes"] == cancelled[0] and event["token"] == op["token"]
        for _, p, label in sorted(in_force):
            expected.setdefault(p, {})[reviewer] = label
    for reviewer, cid, label in cli_labels:
        expected.setdefault(pair[cid], {})[reviewer] = label
    return expected


def hold_write_lock(db: Path, seconds: float, times: int) -> subprocess.Popen:
    """Another writer that takes the database's write lock and keeps it ``seconds`` at a time (a long transaction)."""
    code = ("import sqlite3, sys, time\n"
            "for _ in range(int(sys.argv[3])):\n"
            "    con = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)\n"
            "    con.execute('BEGIN IMMEDIATE'); time.sleep(float(sys.argv[2])); con.execute('COMMIT'); con.close()\n"
            "    time.sleep(0.3)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds), str(times)])


def soak(ws: Workspace, tmp_path: Path, *, processes: int, threads: int, per_reviewer: int, cli_labels: int) -> dict:
    """Run every kind of reviewer at once; return the per-reviewer logs and the CLI labels written."""
    cands = candidates(ws)
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    procs = {f"proc{i}": subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "reliability.py"), "label-worker", str(ws.root), f"proc{i}",
         str(per_reviewer), str(i), str(logs_dir / f"proc{i}.jsonl")],
        cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) for i in range(processes)}
    blocker = hold_write_lock(ws.db_path, 1.0, 2)
    errors: list[BaseException] = []

    def thread_reviewer(name: str, seed: int) -> None:
        try:
            label_worker(str(ws.root), name, per_reviewer // 2, seed, str(logs_dir / f"{name}.jsonl"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=thread_reviewer, args=(f"thread{i}", 100 + i)) for i in range(threads)]
    for t in workers:
        t.start()
    done_cli: list[tuple[str, int, str]] = []
    cli_errors = []
    for j in range(cli_labels):  # `memaudit label`, as a person at a terminal runs it, meanwhile
        cid, label = cands[j % len(cands)].id, ("near_copy", "unsure", "exact_copy")[j % 3]
        run = subprocess.run([sys.executable, "-m", "core.cli", "label", str(ws.root), str(cid), label, "--reviewer", "carol"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True)
        if run.returncode != 0 or run.stderr:
            cli_errors.append(run.stderr)
        done_cli.append(("carol", cid, label))
    for t in workers:
        t.join()
    failures = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        if p.returncode != 0 or err.strip():
            failures[name] = err[-3000:]
    blocker.wait(timeout=60)
    assert not errors, errors
    assert not failures, failures
    assert not cli_errors, cli_errors
    logs = {path.stem: read_log(path) for path in sorted(logs_dir.glob("*.jsonl"))}
    assert sorted(logs) == sorted([*procs, *(f"thread{i}" for i in range(threads))])
    return {"logs": logs, "cli": done_cli}


def check_soak(ws: Workspace, result: dict) -> int:
    logs, cli = result["logs"], result["cli"]
    written = sum(1 for ops in logs.values() for op in ops if op["event"] is not None) + len(cli)
    events = events_json(ws.root)
    assert len(events) == written  # exactly once: none lost, none doubled by the retried deliveries
    assert len({e["token"] for e in events if e["token"] is not None}) == written - len(cli)
    assert labels.current_labels(ws) == replay(ws, logs, cli)
    assert_consistent(ws.root)
    return written


def test_reviewer_processes_threads_and_cli_label_at_once(ws, tmp_path):
    result = soak(ws, tmp_path, processes=3, threads=2, per_reviewer=200, cli_labels=12)
    check_soak(ws, result)
    assert {e["reviewer"] for e in events_json(ws.root)} == {"proc0", "proc1", "proc2", "thread0", "thread1", "carol"}


@pytest.mark.slow
def test_soak_six_processes_four_threads_hundreds_of_events_each(ws, tmp_path):
    result = soak(ws, tmp_path, processes=6, threads=4, per_reviewer=500, cli_labels=40)
    check_soak(ws, result)


def test_the_same_click_delivered_by_many_threads_is_one_event(ws):
    """A retried request racing its original (same token): one event, every caller gets its id."""
    cand = candidates(ws)[0]
    ids: list[int] = []
    barrier = threading.Barrier(8)

    def click() -> None:
        barrier.wait()
        ids.append(labels.add_label(ws, cand.id, "exact_copy", "dora", token="dora:click-1"))

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert [(e["reviewer"], e["token"]) for e in events_json(ws.root)] == [("dora", "dora:click-1")]


# ---------------------------------------------------------------------------- two browser sessions
CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
def test_two_browser_sessions_on_one_server_label_at_once(ws):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (`make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import re
    import time

    from servers import free_port, running_dashboard

    rounds = 4
    log_path = ws.root.parent / "server.log"
    with running_dashboard(ws.root, free_port(), log_path, cwd=ROOT, env=ENV) as base:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            sessions = {}
            for reviewer in ("erin", "frank"):
                page = browser.new_context().new_page()
                page.goto(f"{base}/review?reviewer={reviewer}")
                page.get_by_role("button", name=re.compile("^Exact copy")).wait_for(timeout=60_000)
                sessions[reviewer] = page

            def mine(reviewer: str) -> list[dict]:
                return [e for e in events_json(ws.root) if e["reviewer"] == reviewer]

            for r in range(rounds):
                # both sessions click before either's write is awaited: the server handles them together
                sessions["erin"].get_by_role("button", name=re.compile("^Exact copy")).click()
                sessions["frank"].get_by_role("button", name=re.compile("^Not memorized")).click()
                deadline = time.monotonic() + 60
                while min(len(mine("erin")), len(mine("frank"))) < r + 1:
                    assert time.monotonic() < deadline, (mine("erin"), mine("frank"))
                    time.sleep(0.1)
                for page in sessions.values():  # the next candidate is on screen before the next click
                    page.wait_for_function(
                        "() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState === 'notRunning'",
                        timeout=60_000)
                    page.get_by_role("button", name=re.compile("^Exact copy")).wait_for(timeout=60_000)
            for page in sessions.values():
                assert page.locator('[data-testid="stException"]').count() == 0
            browser.close()
    erin, frank = mine("erin"), mine("frank")
    assert [e["label"] for e in erin] == ["exact_copy"] * rounds
    assert [e["label"] for e in frank] == ["not_memorized"] * rounds
    for events in (erin, frank):  # each click labelled the next candidate of that reviewer's own queue
        assert len({e["candidate_id"] for e in events}) == rounds
    current = labels.current_labels(ws)
    assert sum(1 for by in current.values() if "erin" in by) == rounds
    assert sum(1 for by in current.values() if "frank" in by) == rounds
    assert "database is locked" not in log_path.read_text()
    assert_consistent(ws.root)


def test_reading_current_labels_grows_linearly_with_the_events(ws, monkeypatch):
    """Every page rerun reads the current labels: the work (SQLite VM steps, not time) for twice the
    events must be about twice, not four times (a correlated subquery per event made it quadratic)."""
    import contextlib

    from core.store import now

    real = Workspace.connect
    steps = [0]

    @contextlib.contextmanager
    def counting(self):
        with real(self) as con:
            con.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 100)
            yield con

    cands = candidates(ws)

    def add_events(n: int) -> None:
        with ws.transaction() as con:
            for i in range(n):
                c = cands[i % len(cands)]
                eid = con.execute("INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, "
                                  "created_at) VALUES (?, ?, ?, ?, 'unsure', ?)",
                                  (c.id, c.medoid_generation_id, c.nearest_training_id, f"r{i % 7}", now())).lastrowid
                if i % 3 == 0:  # every third label undone
                    con.execute("INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, "
                                "created_at, undoes) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                                (c.id, c.medoid_generation_id, c.nearest_training_id, f"r{i % 7}", now(), eid))

    work = []
    monkeypatch.setattr(Workspace, "connect", counting)
    for _ in range(2):
        add_events(1500)
        steps[0] = 0
        labels.current_labels(ws)
        labels.undo_last(ws, "nobody")
        work.append(steps[0])
    assert work[1] < 2.6 * work[0], work
