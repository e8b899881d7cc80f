"""The embedded demo: a complete audit of the shipped model on the shipped training set.

``build_demo`` runs the ordinary pipeline, nothing special-cased: ingest the
training set (``add_training``), generate for every caption through
``generate`` on the CPU, and ``run_audit``. Reruns reuse what exists: the
training set is not ingested twice, generation resumes, and the audit is reused
when nothing changed since the last run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import Workspace

from .demo_data import DEMO_GUIDANCE, DEMO_PER_PROMPT, DEMO_STEPS

DEMO_BATCH = 64
DEMO_SEED = 0
DEMO_AUDIT = {"edge_threshold": 0.1, "min_clique": 10, "grid": 4, "delta": 0.15}


@dataclass
class DemoResult:
    workspace: Path
    run_id: int
    seconds: dict[str, float]
    summary_counts: dict[str, Any]
    table: list[dict] = field(default_factory=list)
    membership: dict[str, Any] = field(default_factory=dict)  # core.demo_digits.run_membership_demo

    @property
    def summary(self) -> str:
        c = self.summary_counts
        lines = [f"demo workspace: {self.workspace}",
                 f"audit run {self.run_id}: {c['prompts']} prompts, {c['flagged_prompts']} flagged, "
                 f"{c['extracted_training_images']} training images extracted",
                 "", "training duplicate count -> prompts / flagged / extracted"]
        lines += [f"  {r['k']:>4}  ->  {r['prompts']:3d} / {r['flagged']:3d} / {r['extracted']:3d}" for r in self.table]
        if self.membership:
            from .demo_digits import membership_summary

            lines += [""] + membership_summary(self.membership)
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"workspace": str(self.workspace), "run_id": self.run_id, "seconds": self.seconds,
                "counts": self.summary_counts, "figure5": self.table, "membership": self.membership}


def build_demo(root: str | Path, *, progress: bool = True, per_prompt: int = DEMO_PER_PROMPT, steps: int = DEMO_STEPS,
               device: str = "cpu", membership: bool = True) -> DemoResult:
    from . import audit
    from .demo_data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_PROMPTS
    from .generate import generate, read_prompts
    from .training import add_training

    ws = Workspace.init(root)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    if ws.counts()["training_images"] == 0:
        add_training(ws, DEMO_DATA_DIR, captions=DEMO_DATA_DIR / "captions.csv")
    seconds["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    report = generate(ws, str(DEMO_MODEL_DIR), read_prompts(DEMO_PROMPTS), per_prompt, steps=steps, guidance=DEMO_GUIDANCE,
                      batch_size=DEMO_BATCH, seed=DEMO_SEED, device=device)
    seconds["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    params = audit.params_from(ws, **DEMO_AUDIT)
    run_id = audit.latest_run(ws)
    if run_id is None or report.generated > 0 or not _same_params(audit.run_params(ws, run_id), params):
        run_id = audit.run_audit(ws, params)
    seconds["audit"] = time.perf_counter() - t

    found: dict[str, Any] = {}
    if membership:  # the digits model: loss attack, LiRA, the trend along training (core.demo_digits)
        from .demo_digits import run_membership_demo

        t = time.perf_counter()
        found = run_membership_demo(ws)
        seconds["membership"] = time.perf_counter() - t
    return DemoResult(ws.root, run_id, seconds, audit.count_summary(ws, run_id), audit.caption_duplicate_table(ws, run_id),
                      found)


def _same_params(a, b) -> bool:
    """Equal audit parameters, ignoring the working size (0 in a request means "resolve from the data")."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("working_size")
    db.pop("working_size")
    return da == db


def train_demo_model(steps: int | None = None, seed: int | None = None):
    """Retrain the shipped demo model with the shipped recipe (see assets/README.md)."""
    from .demo_data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_TRAIN_SEED, DEMO_TRAIN_STEPS, DEMO_TRAIN_THREADS
    from .train import train

    # the weights depend on the thread count too: the shipped ones were trained on DEMO_TRAIN_THREADS
    return train(DEMO_DATA_DIR, DEMO_MODEL_DIR, steps=steps or DEMO_TRAIN_STEPS,
                 seed=DEMO_TRAIN_SEED if seed is None else seed, threads=DEMO_TRAIN_THREADS)
