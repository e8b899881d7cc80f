"""Triage: prompts ranked by a score computed from a few denoising steps (core.triage), sent to
Generate from the top, and the score checked against an audit's verdicts so a team can decide
how far down the ranking to generate."""

from __future__ import annotations

import streamlit as st

from core import figures, runs, triage
from core.errors import MemauditError
from dashboard import ui

GENERATE_PROMPTS = "generate_prompts"  # read by the Generate page
GENERATE_MODEL = "generate_model"
GENERATE_SOURCE = "generate_prompts_source"  # shown by the Generate page while its list is unchanged

st.title("Triage")
ws = ui.workspace()
triage_runs = triage.list_runs(ws)
if not triage_runs:
    st.info("No triage run yet: score prompts with `memaudit triage WS --model M --prompts F` "
            "(a few denoising steps per prompt instead of hundreds of samples), then come back here.")
    st.stop()

by_id = {r.id: r for r in triage_runs}
run_id = st.selectbox("Triage run", list(by_id)[::-1], key="triage_run",
                      format_func=lambda i: f"run {i} · {by_id[i].params.method} · {by_id[i].params.steps} step(s) · "
                                            f"{by_id[i].params.samples} sample{'s' if by_id[i].params.samples != 1 else ''} · {by_id[i].prompts} prompts")
run = by_id[run_id]
p = run.params
st.caption(f"Model `{run.model_ref}` (weights {run.weights_hash[:12]}) · seed {p.seed} · guidance {p.guidance:g} · "
           f"first {p.steps} of {p.sampling_steps} DDIM steps · higher score = more likely memorised")

audit_runs = [r.id for r in runs.list_runs(ws)]
audit_run = ui.run_id(ws) if audit_runs else None
rows = triage.ranking_table(ws, run.id, audit_run)

left, right = st.columns([3, 2], gap="large")
with left:
    st.dataframe(rows, hide_index=True, height=360, key="triage_table",
                 column_config={"score": st.column_config.NumberColumn(format="%.4g"),
                                "audit": st.column_config.TextColumn(f"audit run {audit_run}" if audit_run else "audit"),
                                "note": st.column_config.TextColumn(width="small")})
with right:
    st.markdown("**Generate from the top**")
    top = st.number_input("How many of the highest-scoring prompts", 1, len(rows), min(20, len(rows)), key="triage_top")

    def send(n: int) -> None:
        prompts = [r["prompt"] for r in rows[:n]]
        st.session_state[GENERATE_PROMPTS] = prompts
        st.session_state[GENERATE_SOURCE] = (run.id, len(prompts), len(rows), "\n".join(prompts))
        st.session_state[GENERATE_MODEL] = run.model_ref

    if st.button(f"Send the top {int(top)} to Generate", type="primary", on_click=send, args=(int(top),), key="triage_send"):
        st.switch_page("app_pages/generate.py")
    if int(top) < len(rows):
        st.caption(f"The other {len(rows) - int(top)} prompts are not generated: an audit of the top {int(top)} is a lower "
                   "bound on what the model memorised. Check below how far down the memorised prompts reached.")

st.subheader("Does the score find what the audit found?")
if audit_run is None:
    st.info("No audit run yet: generate for some prompts (the top ones, and a sample further down), audit them, "
            "and this section compares the triage score with the audit's verdict on each prompt.")
    st.stop()
verdict = st.segmented_control("Memorised means", triage.VERDICTS, default="extracted", required=True, key="triage_verdict",
                               help="extracted: a clique's medoid is within delta of a training image; flagged: a clique of k or more.")
try:
    v = triage.validate(ws, run.id, audit_run, verdict)
except MemauditError as e:
    ui.error(e)
    st.stop()
st.caption(v.summary() + (f"; {v.not_audited} scored prompts have no verdict in audit run {audit_run}" if v.not_audited else ""))
if v.prompts == 0:
    st.stop()
m = st.columns(4)
m[0].metric("AUC", ui.fmt(v.auc))
m[1].metric("TPR at 1% FPR", ui.fmt(v.tpr_at_1pct_fpr))
m[2].metric(f"Top N keeping every {verdict} prompt", f"{v.keep_all_rank} of {v.prompts}" if v.keep_all_rank else "–",
            help="The lowest score of a memorised prompt: generating for every prompt scoring at least this much "
                 "would have found all of them.")
m[3].metric("That score", f"{v.keep_all_threshold:.4g}" if v.keep_all_threshold is not None else "–")
left, right = st.columns(2)
with left:
    st.plotly_chart(figures.triage_ranking(v.scores, v.positive, threshold=v.keep_all_threshold, verdict=verdict),
                    key="triage_ranking")
with right:
    if v.calibration is None:
        st.info(f"ROC needs both {verdict} prompts and others among the audited ones.")
    else:
        st.plotly_chart(figures.roc_curves({"triage score": v.calibration}, title=f"ROC of the triage score against {verdict}"),
                        key="triage_roc")
