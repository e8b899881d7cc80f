"""Overview: what the workspace holds, what the chosen audit run found, how far review has got."""

from __future__ import annotations

import streamlit as st

from core import audit, figures, views
from core.errors import MemauditError
from dashboard import ui

st.title("Overview")
ws = ui.workspace()

if not ui.runs(ws):
    counts = ws.counts()
    st.info("This workspace has no audit run yet: audit it here or with `memaudit audit WS`.")
    c = st.columns(3)
    c[0].metric("Generations", counts["generations"])
    c[1].metric("Prompts", counts["prompts"])
    c[2].metric("Training images", counts["training_images"])
    ready = counts["generations"] > 0 and counts["training_images"] > 0
    if st.button("Audit now with the workspace settings", type="primary", disabled=not ready,
                 help=None if ready else "Needs generations (Generate page) and training images (`memaudit add-training`)."):
        bar = st.progress(0.0, text="auditing")

        def progress(stage: str, done: int, total: int) -> None:
            bar.progress(done / max(total, 1), text=f"{stage}: prompt {done} of {total}")

        try:
            audit.run_audit(ws, progress=progress)
        except MemauditError as e:
            st.error(str(e))
            st.stop()
        st.rerun()
    st.stop()

run = ui.run_id(ws)
params = audit.run_params(ws, run)
ov = views.overview(ws, run)

st.caption(f"Audit run {run}: tau {params.edge_threshold:g}, k {params.min_clique}, delta {params.delta:g}, "
           f"grid {params.grid}, working size {params.working_size} px, embedder {params.embedder}.")

row = st.columns(6)
row[0].metric("Models", ov.models)
row[1].metric("Prompts", ov.prompts)
row[2].metric("Generations", ov.generations)
row[3].metric("Training images", ov.training_images)
row[4].metric("Flagged prompts", ov.flagged_prompts, help=f"largest clique >= k = {params.min_clique} at tau = {params.edge_threshold:g}")
row[5].metric("Extracted prompts", ov.extracted_prompts,
              help=f"flagged prompts with a clique whose medoid is within L2 <= delta = {params.delta:g} of a training "
                   f"image: {ov.extracted_candidates} candidates, {ov.extracted_training_images} distinct training images")

row = st.columns(6)
row[0].metric("Candidates", ov.candidates)
row[1].metric("Labelled", ov.labelled_candidates, help="candidates with at least one current label")
row[2].metric("To label", ov.unlabelled_candidates)
row[3].metric("Label events", ov.label_events)
row[4].metric("Reviewers", len(ov.reviewers))
if ov.kappa:
    (a, b), (kappa, n) = max(ov.kappa.items(), key=lambda kv: kv[1][1])
    row[5].metric("Cohen's kappa", ui.fmt(kappa, 2), help=f"{a} vs {b} on {n} pairs both labelled")
else:
    row[5].metric("Cohen's kappa", "–", help="needs two reviewers who labelled the same pairs")

if len(ov.kappa) > 1:
    with st.expander("Agreement for every pair of reviewers"):
        st.dataframe([{"reviewers": f"{a} / {b}", "kappa": kappa, "pairs labelled by both": n}
                      for (a, b), (kappa, n) in ov.kappa.items()], hide_index=True)

rates = views.extraction_by_duplicates(ws, run)
left, right = st.columns(2)
with left:
    st.plotly_chart(figures.extraction_rate_by_duplicates(rates.bins, delta=params.delta), key="fig5")
    st.caption(f"Figure 5: extraction rate of {rates.basis}.")
with right:
    st.plotly_chart(figures.clique_size_distribution(views.largest_clique_sizes(ws, run), min_clique=params.min_clique),
                    key="cliques")
    st.caption(f"Largest clique of each prompt at tau = {params.edge_threshold:g}; prompts right of the line are flagged.")
