"""A self-contained HTML report of an audit run: one file, no external URL.

Contents: run parameters and counts, Figure 5 (extraction rate by duplicate count), the
largest-clique distribution, Figure 4 (distance distributions; ROC and precision-recall when
human labels allow), and the top candidates as thumbnails (medoid beside its nearest
training image) with their distances and labels. plotly.js is embedded once, inline; every
image is a base64 PNG data URI, enlarged with nearest neighbour when tiny.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .store import Workspace, now

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; background: #fbfbfa;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; } h2 { font-size: 1.15rem; margin: 28px 0 8px; border-bottom: 1px solid #d9dcdf; }
.muted { color: #6b7280; } table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
td, th { padding: 4px 10px; border-bottom: 1px solid #e5e7eb; text-align: left; vertical-align: top; }
th { font-weight: 600; background: #f0f1f2; } .num { text-align: right; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 12px; }
.grid > div { min-width: 0; }
.pair { white-space: nowrap; min-width: 270px; }
.pair img { image-rendering: pixelated; width: 128px; height: 128px; object-fit: contain; background: #eee; margin-right: 4px; }
.tag { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 12px; }
.yes { background: #f4dfd9; color: #7a2e1c; } .no { background: #e2e9f0; color: #2d4a66; }
"""


def _fig_html(fig: "go.Figure", first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False, default_width="100%",
                       config={"displaylogo": False, "responsive": True})


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td class='num'>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def build_report(ws: Workspace, run_id: int | None = None, *, top: int = 40, thumb: int = 128) -> str:
    """The report of ``run_id`` (default: the latest run) as one HTML string.

    Raises InputError when the workspace has no finished audit run.
    """
    from . import figures, labels, results, runs, views
    from .calibrate import calibrate_metrics, precision_at_rank

    run_id = runs.require_run(ws, run_id)
    params = runs.run_params(ws, run_id)
    ov = results.overview(ws, run_id)
    rates = results.extraction_by_duplicates(ws, run_id)
    scores = results.candidate_scores(ws, run_id)
    calibrations = calibrate_metrics({m: scores.metrics[m] for m in ("l2", "tiled_l2", "relative_l2", "similarity")},
                                     scores.truth)
    figs: list[tuple[str, "go.Figure"]] = [
        ("Figure 5", figures.extraction_rate_by_duplicates(rates.bins, delta=params.delta)),
        ("Cliques", figures.clique_size_distribution(results.largest_clique_sizes(ws, run_id), min_clique=params.min_clique)),
    ]
    lab = scores.labelled()
    if lab.any():
        truth = np.array([bool(t) for t in scores.truth])
        l2 = scores.metrics["l2"]
        figs.append(("Figure 4", figures.distance_distributions(
            l2[lab & truth], l2[lab & ~truth], metric="l2", threshold=params.delta,
            title="Nearest-training L2 of candidates, by human label")))
        figs.append(("Figure 4", figures.precision_at_rank(precision_at_rank(scores.truth))))
    md = scores.metrics["mean_distance"]
    pairs = scores.metrics["clique_size"] >= 2  # a single generation has no distance inside its clique
    figs.append(("Figure 4", figures.distance_distributions(
        md[scores.extracted & pairs], md[~scores.extracted & pairs], metric="mean_distance",
        positive_name=f"extracted (l2 <= {params.delta:g})", negative_name="not extracted",
        title="Attack score of candidates, by the l2 <= delta criterion")))
    if calibrations:
        figs.append(("Calibration", figures.roc_curves(calibrations)))
        figs.append(("Calibration", figures.precision_recall_curves(calibrations)))

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>memaudit report: run {run_id}</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>memaudit audit report</h1>",
             f"<p class='muted'>workspace {html.escape(str(ws.root))} · audit run {run_id} · written {html.escape(now())}</p>",
             "<h2>Summary</h2><div class='grid'><div>",
             _table([("models", ov.models), ("prompts", ov.prompts), ("generations", ov.generations),
                     ("training images", ov.training_images), ("audited prompts", ov.audited_prompts),
                     ("flagged prompts", ov.flagged_prompts), ("candidates", ov.candidates),
                     ("extracted candidates", ov.extracted_candidates),
                     ("extracted training images", ov.extracted_training_images),
                     ("labelled candidates", ov.labelled_candidates), ("label events", ov.label_events)]),
             "</div><div>",
             _table([(k, v) for k, v in params.to_dict().items()]),
             "</div></div>"]
    if ov.kappa:
        parts.append("<h2>Agreement between reviewers</h2>" + _table(
            [(f"{a} / {b}", f"kappa {_fmt(k, 2)} on {n} pairs") for (a, b), (k, n) in ov.kappa.items()]))
    if calibrations:
        rows = []
        for m, c in calibrations.items():
            best = {p: o for p, o in c.targets.items()}
            rows.append((f"{m} ({c.n_positive}+ / {c.n_negative}-)",
                         f"AUC {c.auc:.3f} · TPR@1%FPR {c.tpr_at_1pct_fpr:.3f} · " + " · ".join(
                             f"precision {p:g}: t = {_fmt(o.threshold) if o else 'unreachable'}" for p, o in best.items())))
        parts.append("<h2>Calibration against human labels</h2>" + _table(rows))
    parts.append("<h2>Figures</h2><div class='grid'>")
    for i, (_, fig) in enumerate(figs):
        parts.append(f"<div>{_fig_html(fig, first=(i == 0))}</div>")
    parts.append("</div>")
    parts.append(f"<p class='muted'>Figure 5 counts {html.escape(rates.basis)}.</p>")

    cands = results.candidates(ws, run_id)[:top]
    current = labels.current_labels(ws)
    parts.append(f"<h2>Top {len(cands)} candidates</h2><table><tr><th>#</th><th>medoid · nearest training image</th>"
                 "<th>prompt</th><th class='num'>clique</th><th class='num'>mean dist.</th><th class='num'>l2</th>"
                 "<th class='num'>tiled l2</th><th>verdict</th><th>labels</th></tr>")
    for i, c in enumerate(cands, 1):
        imgs = f"<img alt='generation {c.medoid_generation_id}' src='{views.file_data_uri(ws, c.medoid_path, thumb)}'>"
        if c.nearest_training_path:
            imgs += f"<img alt='training {c.nearest_training_id}' src='{views.file_data_uri(ws, c.nearest_training_path, thumb)}'>"
        verdict = "".join([
            "<span class='tag yes'>flagged</span> " if c.flagged else "",
            "<span class='tag yes'>extracted</span>" if c.extracted else "<span class='tag no'>not extracted</span>"])
        labs = current.get((c.medoid_generation_id, c.nearest_training_id), {})
        parts.append(
            f"<tr><td class='num'>{i}</td><td class='pair'>{imgs}</td><td>{html.escape(c.prompt or '(unconditional)')}</td>"
            f"<td class='num'>{c.clique_size}</td><td class='num'>{_fmt(c.mean_distance)}</td><td class='num'>{_fmt(c.l2)}</td>"
            f"<td class='num'>{_fmt(c.tiled_l2)}</td><td>{verdict}</td>"
            f"<td>{html.escape(', '.join(f'{r}: {lab}' for r, lab in sorted(labs.items())))}</td></tr>")
    parts.append("</table>")
    # figures drawn while the page was still being parsed took the width of a half-built grid
    parts.append("<script>window.addEventListener('load', () => document.querySelectorAll('.js-plotly-plot')"
                 ".forEach(p => Plotly.Plots.resize(p)));</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(ws: Workspace, out: str | Path, run_id: int | None = None) -> Path:
    """Write the report to ``out`` atomically and return its path."""
    from .tempfiles import write_text_atomic

    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} does not exist; create it or choose another output path")
    text = build_report(ws, run_id)
    write_text_atomic(out, text)
    return out
