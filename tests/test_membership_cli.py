"""`memaudit mia`, `mia-trend`, `mia-runs`, `train-shadows` and the export, end to end on tiny real
pipelines and shadow models trained here; every user error one line, the workspace unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.store import Workspace
from test_bad_input import assert_one_line_error, snapshot
from tiny_models import build_unconditional

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """8 members and 8 non-members of 16 x 16, a pool manifest of all 16, a tiny model."""
    root = tmp_path_factory.mktemp("mia-cli")
    rng = np.random.default_rng(0)
    rows = ["path,member"]
    for kind in ("members", "nonmembers"):
        (root / kind).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / kind / f"{i}.png")
            rows.append(f"{kind}/{i}.png,{int(kind == 'members')}")
    (root / "pool.csv").write_text("\n".join(rows) + "\n")
    build_unconditional(root / "model")
    (root / "checkpoints").mkdir()
    build_unconditional(root / "checkpoints" / "step-5", seed=3)
    return root


def test_loss_attack_lira_trend_and_export_end_to_end(sets, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run(capsys, "init", ws)[0] == 0
    code, out, err = run(capsys, "mia", ws, "--model", sets / "model", "--members", sets / "members",
                         "--nonmembers", sets / "nonmembers", "--timestep", 40, "--noise-draws", 2, "--json")
    assert code == 0, err
    loss = json.loads(out)
    assert loss["attack"] == "loss" and loss["timestep"] == 40 and loss["metrics"]["members"] == 8

    shadows = tmp_path / "shadows"
    code, out, err = run(capsys, "train-shadows", sets / "pool.csv", shadows, "--count", 2, "--steps", 3, "--size", 16,
                         "--batch-size", 4, "--unconditional", "--seed", 7)
    assert code == 0, err
    assert "2 of 2 shadow models trained" in out
    record = json.loads((shadows / "shadows.json").read_text())
    assert record["seeds"] == [7000, 7001] and len(record["images"]) == 16
    assert all(a != b for a, b in zip(*record["inside"]))  # each image IN for exactly one of the two
    # a rerun finds them done (resumable) and trains nothing
    before = (shadows / "shadow-00" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert run(capsys, "train-shadows", sets / "pool.csv", shadows, "--count", 2, "--steps", 3, "--size", 16,
               "--batch-size", 4, "--unconditional", "--seed", 7)[0] == 0
    assert (shadows / "shadow-00" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before

    code, out, err = run(capsys, "mia", ws, "--model", sets / "model", "--members", sets / "members",
                         "--nonmembers", sets / "nonmembers", "--attack", "lira", "--shadow-dir", shadows,
                         "--timestep", 40, "--noise-draws", 2)
    assert code == 0, err
    assert "LiRA offline: AUC" in out

    code, out, err = run(capsys, "mia-trend", ws, "--checkpoints", sets / "checkpoints", "--model", sets / "model",
                         "--members", sets / "members", "--nonmembers", sets / "nonmembers", "--timestep", 40,
                         "--noise-draws", 1, "--json")
    assert code == 0, err
    assert [r["step"] for r in json.loads(out)["runs"]] == [5, 6]  # the final model: one past the last checkpoint

    code, out, _ = run(capsys, "mia-runs", ws)
    assert code == 0 and len(out.strip().splitlines()) == 4

    code, out, err = run(capsys, "export", ws, "--format", "json", "--out", "-")
    assert code == 0, err
    runs = json.loads(out)["membership_runs"]
    assert [r["attack"] for r in runs] == ["loss", "lira", "loss", "loss"]
    for r in runs:
        assert {"attack", "timestep", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "members", "nonmembers", "scores"} <= set(r)
        assert len(r["scores"]) == 16 and sum(s["member"] for s in r["scores"]) == 8
        assert all(Path(s["path"]).is_file() for s in r["scores"])
    assert all(s["score_offline"] is not None for s in runs[1]["scores"])


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: over a minute on a loaded 2-core machine
def test_the_installed_command_runs_the_attack(sets, tmp_path):
    """The real console path in a fresh process (imports, argument parsing, exit status)."""
    ws = tmp_path / "ws"
    Workspace.init(ws)
    proc = subprocess.run([sys.executable, "-m", "core.cli", "mia", str(ws), "--model", str(sets / "model"),
                           "--members", str(sets / "members"), "--nonmembers", str(sets / "nonmembers"),
                           "--timestep", "10", "--noise-draws", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("membership run 1: loss at t=10, 8 members / 8 non-members: AUC ")


def test_user_errors_are_one_line_and_change_nothing(sets, tmp_path, capsys):
    ws = tmp_path / "ws"
    Workspace.init(ws)
    before = snapshot(ws)
    bad_model = tmp_path / "flow"
    build_unconditional(bad_model)
    cfg = bad_model / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "flow"}))
    wrong_size = tmp_path / "big"
    wrong_size.mkdir()
    Image.new("RGB", (24, 24)).save(wrong_size / "a.png")
    base = ["mia", ws, "--model", sets / "model", "--members", sets / "members", "--timestep", 10]
    cases = [
        (base + ["--nonmembers", sets / "members"], "both members and non-members"),
        (base + ["--nonmembers", wrong_size], "is 24 x 24; this model takes 16 x 16"),
        (["mia", ws, "--model", bad_model, "--members", sets / "members", "--nonmembers", sets / "nonmembers"],
         "prediction_type is 'flow'"),
        (base + ["--nonmembers", sets / "nonmembers", "--timestep", 100], "outside the model's schedule 0..99"),
        (base + ["--nonmembers", sets / "nonmembers", "--timestep", -1], "mia_timestep must be >= 0"),
        (base + ["--nonmembers", sets / "nonmembers", "--noise-draws", 0], "mia_noise_draws must be >= 1"),
        (base + ["--nonmembers", sets / "nonmembers", "--attack", "lira"], "needs --shadow-dir"),
        (base + ["--nonmembers", sets / "nonmembers", "--attack", "lira", "--shadow-dir", tmp_path],
         "holds no shadow models"),
        (base + ["--nonmembers", tmp_path / "nowhere"], "no such folder or manifest"),
        (["train-shadows", sets / "pool.csv", tmp_path / "s", "--count", 3, "--steps", 1, "--unconditional"], "must be even"),
        (["train-shadows", sets / "pool.csv", tmp_path / "s", "--steps", 1], "has no caption"),
        (["train-shadows", sets / "pool.csv", tmp_path / "s"], "give --like MODEL"),
        (["train-shadows", sets / "pool.csv", tmp_path / "s", "--like", sets / "model"], "has no training.json"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
    assert snapshot(ws) == before
