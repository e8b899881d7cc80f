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

from ..store import Workspace
from .data import DEMO_GUIDANCE, DEMO_PER_PROMPT, DEMO_STEPS

DEMO_BATCH = 64
DEMO_SEED = 0
DEMO_AUDIT = {"edge_threshold": 0.1, "min_clique": 10, "grid": 4, "delta": 0.15}
DEMO_TRIAGE = {"method": "noise-norm", "steps": 1, "samples": 4, "seed": 0}
# Inpainting on the digits model (assets/demo/digits): per_group members and as many non-members
DEMO_INPAINT = {"per_group": 50, "mask": "left", "samples": 4, "steps": 20, "seed": 0}  # steps: the digits model's training grid


@dataclass
class DemoResult:
    workspace: Path
    run_id: int
    seconds: dict[str, float]
    summary_counts: dict[str, Any]
    table: list[dict] = field(default_factory=list)
    triage: dict[str, Any] = field(default_factory=dict)
    inpainting: dict[str, Any] | None = None  # the digits inpainting run's summary (None: skipped)
    notes: list[str] = field(default_factory=list)
    membership: dict[str, Any] = field(default_factory=dict)  # core.demo.digits.run_membership_demo

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
        if self.inpainting is not None:
            ip = self.inpainting
            med = lambda kind, group: ip[kind][group]["median"]  # noqa: E731
            lines += ["", f"inpainting run {ip['run_id']} on the digits model ({ip['members']} members, {ip['nonmembers']} "
                          f"non-members, {ip['mask']} half masked, {ip['samples']} completions each): median L2 on the masked region",
                      f"  model-chosen: members {med('chosen', 'members'):.3f}, non-members {med('chosen', 'nonmembers'):.3f} "
                      f"(AUC {ip['chosen']['auc']:.2f})",
                      f"  best of N (oracle bound): members {med('best', 'members'):.3f}, non-members {med('best', 'nonmembers'):.3f}"]
        if self.membership:
            from .digits import membership_summary

            lines += [""] + membership_summary(self.membership)
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"workspace": str(self.workspace), "run_id": self.run_id, "seconds": self.seconds,
                "counts": self.summary_counts, "figure5": self.table, "triage": self.triage,
                "inpainting": self.inpainting, "membership": self.membership, "notes": self.notes}


def build_demo(root: str | Path, *, progress: bool = True, per_prompt: int = DEMO_PER_PROMPT, steps: int = DEMO_STEPS,
               device: str = "cpu", membership: bool = True) -> DemoResult:
    from .. import audit, results, runs, triage
    from ..generate import generate, read_prompts
    from ..training import add_training
    from .data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_PROMPTS

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
    run_id = runs.latest_run(ws)
    if run_id is None or report.generated > 0 or not _same_params(runs.run_params(ws, run_id), params):
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
    result = DemoResult(ws.root, run_id, seconds, results.count_summary(ws, run_id), results.caption_duplicate_table(ws, run_id),
                        triage_result)

    if membership:  # the digits model: loss attack, LiRA, the trend along training (core.demo.digits)
        from .digits import run_membership_demo

        t = time.perf_counter()
        result.membership = run_membership_demo(ws)
        seconds["membership"] = time.perf_counter() - t

    t = time.perf_counter()
    result.inpainting = demo_inpainting(ws, device=device, notes=result.notes)
    seconds["inpainting"] = time.perf_counter() - t
    return result


def demo_inpainting(ws: Workspace, digits: Path | None = None, *, per_group: int = DEMO_INPAINT["per_group"],
                    steps: int = DEMO_INPAINT["steps"], device: str = "cpu",
                    notes: list[str] | None = None) -> dict[str, Any] | None:
    """The inpainting attack (Figure 12) on the digits model: a seeded sample of ``per_group`` members
    and as many non-members from ``split.csv``. Reuses a finished run of the same model and settings;
    returns its summary, or None (with a note) when the digits assets are not there."""
    import csv
    import random
    import tempfile

    from .. import inpaint
    from .data import DEMO_DIR

    digits = Path(digits) if digits is not None else DEMO_DIR / "digits"
    split, model = digits / "split.csv", digits / "model"
    if not split.is_file() or not (model / "model_index.json").is_file():
        if notes is not None:
            notes.append(f"inpainting skipped: {digits} has no split.csv and model/ (the digits membership demo)")
        return None
    with open(split, newline="", encoding="utf-8") as f:
        rows = [(r["path"], r["member"].strip()) for r in csv.DictReader(f)]
    rng = random.Random(DEMO_INPAINT["seed"])
    picked = [row for flag in ("1", "0")
              for row in rng.sample([r for r in rows if r[1] == flag], min(per_group, sum(r[1] == flag for r in rows)))]
    wanted = {"mask": DEMO_INPAINT["mask"], "samples": DEMO_INPAINT["samples"], "steps": steps, "seed": DEMO_INPAINT["seed"]}
    sources = sorted(str((digits / p).resolve()) for p, _ in picked)
    from ..generate import weights_hash

    digest = weights_hash(model)
    for run in reversed(inpaint.list_runs(ws)):
        if (run.mask, run.samples, run.steps, run.seed) == tuple(wanted.values()) and run.model_ref == str(model.resolve()) \
                and run.params.get("weights_hash") == digest and sorted(i.source_path for i in inpaint.run_images(ws, run.id, with_samples=False)) == sources:
            return inpaint.summary(ws, run.id)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "sample.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "member"])
            w.writerows((str((digits / p).resolve()), flag) for p, flag in picked)
        report = inpaint.run_inpainting(ws, str(model), manifest, device=device, **wanted)
    return inpaint.summary(ws, report.run_id)


def _same_params(a, b) -> bool:
    """Equal audit parameters, ignoring the working size (0 in a request means "resolve from the data")."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("working_size")
    db.pop("working_size")
    return da == db


def train_demo_model(steps: int | None = None, seed: int | None = None):
    """Retrain the shipped demo model with the shipped recipe (see assets/README.md)."""
    from .data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_TRAIN_SEED, DEMO_TRAIN_STEPS, DEMO_TRAIN_THREADS
    from .trainer import train

    # the weights depend on the thread count too: the shipped ones were trained on DEMO_TRAIN_THREADS
    return train(DEMO_DATA_DIR, DEMO_MODEL_DIR, steps=steps or DEMO_TRAIN_STEPS,
                 seed=DEMO_TRAIN_SEED if seed is None else seed, threads=DEMO_TRAIN_THREADS)
