"""Plotly figures of membership runs (Figures 11 and 20 of the paper, and its log-log ROC).

Builders take plain data (``core.membership_runs.RunView``'s fields) and return a figure;
they share ``core.figures``' layout and colours, and import plotly inside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from .figures import NEGATIVE_COLOUR, NEUTRAL_COLOUR, POSITIVE_COLOUR, SERIES, _empty, _layout

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

LOG_FLOOR = 1e-4  # the log axes start here (the paper's ROCs start at 1e-5 on 50,000 images)


def roc_loglog(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str = "ROC (log-log)") -> "go.Figure":
    """ROC curves on log-log axes, as the paper draws them: the low-FPR corner is what matters.

    Points at FPR 0 cannot be drawn on a log axis; the curve starts at the first non-zero FPR,
    and the chance diagonal TPR = FPR is drawn for reference.
    """
    import plotly.graph_objects as go

    if not curves:
        return _empty(title, "no ROC")
    fig = go.Figure()
    lowest = 1.0
    for i, (name, c) in enumerate(curves.items()):
        pts = [(f, t) for f, t in zip(c["fpr"], c["tpr"]) if f > 0 and t > 0]
        if pts:
            lowest = min(lowest, pts[0][0])
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=name,
                                 line=dict(color=SERIES[i % len(SERIES)], width=2, shape="hv")))
    floor = max(LOG_FLOOR, min(lowest, 1e-3) / 2)
    fig.add_trace(go.Scatter(x=[floor, 1], y=[floor, 1], mode="lines", name="chance",
                             line=dict(color=NEUTRAL_COLOUR, dash="dot", width=1)))
    for f in (0.01, 0.001):
        fig.add_vline(x=f, line=dict(color=NEUTRAL_COLOUR, width=1, dash="dash"), opacity=0.5)
    fig.update_xaxes(type="log", range=[_log10(floor), 0])
    fig.update_yaxes(type="log", range=[_log10(floor), 0])
    return _layout(fig, title, "false positive rate", "true positive rate", height=380)


def _log10(x: float) -> float:
    import math

    return math.log10(x)


def score_histograms(members: Sequence[float], nonmembers: Sequence[float], *, score_name: str = "score",
                     title: str = "Scores of members and non-members") -> "go.Figure":
    import plotly.graph_objects as go

    if not members and not nonmembers:
        return _empty(title, "no scores")
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=list(members), name="members", marker_color=POSITIVE_COLOUR, opacity=0.6, nbinsx=50))
    fig.add_trace(go.Histogram(x=list(nonmembers), name="non-members", marker_color=NEGATIVE_COLOUR, opacity=0.6, nbinsx=50))
    fig.update_layout(barmode="overlay")
    return _layout(fig, title, f"{score_name} (higher: more like a member)", "images")


def quality_trend(trend: Sequence[Mapping], title: str = "Membership against quality along training") -> "go.Figure":
    """Figure 11: TPR at 1% FPR against the quality measure, one point per checkpoint, labelled by step."""
    import plotly.graph_objects as go

    points = [t for t in trend if t.get("quality") is not None]
    if not points:
        return _empty(title, "no checkpoints with a quality measure: run `memaudit mia-trend`")
    fig = go.Figure(go.Scatter(
        x=[t["quality"] for t in points], y=[t["tpr_at_1pct_fpr"] for t in points], mode="lines+markers+text",
        text=[f"step {t['step']}" for t in points], textposition="top center",
        marker=dict(color=POSITIVE_COLOUR, size=9), line=dict(color=NEUTRAL_COLOUR, width=1), name="checkpoints"))
    fig.update_xaxes(autorange="reversed")  # better models (lower loss) to the right, as the paper's FID axis
    fig.update_yaxes(tickformat=".1%", rangemode="tozero")
    measure = points[0].get("quality_measure") or "quality"
    name = {"held_out_loss": "held-out denoising loss (lower is better)", "fid": "FID (lower is better)"}.get(measure, measure)
    return _layout(fig, title, name, "TPR at 1% FPR")
