"""Membership: was an image in the model's training set? Stored membership runs (core.membership_runs)
as the paper draws them, and new runs started in the background (the loss attack or LiRA)."""

from __future__ import annotations

import streamlit as st

from core import config, membership_figures, membership_runs
from core.errors import MemauditError
from core.store import Workspace
from dashboard import ui

st.title("Membership inference")
ws = ui.workspace()
settings = ws.settings()
registry = ui.jobs()
JOB = (str(ws.root), "membership")


ui.job_panel(JOB, name="membership", unit="images scored", stopping="stopping",
             cancel_help="Stops before the next batch; nothing is stored for a cancelled run.",
             done=lambda r: f"Membership run {r} stored.", cancelled=lambda s: "Cancelled: nothing was stored.")

with st.expander("New membership run", expanded=not membership_runs.list_runs(ws)):
    d = config.SETTINGS
    left, right = st.columns([3, 2], gap="large")
    model = left.text_input("Model: a local diffusers folder", key="membership_model", persist_state="session")
    members = left.text_input("Members: a folder or manifest of training images", key="membership_members",
                              persist_state="session")
    nonmembers = left.text_input("Non-members: a folder or manifest of held-out images", key="membership_nonmembers",
                                 persist_state="session")
    attacks = list(d["mia_attack"].choices or ("loss",))
    attack = right.selectbox("Attack", attacks, index=attacks.index(settings["mia_attack"]), key="membership_attack",
                             help=d["mia_attack"].help)
    timestep = right.number_input("Timestep", 0, 100_000, int(settings["mia_timestep"]), key="membership_timestep",
                                  help=d["mia_timestep"].help)
    draws = right.number_input("Noise draws", 1, 4096, int(settings["mia_noise_draws"]), key="membership_draws",
                               help=d["mia_noise_draws"].help)
    seed = right.number_input("Seed", 0, 2**53 - 1, int(settings["mia_seed"]), key="membership_seed",
                              help=d["mia_seed"].help)
    shadow_dir = right.text_input("Shadow models (LiRA)", key="membership_shadows", disabled=attack != "lira",
                                  help="The folder `memaudit train-shadows` wrote.")

    def start() -> None:
        root = str(ws.root)
        args = dict(attack=attack, timestep=int(timestep), noise_draws=int(draws), seed=int(seed),
                    shadow_dir=(shadow_dir or None) if attack == "lira" else None)
        ref, m, n = model.strip(), members.strip(), nonmembers.strip()

        def work(progress, should_stop):
            return membership_runs.run_membership(Workspace(root), ref, m, n, progress=progress,
                                                  should_stop=should_stop, **args)

        try:
            registry.start(JOB, "membership", work)
        except MemauditError as e:  # a job already running: one sentence
            st.session_state["membership_error"] = str(e)

    running = (job := registry.get(JOB)) is not None and job.status().running
    st.button("Start", type="primary", on_click=start, key="membership_start",
              disabled=running or not (model.strip() and members.strip() and nonmembers.strip()),
              help="Runs in the background; you can switch pages while it works.")
    if msg := st.session_state.pop("membership_error", None):
        st.error(msg)

runs = membership_runs.list_runs(ws)
if not runs:
    st.info("No membership run yet: start one above, or run `memaudit mia WS --model M --members A --nonmembers B`.")
    st.stop()

by_id = {r.id: r for r in runs}
chosen = st.selectbox("Membership run", list(by_id)[::-1], format_func=lambda i: by_id[i].label, key="membership_run")
view = membership_runs.run_view(ws, chosen)
run = view.run
st.caption(f"Model `{run.model_ref}` (weights {run.model_hash[:12]}) · {run.params['prediction_type']} prediction · "
           f"{run.params['conditioning']} conditioning · {run.noise_draws} noise draws, seed {run.seed}"
           + (f" · {run.params['shadows']} shadow models" if run.attack == "lira" else ""))

cols = st.columns(4)
cols[0].metric("AUC", f"{run.metrics['auc']:.3f}")
cols[1].metric("TPR at 1% FPR", f"{run.metrics['tpr_at_1pct_fpr']:.1%}")
cols[2].metric("TPR at 0.1% FPR", f"{run.metrics['tpr_at_0_1pct_fpr']:.1%}")
cols[3].metric("Balanced accuracy", f"{run.metrics['balanced_accuracy']:.3f}")
for note in view.notes:
    st.caption(f"Note: {note}.")

left, right = st.columns(2, gap="large")
with left:
    st.plotly_chart(membership_figures.roc_loglog(view.roc), key="membership_roc")
with right:
    st.dataframe(view.table, hide_index=True, column_config={
        "AUC": st.column_config.NumberColumn(format="%.3f"),
        "TPR at 1% FPR": st.column_config.NumberColumn(format="percent"),
        "TPR at 0.1% FPR": st.column_config.NumberColumn(format="percent"),
        "balanced accuracy": st.column_config.NumberColumn(format="%.3f")})
    st.plotly_chart(membership_figures.score_histograms(
        view.member_scores, view.nonmember_scores,
        score_name="LiRA online log-likelihood ratio" if run.attack == "lira" else "minus the loss"), key="membership_hist")

st.subheader("Hardest and easiest members")
st.caption("Members the attack finds least (hardest) and most (easiest) like members, with how many members lie "
           "within the duplicate threshold of each (itself included): the paper's Figure 20 finds duplicates hardest.")
for title, rows, key in (("Hardest", view.hardest, "hard"), ("Easiest", view.easiest, "easy")):
    st.markdown(f"**{title}**")
    cells = st.columns(max(1, len(rows)))
    for cell, r in zip(cells, rows):
        with cell:
            ui.show_image(ws, r["image"], 96, caption=f"score {r['score']:.3g} · {r['duplicates']}×")

if view.trend:
    st.subheader("Along training")
    st.plotly_chart(membership_figures.quality_trend(view.trend), key="membership_trend")
    measure = "FID" if view.trend[0]["quality_measure"] == "fid" else "held-out loss"
    st.dataframe([{"step": t["step"], measure: t["quality"], "AUC": t["auc"], "TPR at 1% FPR": t["tpr_at_1pct_fpr"]}
                  for t in view.trend], hide_index=True,
                 column_config={measure: st.column_config.NumberColumn(format="%.4f"),
                                "AUC": st.column_config.NumberColumn(format="%.3f"),
                                "TPR at 1% FPR": st.column_config.NumberColumn(format="percent")})
