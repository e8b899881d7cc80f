"""Calibrate: how well each metric separates what reviewers called copies from what they did not,
and which threshold a target precision implies; adopt one as the workspace default."""

from __future__ import annotations

import numpy as np
import streamlit as st

from core import figures, results, runs
from core.calibrate import DEFAULT_PRECISIONS, calibrate_metrics, precision_at_rank
from core.errors import MemauditError
from dashboard import ui

METRICS = ("l2", "tiled_l2", "relative_l2", "similarity")

st.title("Calibrate")
ws = ui.workspace()
run = ui.run_id(ws)
params = runs.run_params(ws, run)
scores = results.candidate_scores(ws, run)
lab = scores.labelled()
if not lab.any():
    st.info("No labels yet: label candidates on the Review page first (unsure labels and ties do not count).")
    st.stop()

truth = np.array([bool(t) for t in scores.truth])
n_pos, n_neg = int((lab & truth).sum()), int((lab & ~truth).sum())
present = [m for m in METRICS if np.isfinite(scores.metrics[m][lab]).any()]
cals = calibrate_metrics({m: scores.metrics[m] for m in present}, scores.truth)

st.caption(f"Ground truth from {int(lab.sum())} labelled candidates of run {run}: {n_pos} copies (exact or near), "
           f"{n_neg} not memorized; majority of reviewers, unsure and ties left out.")

metric = st.segmented_control("Metric", present, default=present[0], required=True, key="calibrate_metric",
                              format_func=lambda m: figures.METRIC_NAMES.get(m, m), persist_state="session")
values = scores.metrics[metric]
left, right = st.columns(2)
with left:
    st.plotly_chart(figures.distance_distributions(
        values[lab & truth], values[lab & ~truth], metric=metric, threshold=params.delta if metric == "l2" else None,
        title=f"{figures.METRIC_NAMES[metric]} by human label"), key="calibrate_dist")
with right:
    st.plotly_chart(figures.precision_at_rank(precision_at_rank(scores.truth)), key="calibrate_rank")
st.caption("Figure 4: the attack separates memorised from novel generations. Left, the nearest-training distance of "
           "labelled candidates; right, precision of the candidate list in the attack's order (labelled entries only).")

if not cals:
    st.info(f"ROC and precision-recall need at least one copy and one not-memorized label (have {n_pos} and {n_neg}).")
    st.stop()

left, right = st.columns(2)
with left:
    st.plotly_chart(figures.roc_curves(cals), key="calibrate_roc")
with right:
    st.plotly_chart(figures.precision_recall_curves(cals), key="calibrate_pr")

st.dataframe(
    [{"metric": figures.METRIC_NAMES.get(m, m), "rule": c.rule(), "copies": c.n_positive, "not memorized": c.n_negative,
      "AUC": c.auc, "TPR at 1% FPR": c.tpr_at_1pct_fpr,
      **{f"t for precision {p:g}": (o.threshold if o else None) for p, o in c.targets.items()}}
     for m, c in cals.items()],
    hide_index=True, column_config={k: st.column_config.NumberColumn(format="%.4f") for k in
                                    ["AUC", "TPR at 1% FPR", *[f"t for precision {p:g}" for p in DEFAULT_PRECISIONS]]})

# ---------------------------------------------------------------------------- adopting a threshold
ADOPTABLE = {"l2": "delta", "relative_l2": "relative_alpha"}
adoptable = [m for m in ADOPTABLE if m in cals]
if not adoptable:
    st.caption("Thresholds can be adopted for normalised L2 (as delta) and relative L2 (as alpha) once they are calibrated.")
    st.stop()

st.subheader("Adopt a threshold")
c = st.columns([2, 2, 5], vertical_alignment="bottom")
which = c[0].selectbox("Metric", adoptable, format_func=lambda m: figures.METRIC_NAMES[m], key="adopt_metric")
target = c[1].select_slider("Target precision", options=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0], value=0.95,
                            key="adopt_precision")
cal = calibrate_metrics({which: scores.metrics[which]}, scores.truth, precisions=(target,))[which]
op = cal.targets[target]
settings = ws.settings()
if op is None:
    c[2].warning(f"No {figures.METRIC_NAMES[which]} threshold reaches precision {target:g} on these labels.")
    st.stop()
if which == "l2":
    setting, value = "delta", round(op.threshold, 4)
    explain = f"delta = {value:g}: a candidate is extracted when its nearest training L2 <= {value:g}"
else:  # rel <= t with alpha a  <=>  l2 / (a t mean) <= 1: the same rule as alpha' = a t with rel < 1
    setting, value = "relative_alpha", round(params.relative_alpha * op.threshold, 4)
    explain = f"relative_alpha = {value:g} (= {params.relative_alpha:g} x {op.threshold:.4f})"
c[2].markdown(f"{explain}  \non these labels: precision **{op.precision:.2f}**, recall **{op.recall:.2f}** "
              f"({op.tp} copies, {op.fp} false alarms) · workspace default now {settings[setting]!r}")


def adopt(name: str, value: float) -> None:
    try:
        ws.set_setting(name, value)
    except (MemauditError, ValueError) as e:
        st.session_state["calibrate_msg"] = ("error", str(e))
        return
    st.session_state["calibrate_msg"] = ("ok", f"{name} = {value:g} is now the workspace default; the next audit uses it.")


st.button(f"Adopt {setting} = {value:g} as the workspace default", type="primary", key="adopt",
          on_click=adopt, args=(setting, value), disabled=settings[setting] == value)
if msg := st.session_state.pop("calibrate_msg", None):
    (st.success if msg[0] == "ok" else st.error)(msg[1])
