"""Export an audit run as JSON (everything, with the workspace's triage, inpainting and membership runs) or CSV
(one row per candidate)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .store import Workspace
from .tempfiles import write_text_atomic

CSV_COLUMNS = ("id", "prompt", "group_rank", "clique_size", "clique_exact", "mean_distance", "flagged", "medoid",
               "nearest_training", "nearest_training_source", "nearest_certified", "nearest_lower", "l2", "tiled_l2",
               "relative_l2", "extracted", "labels")


def export_json(ws: Workspace, run_id: int | None = None) -> dict[str, Any]:
    """The audit run (default: the latest) with everything, plus the workspace's other runs
    (``triage_runs``, ``inpainting_runs``, ``membership_runs``). A workspace holding such runs and no
    audit run exports those alone (``run_id`` null).
    """
    from . import inpaint, membership_runs, runs, triage

    others = {"triage_runs": triage.export(ws), "inpainting_runs": inpaint.export_runs(ws),
              "membership_runs": membership_runs.export_runs(ws)}
    if run_id is None and runs.latest_run(ws) is None and any(others.values()):
        return {"run_id": None, **others}
    return {**_audit_json(ws, run_id), **others}


def _audit_json(ws: Workspace, run_id: int | None) -> dict[str, Any]:
    from . import labels, results, runs

    run_id = runs.require_run(ws, run_id)
    params = runs.run_params(ws, run_id)
    current = labels.current_labels(ws)
    cands = results.candidates(ws, run_id, with_members=True)
    train = results.get_training(ws, sorted({c.nearest_training_id for c in cands if c.nearest_training_id is not None}))
    prompts = [{"prompt": p.prompt, "prompt_id": p.prompt_id, "generations": p.generations, "largest_clique": p.largest_clique,
                "clique_exact": p.clique_exact, "flagged": p.flagged, "extracted": p.extracted, "mean_distance": p.mean_distance}
               for p in results.prompt_results(ws, run_id)]
    out_cands = []
    for c in cands:
        t = train.get(c.nearest_training_id) if c.nearest_training_id is not None else None
        out_cands.append({
            "id": c.id, "prompt": c.prompt, "group_rank": c.group_rank, "clique_size": c.clique_size,
            "clique_exact": c.clique_exact,
            "mean_distance": c.mean_distance, "flagged": c.flagged, "medoid": c.medoid_path,
            "medoid_generation_id": c.medoid_generation_id, "members": list(c.members),
            "nearest_training": c.nearest_training_path,
            "nearest_training_source": t.source_path if t else None,
            "nearest_training_caption": t.caption if t else None,
            "nearest_training_duplicates": t.duplicate_count if t else None,
            "nearest_certified": c.nearest_certified, "nearest_lower": c.nearest_lower,
            "nearest_exact_distances": c.exact_distances,
            "l2": c.l2, "tiled_l2": c.tiled_l2, "relative_l2": c.relative_l2, "extracted": c.extracted,
            "labels": current.get((c.medoid_generation_id, c.nearest_training_id), {}),
        })
    events = [{"id": e.id, "candidate_id": e.candidate_id, "generation_id": e.generation_id, "training_id": e.training_id,
               "reviewer": e.reviewer, "label": e.label, "note": e.note, "created_at": e.created_at, "undoes": e.undoes}
              for e in labels.label_events(ws)]
    return {"run_id": run_id, "parameters": params.to_dict(), "summary": results.count_summary(ws, run_id),
            "prompts": prompts, "candidates": out_cands, "label_events": events}


def export_csv(ws: Workspace, run_id: int | None = None) -> str:
    from . import runs

    data = export_json(ws, runs.require_run(ws, run_id))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for c in data.get("candidates", []):
        row = dict(c)
        row["labels"] = ";".join(f"{r}={lab}" for r, lab in sorted(c["labels"].items()))
        row["prompt"] = "" if c["prompt"] is None else c["prompt"]
        writer.writerow(row)
    return buf.getvalue()


def write_export(ws: Workspace, fmt: str, out: str | Path, run_id: int | None = None) -> Path:
    """Write the export atomically to ``out`` ('-' is not accepted here; the CLI handles stdout)."""
    if fmt not in ("json", "csv"):
        raise InputError(f"export format must be json or csv, got {fmt!r}")
    text = json.dumps(export_json(ws, run_id), indent=2) if fmt == "json" else export_csv(ws, run_id)
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise InputError(f"{out.parent} does not exist; create it or choose another --out")
    write_text_atomic(out, text)
    return out
