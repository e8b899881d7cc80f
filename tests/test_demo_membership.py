"""The membership demo's shipped digits: the split as recorded, the model and checkpoints loadable,
the shadows' IN/OUT assignment consistent with their pool; and (slow) the demo's attacks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from core.demo import digits as dd
from core.imagesets import file_digests


def test_split_csv_matches_the_files_and_the_recipe():
    with open(dd.SPLIT_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1797 and sum(r["member"] == "1" for r in rows) == 898
    pixels, labels = dd.digit_pixels()
    order = np.random.default_rng(dd.SPLIT_SEED).permutation(1797)
    assert {int(r["path"][-8:-4]) for r in rows if r["member"] == "1"} == set(order[:898].tolist())
    for r in rows[::97]:  # a sample: the file is the digit, at 16 x 16 RGB, in the folder its membership says
        i = int(r["path"][-8:-4])
        assert r["path"].startswith("members/" if r["member"] == "1" else "nonmembers/") and int(r["label"]) == labels[i]
        with Image.open(dd.DIGITS_DIR / r["path"]) as img:
            assert img.mode == "RGB" and img.size == (16, 16)
            assert (np.asarray(img) == pixels[i]).all()
    assert len(list(dd.MEMBERS_DIR.glob("*.png"))) == 898 and len(list(dd.NONMEMBERS_DIR.glob("*.png"))) == 899


def test_model_checkpoints_and_shadows_are_shipped_as_recorded():
    record = json.loads((dd.MODEL_DIR / "training.json").read_text())
    assert record["config"]["steps"] == dd.TRAIN["steps"] and record["config"]["unconditional"]
    assert "/work/" not in json.dumps(record) and not record["data"]["dir"].startswith("/")
    assert sorted(int(p.name[5:]) for p in dd.CHECKPOINTS_DIR.glob("step-*")) == list(dd.CHECKPOINT_STEPS)
    shadows = json.loads((dd.SHADOWS_DIR / "shadows.json").read_text())
    assert shadows["count"] == dd.SHADOWS and shadows["seeds"] == [dd.SHADOW_SEED * 1000 + i for i in range(dd.SHADOWS)]
    inside = np.array([[c == "1" for c in row] for row in shadows["inside"]])
    assert (inside.sum(0) == dd.SHADOWS // 2).all()
    with open(dd.SPLIT_CSV, newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert [im["path"] for im in shadows["images"]] == paths
    assert [im["sha256"] for im in shadows["images"][:20]] == file_digests([dd.DIGITS_DIR / p for p in paths[:20]])
    for i in range(dd.SHADOWS):  # each shadow trained on exactly its IN half
        with open(dd.SHADOWS_DIR / f"shadow-{i:02d}" / "examples.csv", newline="") as f:
            assert [r["file"] for r in csv.DictReader(f)] == [p for p, v in zip(paths, inside[i]) if v]
        assert not (dd.SHADOWS_DIR / f"shadow-{i:02d}" / "train_state.pt").exists()


@pytest.mark.slow  # 1,797 images through the model, 4 shadows and 3 checkpoints: minutes on a CPU
def test_the_demo_attacks_the_digits_model(tmp_path):
    from core.store import Workspace

    ws = Workspace.init(tmp_path / "ws")
    result = dd.run_membership_demo(ws)
    assert {"loss", "lira_online", "lira_offline"} <= set(result)
    assert [t["step"] for t in result["trend"]] == [*dd.CHECKPOINT_STEPS, dd.TRAIN["steps"]]
    # the figures README.md and assets/README.md report (deterministic up to float rounding)
    assert result["loss"]["auc"] == pytest.approx(0.521, abs=0.002)
    assert result["lira_online"]["auc"] == pytest.approx(0.486, abs=0.002)
    assert result["lira_offline"]["auc"] == pytest.approx(0.499, abs=0.002)
    assert [round(t["tpr_at_1pct_fpr"], 3) for t in result["trend"]] == [0.014, 0.013, 0.007, 0.012]
    assert dd.run_membership_demo(ws) == result  # a rerun reuses the stored runs
