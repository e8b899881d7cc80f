"""Overview: what the workspace holds, what the chosen audit run found, how far review has got."""

from __future__ import annotations

import streamlit as st

from core import audit, figures, results, runs
from core.errors import MemauditError
from core.store import Workspace
from dashboard import ui

st.title("Overview")
ws = ui.workspace()

AUDIT_JOB = (str(ws.root), "audit")
registry = ui.jobs()
job = registry.get(AUDIT_JOB)
auditing = job is not None and job.status().running


def start_audit() -> None:
    root = str(ws.root)

    def work(progress, should_stop):
        return audit.run_audit(Workspace(root), progress=lambda stage, done, total: progress(done, total))

    try:
        registry.start(AUDIT_JOB, "audit", work)
    except MemauditError as e:
        st.session_state["overview_error"] = str(e)


@st.fragment(run_every=1.0 if auditing else None)
def audit_panel() -> None:
    """Start an audit with the workspace's settings, and follow it while it runs."""
    job = registry.get(AUDIT_JOB)
    s = job.status() if job is not None else None
    if s is not None and s.running:
        if not auditing:  # started by this fragment's own button: rerun the page, so the panel refreshes every second
            st.rerun()
        st.session_state["overview_was_auditing"] = True
        st.progress(s.fraction, text=f"auditing: {s.done} of {s.total or '?'} generations · "
                                     f"{ui.duration(s.elapsed)} elapsed · {ui.time_left(s.eta)}")
        return
    if st.session_state.pop("overview_was_auditing", False):
        st.rerun()  # show the new run everywhere
    if s is not None and s.state == "failed":
        st.error(s.error or "the audit failed")
    counts = ws.counts()
    ready = counts["generations"] > 0 and counts["training_images"] > 0
    settings = ws.settings()
    first = not ui.runs(ws)
    st.button(f"Audit {'now' if first else 'again'} with the workspace settings", type="primary" if first else "secondary",
              disabled=not ready, on_click=start_audit, key="overview_audit",
              help=(f"A new audit run: tau {settings['edge_threshold']:g}, k {settings['min_clique']}, "
                    f"delta {settings['delta']:g}, grid {settings['grid']}; earlier runs are kept.") if ready else
              "Needs generations (Generate page) and training images (`memaudit add-training`).")
    if msg := st.session_state.pop("overview_error", None):
        st.error(msg)


if not ui.runs(ws):
    counts = ws.counts()
    st.info("This workspace has no audit run yet: audit it here or with `memaudit audit WS`.")
    c = st.columns(3)
    c[0].metric("Generations", counts["generations"])
    c[1].metric("Prompts", counts["prompts"])
    c[2].metric("Training images", counts["training_images"])
    audit_panel()
    st.stop()

run = ui.run_id(ws)
params = runs.run_params(ws, run)
ov = results.overview(ws, run)

st.caption(f"Audit run {run}: tau {params.edge_threshold:g}, k {params.min_clique}, delta {params.delta:g}, "
           f"grid {params.grid} (cached for the sliders: {', '.join(map(str, audit.cached_grids(params.working_size, params)))}), "
           f"working size {params.working_size} px, embedder {params.embedder}.")

row = st.columns(6)
row[0].metric("Models", ov.models)
row[1].metric("Prompts", ov.prompts)
row[2].metric("Generations", ov.generations)
row[3].metric("Training images", ov.training_images)
row[4].metric("Flagged prompts", ov.flagged_prompts, help=f"largest clique >= k = {params.min_clique} at tau = {params.edge_threshold:g}")
row[5].metric("Extracted prompts", ov.extracted_prompts,
              help=f"flagged prompts with a clique whose medoid is within L2 <= delta = {params.delta:g} of a training "
                   f"image: {ov.extracted_candidates} candidates, {ov.extracted_training_images} distinct training images")

if ov.clique_bounds:
    st.warning(f"{ov.clique_bounds} prompts' largest clique is a lower bound: the exact clique search stopped at its "
               "budget (setting clique_node_budget), so they may be flagged too few. The Cliques page marks them.",
               icon=":material/warning:")
if ov.uncertified_nearest:
    st.warning(f"{ov.uncertified_nearest} flagged candidates' nearest training image is not certified (the search stopped "
               f"at nearest_budget); {ov.uncertain_verdicts} of them are counted not extracted though their true nearest "
               "could lie within delta. Raise nearest_budget and audit again.", icon=":material/warning:")

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

rates = results.extraction_by_duplicates(ws, run)
left, right = st.columns(2)
with left:
    st.plotly_chart(figures.extraction_rate_by_duplicates(rates.bins, delta=params.delta), key="fig5")
    st.caption(f"Figure 5: extraction rate of {rates.basis}.")
with right:
    st.plotly_chart(figures.clique_size_distribution(results.largest_clique_sizes(ws, run), min_clique=params.min_clique),
                    key="cliques")
    st.caption(f"Largest clique of each prompt at tau = {params.edge_threshold:g}; prompts right of the line are flagged.")

st.divider()
audit_panel()
