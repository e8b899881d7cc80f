"""The CLI contract end to end, through the installed `memaudit` entry point function."""

import csv
import json

import pytest

from core.cli import build_parser, main
from workspaces import FLAGGED, NOT_FLAGGED, planted_files


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return planted_files(tmp_path_factory.mktemp("cli-data"))


def test_end_to_end_planted_copies_flagged_and_extracted(tmp_path, files, capsys):
    ws = tmp_path / "ws"
    assert run(capsys, "init", ws)[0] == 0
    code, out, _ = run(capsys, "add-training", ws, files["train"], "--captions", files["captions"], "--json")
    assert code == 0 and json.loads(out)["added"] == 8
    code, out, _ = run(capsys, "import-generations", ws, files["manifest"])
    assert code == 0 and "imported 92 generations" in out
    code, out, _ = run(capsys, "audit", ws, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["flagged_prompts"] == 3 and summary["extracted_training_images"] == 4
    assert summary["parameters"]["edge_threshold"] == 0.1

    code, _, _ = run(capsys, "export", ws, "--format", "json", "--out", tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data) >= {"prompts", "candidates", "label_events", "parameters"}
    flagged = {p["prompt"] for p in data["prompts"] if p["flagged"]}
    assert flagged == set(FLAGGED)
    assert {p["prompt"] for p in data["prompts"]} == set(FLAGGED) | set(NOT_FLAGGED)
    cand = next(c for c in data["candidates"] if c["flagged"])
    for key in ("id", "prompt", "clique_size", "mean_distance", "medoid", "nearest_training", "l2", "tiled_l2", "extracted", "labels"):
        assert key in cand
    assert (ws / cand["medoid"]).is_file() and (ws / cand["nearest_training"]).is_file()

    code, out, _ = run(capsys, "label", ws, cand["id"], "exact_copy", "--reviewer", "alice", "--note", "same pixels")
    assert code == 0 and "exact_copy" in out
    code, out, _ = run(capsys, "export", ws, "--format", "csv", "--out", "-")
    rows = list(csv.DictReader(out.splitlines()))
    labelled = next(r for r in rows if r["id"] == str(cand["id"]))
    assert labelled["labels"] == "alice=exact_copy"
    data = json.loads(run(capsys, "export", ws, "--format", "json", "--out", "-")[1])
    assert data["label_events"][0]["note"] == "same pixels" and data["label_events"][0]["reviewer"] == "alice"

    code, out, _ = run(capsys, "runs", ws, "--json")
    assert len(json.loads(out)["runs"]) == 1
    code, out, _ = run(capsys, "duplicates", ws, "--top", "3", "--out", tmp_path / "prompts.txt")
    assert code == 0 and len((tmp_path / "prompts.txt").read_text().splitlines()) == 3


def test_user_errors_are_one_line_exit_1(tmp_path, capsys):
    code, out, err = run(capsys, "audit", tmp_path / "nope")
    assert code == 1 and err.count("\n") == 1 and "not a memaudit workspace" in err and "Traceback" not in err
    run(capsys, "init", tmp_path / "ws")
    code, _, err = run(capsys, "add-training", tmp_path / "ws", tmp_path / "missing")
    assert code == 1 and err.startswith("memaudit: error:") and err.count("\n") == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "generate", tmp_path / "ws", "--model", tmp_path, "--prompts", empty)
    assert code == 1 and err.count("\n") == 1
    code, _, err = run(capsys, "label", tmp_path / "ws", "999", "exact_copy", "--reviewer", "a")
    assert code == 1 and "no candidate 999" in err


def test_every_subcommand_has_complete_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    required = {"init", "add-training", "generate", "import-generations", "audit", "export", "label", "duplicates", "dashboard", "demo"}
    assert required <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest}"
    audit_flags = {o for a in sub.choices["audit"]._actions for o in a.option_strings}
    assert {"--edge-threshold", "--min-clique", "--grid", "--delta", "--neighbours", "--embedder", "--json"} <= audit_flags
    gen_flags = {o for a in sub.choices["generate"]._actions for o in a.option_strings}
    assert {"--model", "--prompts", "--per-prompt", "--steps", "--guidance", "--batch-size", "--seed", "--device"} <= gen_flags


def test_generate_through_the_cli_with_tiny_real_pipelines(tmp_path, capsys, tiny_text2image, tiny_unconditional):
    ws = tmp_path / "ws"
    run(capsys, "init", ws)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    argv = ["generate", ws, "--model", tiny_text2image, "--prompts", prompts, "--per-prompt", 3, "--steps", 2,
            "--batch-size", 2, "--seed", 5, "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(out)["generated"] == 6
    code, out, _ = run(capsys, *argv)  # a rerun resumes: nothing left to do
    assert code == 0 and json.loads(out)["generated"] == 0 and json.loads(out)["skipped_existing"] == 6
    code, out, _ = run(capsys, "generate", ws, "--model", tiny_unconditional, "--per-prompt", 4, "--steps", 2, "--json")
    assert code == 0 and json.loads(out)["generated"] == 4
    from core.store import Workspace

    with Workspace.open(ws).connect() as con:
        seeds = sorted(r[0] for r in con.execute("SELECT seed FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE p.text = 'a red square'"))
        assert seeds == [5, 6, 7]
        assert con.execute("SELECT COUNT(*) FROM generations g JOIN prompts p ON p.id = g.prompt_id WHERE p.text = ''").fetchone()[0] == 4


def test_audit_says_where_budgets_left_answers_uncertain(tmp_path, capsys):
    from workspaces import templated_files

    files = templated_files(tmp_path / "data", prompts=3, lookalikes=12)
    ws = tmp_path / "ws"
    run(capsys, "init", ws)
    run(capsys, "add-training", ws, files["train"], "--captions", files["captions"])
    run(capsys, "import-generations", ws, files["manifest"])
    code, out, _ = run(capsys, "audit", ws, "--grid-choices", "", "--json")
    full = json.loads(out)
    assert code == 0 and full["clique_bounds"] == 0 and full["uncertified_nearest"] == 0
    assert full["extracted_candidates"] == 3
    # templated look-alikes come before the copy by every bound: 5 exact distances cannot settle it,
    # and the summary, the export and the text say so
    code, out, _ = run(capsys, "audit", ws, "--grid-choices", "", "--nearest-budget", 5, "--neighbours", 1)
    assert code == 0
    assert "nearest training image is not certified" in out and "raise nearest_budget" in out
    code, out, _ = run(capsys, "export", ws, "--format", "json", "--out", "-")
    data = json.loads(out)
    assert data["summary"]["uncertified_nearest"] > 0
    assert any(c["nearest_certified"] is False for c in data["candidates"])
    assert all(c["nearest_lower"] <= c["l2"] + 1e-6 for c in data["candidates"])
    assert {"clique_exact", "nearest_certified"} <= set(data["candidates"][0])
    assert "clique_exact" in data["prompts"][0]
