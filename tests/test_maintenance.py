import json

from core import audit, labels, results
from core.cli import main
from core.maintenance import backup, verify
from core.store import Workspace
from workspaces import planted_workspace


def test_backup_is_a_complete_consistent_workspace(tmp_path, capsys):
    ws, run_id = planted_workspace(tmp_path / "src")
    cand = results.candidates(ws, run_id, flagged_only=True)[0]
    labels.add_label(ws, cand.id, "exact_copy", "alice")
    out = backup(ws, tmp_path / "copy")
    copy = Workspace.open(out)
    assert copy.counts() == ws.counts()
    assert verify(copy).ok
    assert [e.label for e in labels.label_events(copy)] == ["exact_copy"]
    # the copy audits on its own (index rebuilt or copied, cache re-derived)
    assert audit.run_audit(copy) > 0
    assert main(["verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_verify_reports_missing_files_and_exits_1(tmp_path, capsys):
    ws, _ = planted_workspace(tmp_path / "src", audit=False)
    with ws.connect() as con:
        rel = con.execute("SELECT path FROM generations LIMIT 1").fetchone()[0]
    ws.resolve(rel).unlink()
    (ws.root / "generations" / "orphan.png").write_bytes(b"x")
    report = verify(ws)
    assert not report.ok and report.missing == [rel] and "generations/orphan.png" in report.orphans
    try:
        code = main(["verify", str(ws.root)])
    except SystemExit as e:
        code = e.code
    assert code == 1 and "missing: " + rel in capsys.readouterr().out


def test_backup_refuses_a_non_empty_target(tmp_path, capsys):
    ws = Workspace.init(tmp_path / "ws")
    target = tmp_path / "t"
    target.mkdir()
    (target / "x").write_text("keep me")
    assert main(["backup", str(ws.root), str(target)]) == 1
    assert "not empty" in capsys.readouterr().err and (target / "x").read_text() == "keep me"
