"""The embedded demo: a complete audit of the shipped model on the shipped training set.

``build_demo`` runs the ordinary pipeline, nothing special-cased: ingest the
training set (``add_training``), generate for every caption through
``generate`` on the CPU, ``run_audit``, and ``triage`` of every caption (scored
against the audit's verdicts, so the demo shows how well the cheap score would have
picked the prompts to generate for). Reruns reuse what exists: the training set is
not ingested twice, generation and triage resume, and the audit is reused when
nothing changed since the last run.
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
DEMO_TRIAGE = {"method": "noise-norm", "steps": 1, "samples": 4, "seed": 0}


@dataclass
class DemoResult:
    workspace: Path
    run_id: int
    seconds: dict[str, float]
    summary_counts: dict[str, Any]
    table: list[dict] = field(default_factory=list)
    triage: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        c = self.summary_counts
        lines = [f"demo workspace: {self.workspace}",
                 f"audit run {self.run_id}: {c['prompts']} prompts, {c['flagged_prompts']} flagged, "
                 f"{c['extracted_training_images']} training images extracted",
                 "", "training duplicate count -> prompts / flagged / extracted"]
        lines += [f"  {r['k']:>4}  ->  {r['prompts']:3d} / {r['flagged']:3d} / {r['extracted']:3d}" for r in self.table]
        if self.triage:
            lines += ["", self.triage["summary"]]
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"workspace": str(self.workspace), "run_id": self.run_id, "seconds": self.seconds,
                "counts": self.summary_counts, "figure5": self.table, "triage": self.triage}


def build_demo(root: str | Path, *, progress: bool = True, per_prompt: int = DEMO_PER_PROMPT, steps: int = DEMO_STEPS,
               device: str = "cpu") -> DemoResult:
    from . import audit, triage
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

    t = time.perf_counter()
    triage_params = triage.make_params(ws, guidance=DEMO_GUIDANCE, sampling_steps=steps, **DEMO_TRIAGE)
    scored = triage.triage(ws, str(DEMO_MODEL_DIR), read_prompts(DEMO_PROMPTS), triage_params, batch_size=DEMO_BATCH, device=device)
    check = triage.validate(ws, scored.run_id, run_id, "extracted")
    seconds["triage"] = time.perf_counter() - t
    triage_result = {"run_id": scored.run_id, "parameters": triage_params.to_dict(), "prompts": check.prompts,
                     "extracted": check.positives, "auc": check.auc, "tpr_at_1pct_fpr": check.tpr_at_1pct_fpr,
                     "keep_all_threshold": check.keep_all_threshold, "keep_all_rank": check.keep_all_rank,
                     "summary": check.summary()}
    return DemoResult(ws.root, run_id, seconds, audit.count_summary(ws, run_id), audit.caption_duplicate_table(ws, run_id),
                      triage_result)


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
