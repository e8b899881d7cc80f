"""Plotly figure builders for the paper's figures, shared by the dashboard and the HTML report.

Every builder takes plain data (lists, arrays, records from core.results / core.calibrate) and
returns a ``plotly.graph_objects.Figure``; none touches the workspace. plotly is imported
inside each builder so that ``import core`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from .calibrate import Calibration

# Two calm colours: memorised / not memorised, then a neutral series palette.
POSITIVE_COLOUR = "#b0533c"
NEGATIVE_COLOUR = "#4f7396"
NEUTRAL_COLOUR = "#6b7280"
SERIES = ("#4f7396", "#b0533c", "#6a8f5a", "#8a6aa8", "#b08a3c", "#5d8f8f")
METRIC_NAMES = {
    "l2": "normalised L2",
    "tiled_l2": "tiled L2",
    "relative_l2": "relative L2",
    "similarity": "similarity",
    "clique_size": "clique size",
    "mean_distance": "mean distance in clique",
}


def _layout(fig: "go.Figure", title: str, x: str, y: str, height: int = 320) -> "go.Figure":
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left", y=0.98, yref="container", yanchor="top", font=dict(size=14)),
        xaxis_title=x, yaxis_title=y, height=height,
        margin=dict(l=56, r=16, t=60, b=48),
        template="plotly_white", font=dict(size=12),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="right", x=1.0),
        bargap=0.15,
    )
    return fig


def _empty(title: str, message: str, height: int = 320) -> "go.Figure":
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(color=NEUTRAL_COLOUR))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, "", "", height)


def distance_distributions(positive: Sequence[float], negative: Sequence[float], *, metric: str = "l2",
                           threshold: float | None = None, positive_name: str = "memorised",
                           negative_name: str = "not memorised", title: str | None = None,
                           count_name: str = "pairs") -> "go.Figure":
    """Figure 4: overlaid histograms of one metric for memorised and not-memorised pairs.

    Both histograms share one set of bins over the pooled range; ``threshold`` (delta, or a
    calibrated value) is drawn as a dashed vertical line.
    """
    import plotly.graph_objects as go

    name = METRIC_NAMES.get(metric, metric)
    title = title or f"Distribution of {name}"
    pos = np.asarray([v for v in positive if v is not None and np.isfinite(v)], dtype=np.float64)
    neg = np.asarray([v for v in negative if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(pos) + len(neg) == 0:
        return _empty(title, "no values yet")
    both = np.r_[pos, neg]
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1e-3
    size = (hi - lo) / 30.0
    bins = dict(start=lo, end=hi + size, size=size)
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=neg, xbins=bins, name=f"{negative_name} ({len(neg)})",
                               marker_color=NEGATIVE_COLOUR, opacity=0.65))
    fig.add_trace(go.Histogram(x=pos, xbins=bins, name=f"{positive_name} ({len(pos)})",
                               marker_color=POSITIVE_COLOUR, opacity=0.65))
    fig.update_layout(barmode="overlay")
    edges = np.arange(lo, hi + 2 * size, size)
    tallest = max(np.histogram(pos, edges)[0].max(initial=0), np.histogram(neg, edges)[0].max(initial=0))
    if tallest <= 10:
        fig.update_yaxes(dtick=1)
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#333",
                      annotation_text=f"{threshold:.3g}", annotation_position="top right")
    return _layout(fig, title, name, count_name)


def extraction_rate_by_duplicates(bins: Sequence[tuple[str, int, int]], *, delta: float | None = None) -> "go.Figure":
    """Figure 5: fraction of training images extracted, by training duplicate count.

    ``bins`` holds (label, images in the bin, extracted images in the bin), in display order.
    """
    import plotly.graph_objects as go

    title = "Extraction rate by training duplicate count"
    if not bins or sum(n for _, n, _ in bins) == 0:
        return _empty(title, "no audited prompt with a clique yet")
    labels = [b[0] for b in bins]
    n = np.array([b[1] for b in bins], dtype=np.float64)
    e = np.array([b[2] for b in bins], dtype=np.float64)
    rate = np.where(n > 0, e / np.maximum(n, 1), 0.0)
    text = [f"{int(ei)}/{int(ni)}" for ei, ni in zip(e, n)]
    fig = go.Figure(go.Bar(x=labels, y=rate, text=text, width=0.6 if len(labels) < 4 else None, textposition="outside", marker_color=NEGATIVE_COLOUR,
                           hovertemplate="duplicates %{x}<br>extracted %{text}<br>rate %{y:.1%}<extra></extra>",
                           cliponaxis=False))
    top = max(1e-9, float(rate.max()))
    fig.update_yaxes(tickformat=".0%", range=[0, top * 1.2], tickvals=[v for v in np.linspace(0, 1, 6) if v <= top + 1e-9])
    x = "duplicate count k of the training image" + (f" (extracted: l2 <= {delta:g})" if delta is not None else "")
    return _layout(fig, title, x, "extracted")


def clique_size_distribution(sizes: Sequence[int], *, min_clique: int | None = None) -> "go.Figure":
    """Distribution of each prompt's largest clique size; ``min_clique`` (k) drawn as the flagging line."""
    import plotly.graph_objects as go

    title = "Largest clique per prompt"
    sizes = np.asarray(list(sizes), dtype=np.int64)
    if len(sizes) == 0:
        return _empty(title, "no audited prompts yet")
    values, counts = np.unique(sizes, return_counts=True)
    colours = [POSITIVE_COLOUR if (min_clique is not None and v >= min_clique) else NEGATIVE_COLOUR for v in values]
    fig = go.Figure(go.Bar(x=values, y=counts, marker_color=colours,
                           hovertemplate="largest clique %{x}<br>%{y} prompts<extra></extra>"))
    if min_clique is not None:
        fig.add_vline(x=min_clique - 0.5, line_dash="dash", line_color="#333",
                      annotation_text=f"k = {min_clique}", annotation_position="top right")
    fig.update_xaxes(dtick=1 if values.max() <= 30 else None)
    if counts.max() <= 10:
        fig.update_yaxes(dtick=1)
    return _layout(fig, title, "size of the largest clique", "prompts")


def roc_curves(calibrations: Mapping[str, "Calibration"], *, max_fpr: float = 0.01,
               title: str = "ROC against human labels") -> "go.Figure":
    """ROC per metric, with each curve's AUC and TPR at ``max_fpr`` in its legend entry."""
    import plotly.graph_objects as go

    if not calibrations:
        return _empty(title, "no labelled pairs yet")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#bbb", dash="dot"),
                             showlegend=False, hoverinfo="skip"))
    for i, (metric, c) in enumerate(calibrations.items()):
        fig.add_trace(go.Scatter(
            x=c.fpr, y=c.tpr, mode="lines+markers", line_shape="hv", marker=dict(size=4),
            line=dict(color=SERIES[i % len(SERIES)]),
            name=f"{METRIC_NAMES.get(metric, metric)}: AUC {c.auc:.2f}, TPR@{max_fpr:.0%} FPR {c.tpr_at_1pct_fpr:.2f}"))
    fig.add_vline(x=max_fpr, line_dash="dash", line_color="#999")
    fig.update_xaxes(range=[-0.01, 1.01])
    fig.update_yaxes(range=[-0.01, 1.05])
    fig = _layout(fig, title, "false positive rate", "true positive rate", height=360)
    fig.update_layout(legend=dict(orientation="v", yanchor="bottom", y=0.02, xanchor="right", x=0.99))
    return fig


def precision_recall_curves(calibrations: Mapping[str, "Calibration"]) -> "go.Figure":
    import plotly.graph_objects as go

    title = "Precision-recall against human labels"
    if not calibrations:
        return _empty(title, "no labelled pairs yet")
    fig = go.Figure()
    for i, (metric, c) in enumerate(calibrations.items()):
        fig.add_trace(go.Scatter(
            x=c.recall, y=c.precision, mode="lines+markers", marker=dict(size=4),
            line=dict(color=SERIES[i % len(SERIES)]), name=METRIC_NAMES.get(metric, metric),
            customdata=c.thresholds,
            hovertemplate="threshold %{customdata:.4g}<br>recall %{x:.2f}<br>precision %{y:.2f}<extra></extra>"))
    fig.update_xaxes(range=[-0.01, 1.01])
    fig.update_yaxes(range=[0, 1.05])
    fig = _layout(fig, title, "recall", "precision", height=360)
    fig.update_layout(legend=dict(orientation="v", yanchor="bottom", y=0.02, xanchor="left", x=0.01))
    return fig


def precision_at_rank(precision: Sequence[float], *, title: str = "Precision of the ranked candidates") -> "go.Figure":
    """Figure 4 (right): precision of the top-r candidates against r."""
    import plotly.graph_objects as go

    p = np.asarray(list(precision), dtype=np.float64)
    if len(p) == 0 or not np.isfinite(p).any():
        return _empty(title, "no labelled candidates yet")
    r = np.arange(1, len(p) + 1)
    fig = go.Figure(go.Scatter(x=r, y=p, mode="lines", line=dict(color=NEGATIVE_COLOUR), line_shape="hv",
                               hovertemplate="top %{x}<br>precision %{y:.2f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.05])
    return _layout(fig, title, "candidates, most suspicious first", "precision")


def triage_ranking(scores: Sequence[float], positive: Sequence[bool], *, threshold: float | None = None,
                   verdict: str = "extracted") -> "go.Figure":
    """Triage score against rank (1 = most suspicious), coloured by the audit's verdict, with the
    score that keeps every positive prompt as a dashed line."""
    import plotly.graph_objects as go

    title = "Triage score by rank, coloured by the audit's verdict"
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.size == 0:
        return _empty(title, "no prompt has both a triage score and an audit verdict")
    rank = np.arange(1, s.size + 1)
    fig = go.Figure()
    for mask, name, colour in ((y, verdict, POSITIVE_COLOUR), (~y, f"not {verdict}", NEGATIVE_COLOUR)):
        fig.add_trace(go.Scatter(x=rank[mask], y=s[mask], mode="markers", name=f"{name} ({int(mask.sum())})",
                                 marker=dict(color=colour, size=8, symbol="circle" if name == verdict else "circle-open"),
                                 hovertemplate="rank %{x}<br>score %{y:.4g}<extra></extra>"))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color="#333",
                      annotation_text=f"keeps every {verdict} prompt: top {int((s >= threshold).sum())}",
                      annotation_position="top right")
    fig = _layout(fig, title, "rank by triage score", "triage score", height=360)
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=0.98, xanchor="right", x=0.99))
    return fig
