"""The embedded demo end to end: the shipped model's audit finds what it memorised, and only that."""

import csv

from core import results
from core.demo.data import DEMO_SOURCES
from core.demo.runner import build_demo
from core.store import Workspace


def _copies_by_caption() -> dict[str, int]:
    out: dict[str, int] = {}
    with open(DEMO_SOURCES, newline="") as f:
        for row in csv.DictReader(f):
            out[row["caption"]] = max(out.get(row["caption"], 0), int(row["copies"]))
    return out


def test_demo_flags_duplicated_images_and_not_novel_ones(tmp_path):
    result = build_demo(tmp_path / "demo", progress=False, membership=False)  # membership: tests/test_demo_membership.py
    copies = _copies_by_caption()
    rows = {r.prompt: r for r in results.prompt_results(Workspace.open(result.workspace), result.run_id)}
    assert set(rows) == set(copies)
    by_level: dict[int, list] = {}
    for caption, r in rows.items():
        by_level.setdefault(copies[caption], []).append(r)
    hundred = by_level[100]
    assert all(r.flagged and r.extracted for r in hundred), [r.prompt for r in hundred if not r.extracted]
    assert all(r.best_l2 is not None and r.best_l2 < 0.1 for r in hundred)
    singles = by_level[1]
    assert sum(r.flagged for r in singles) <= len(singles) // 4, [r.prompt for r in singles if r.flagged]
    # triage of every caption, checked against the audit (README: AUC 0.746, TPR 0.467 at 1% FPR)
    t = result.triage
    assert (t["prompts"], t["extracted"]) == (36, 15)
    assert t["auc"] > 0.7 and t["tpr_at_1pct_fpr"] > 0.4, t
    # a rerun reuses everything: no new generations, the same audit run, the same triage run
    again = build_demo(tmp_path / "demo", progress=False, membership=False)
    assert again.run_id == result.run_id and again.triage["run_id"] == t["run_id"]


def test_demo_train_uses_the_shipped_recipe(monkeypatch):
    """`memaudit demo train` retrains with the recorded steps, seed and thread count (the weights
    depend on all three); the real training run is covered by tests/test_train.py."""
    import core.demo.trainer
    from core.cli import main
    from core.demo.data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_TRAIN_SEED, DEMO_TRAIN_STEPS, DEMO_TRAIN_THREADS

    calls = []
    monkeypatch.setattr(core.demo.trainer, "train", lambda *a, **k: calls.append((a, k)) or "report")
    assert main(["demo", "train"]) == 0
    assert calls == [((DEMO_DATA_DIR, DEMO_MODEL_DIR), {"steps": DEMO_TRAIN_STEPS, "seed": DEMO_TRAIN_SEED, "threads": DEMO_TRAIN_THREADS})]
    assert main(["demo", "train", "--train-steps", "7", "--seed", "3"]) == 0
    assert calls[-1][1]["steps"] == 7 and calls[-1][1]["seed"] == 3
