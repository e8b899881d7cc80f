import sqlite3
import threading

import pytest

from core import config
from core.errors import WorkspaceError
from core.store import SCHEMA_VERSION, Workspace


def test_init_records_numbered_migrations(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        rows = con.execute("SELECT version, name FROM migrations ORDER BY version").fetchall()
        assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for sub in ("generations", "training", "index", "cache"):
        assert (ws.root / sub).is_dir()


def test_open_refuses_non_workspace_and_newer_schema(tmp_path):
    with pytest.raises(WorkspaceError, match="not a memaudit workspace"):
        Workspace.open(tmp_path)
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        con.execute("INSERT INTO migrations(version, name, applied_at) VALUES (?, 'future', 'x')", (SCHEMA_VERSION + 1,))
    with pytest.raises(WorkspaceError, match="newer memaudit"):
        Workspace.open(ws.root)


def test_init_on_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(WorkspaceError, match="not a folder"):
        Workspace.init(f)


def test_concurrent_opens_migrate_once(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    errors = []

    def opener():
        try:
            Workspace.init(root)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    with Workspace(root).connect() as con:
        assert con.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == SCHEMA_VERSION


def test_settings_override_defaults_and_are_checked(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    assert ws.get_setting("edge_threshold") == config.default("edge_threshold")
    ws.set_setting("edge_threshold", "0.07")
    assert Workspace.open(ws.root).settings()["edge_threshold"] == 0.07
    with pytest.raises(ValueError, match="edge_threshold must be <= 0.3"):
        ws.set_setting("edge_threshold", 3)
    with pytest.raises(ValueError, match="embedder must be one of"):
        ws.set_setting("embedder", "sift")


def test_every_setting_is_documented():
    for s in config.SETTINGS.values():
        assert s.help and len(s.help) > 20, s.name
        s.check(s.default)


def test_resolve_refuses_paths_outside_the_workspace(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    assert ws.resolve("generations/1/a.png") == ws.root / "generations/1/a.png"
    for bad in ("../secret.png", "/etc/passwd", "generations/../../x"):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            ws.resolve(bad)


def test_label_check_constraint_holds_in_sql(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con, pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("INSERT INTO label_events(generation_id, reviewer, label, created_at) VALUES (1, 'a', 'maybe', 'now')")
