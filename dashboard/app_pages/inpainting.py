"""Inpainting: the paper's Figure 12. Start an inpainting run in the background, then compare how well
the model completes its members against non-members: the distance histograms, and each image's
original, masked input and completions side by side, sortable by the member/non-member gap."""

from __future__ import annotations

import streamlit as st

from core import config, figures, inpaint
from core.errors import MemauditError
from core.store import Workspace
from dashboard import ui

JOB_NAME = "inpainting"
KINDS = {"chosen": "model-chosen (lowest loss)", "best": "best of N (oracle bound)", "mean": "mean of N"}
ORDERS = {"gap": "largest gap first", "members": "members, largest gap first",
          "nonmembers": "non-members, largest gap first", "position": "input order"}

st.title("Inpainting")
ws = ui.workspace()
settings = ws.settings()
registry = ui.jobs()
JOB = (str(ws.root), JOB_NAME)


ui.job_panel(JOB, name="inpaint", unit="images", stopping="stopping",
             cancel_help="Stops before the next batch; a cancelled run keeps nothing.",
             done=lambda r: (f"Done: inpainting run {r.run_id}, {r.images} images x {r.samples} completions "
                             f"in {ui.duration(r.seconds)}."),
             cancelled=lambda s: "Cancelled: nothing was stored.")
running = (job := registry.get(JOB)) is not None and job.status().running

with st.expander("New inpainting run", expanded=not inpaint.list_runs(ws)):
    d = config.SETTINGS
    c = st.columns(2)
    model = c[0].text_input("Model: a pixel-space DDPM/DDIM folder or a diffusers inpainting pipeline", key="inpaint_model",
                            persist_state="session")
    members_spec = c[0].text_input("Members: a folder of images, or a CSV manifest (path[,member])", key="inpaint_images",
                             persist_state="session")
    nonmembers_spec = c[0].text_input("Non-members (optional): a folder or CSV manifest", key="inpaint_nonmembers",
                                 persist_state="session")
    mask = c[1].text_input("Mask: left, right, top, bottom, center, or a PNG mask file", settings["inpaint_mask"],
                           key="inpaint_mask", help=d["inpaint_mask"].help)
    samples = c[1].number_input("Completions per image (N)", 1, 10_000, int(settings["inpaint_samples"]),
                                key="inpaint_samples", help=d["inpaint_samples"].help)
    steps = c[1].number_input("Steps (0: the model's own)", 0, 1000, int(settings["inpaint_steps"]), key="inpaint_steps",
                              help=d["inpaint_steps"].help)
    seed = c[1].number_input("First seed", 0, 2**53 - 1, int(settings["seed"]), key="inpaint_seed", help=d["seed"].help)

    def start(ref: str, a: str, b: str | None, args: dict) -> None:
        root = str(ws.root)

        def work(progress, should_stop):
            return inpaint.run_inpainting(Workspace(root), ref, a, b, progress=progress, should_stop=should_stop, **args)

        try:
            registry.start(JOB, JOB_NAME, work)
        except MemauditError as e:  # a job already running: one sentence
            st.session_state["inpaint_error"] = str(e)

    st.button("Start inpainting", type="primary", on_click=start, key="inpaint_start",
              args=((model or "").strip(), (members_spec or "").strip(), (nonmembers_spec or "").strip() or None,
                    dict(mask=(mask or "").strip(), samples=int(samples), steps=int(steps), seed=int(seed))),
              disabled=running or not (model or "").strip() or not (members_spec or "").strip(),
              help="Runs in the background; you can switch pages while it works.")
    if msg := st.session_state.pop("inpaint_error", None):
        st.error(msg)

runs = inpaint.list_runs(ws)
if not runs:
    st.info("No inpainting run yet: start one above or with `memaudit inpaint WS --model M --images DIR --nonmembers DIR`.")
    st.stop()

by_id = {r.id: r for r in runs}
run_id = st.selectbox("Inpainting run", list(by_id)[::-1], key="inpaint_run",
                      format_func=lambda i: f"run {i} · {by_id[i].model_ref} · mask {by_id[i].mask} · N {by_id[i].samples}")
run = by_id[run_id]
summary = inpaint.summary(ws, run.id)
images = inpaint.run_images(ws, run.id)

kind = "chosen" if summary["chosen"]["members"]["median"] is not None else "best"
m = st.columns(5)
m[0].metric("Members / non-members", f"{run.members} / {run.nonmembers}")
m[1].metric("Members: median L2", ui.fmt(summary[kind]["members"]["median"]), help=KINDS[kind])
m[2].metric("Non-members: median L2", ui.fmt(summary[kind]["nonmembers"]["median"]), help=KINDS[kind])
m[3].metric("Gap", ui.fmt(summary[kind]["median_gap"]), help="non-members' median minus members' median")
m[4].metric("AUC", ui.fmt(summary[kind]["auc"]), help="the chance that a member is completed closer than a non-member")
st.caption(f"Figures above: the {KINDS[kind]} completion. "
           f"Normalised L2 between completion and original on the masked region only (0: exact). {run.samples} completions "
           f"per image, {run.steps} steps, seeds {run.seed}–{run.seed + run.samples - 1}, method {summary['method']}"
           + (f", conditioned on {summary['condition']!r}" if summary["condition"] else "") + ". "
           "Model-chosen: the completion with the lowest denoising loss, what an attacker without the original picks. "
           "Best of N is an oracle bound: it needs the original to choose.")
st.dataframe([{"distance": KINDS[k], "members (median)": summary[k]["members"]["median"],
               "non-members (median)": summary[k]["nonmembers"]["median"], "gap": summary[k]["median_gap"],
               "AUC": summary[k]["auc"]} for k in KINDS],
             hide_index=True, column_config={k: st.column_config.NumberColumn(format="%.4f")
                                             for k in ("members (median)", "non-members (median)", "gap", "AUC")})

shown = st.segmented_control("Histogram of", list(KINDS), default=kind, required=True, key="inpaint_kind",
                             format_func=KINDS.get)
values = {flag: [getattr(i, f"distance_{shown}") for i in images if i.member == flag] for flag in (True, False)}
st.plotly_chart(figures.distance_distributions(values[True], values[False], positive_name="members",
                                               negative_name="non-members",
                                               title=f"Figure 12: {KINDS[shown]} distance to the original",
                                               count_name="images"),
                key="inpaint_hist")

st.subheader("Completions")
c = st.columns([2, 1, 3], vertical_alignment="bottom")
order = c[0].selectbox("Sort", list(ORDERS), format_func=ORDERS.get, key="inpaint_order")
limit = c[1].number_input("Images", 1, 500, 12, key="inpaint_limit")
c[2].caption("Gap: the non-members' median distance minus this image's (model-chosen where there is one); "
             "large for an image the model completes far better than a typical non-member.")
SIDE = 96
for im, gap in inpaint.ranked(images, order)[: int(limit)]:
    st.markdown(f"**{'member' if im.member else 'non-member'}** · `{im.source_path}` · gap {ui.fmt(gap)} · "
                f"chosen {ui.fmt(im.distance_chosen)} · best (oracle) {ui.fmt(im.distance_best)} · mean {ui.fmt(im.distance_mean)}")
    cols = st.columns(min(2 + len(im.samples), 10))
    with cols[0]:
        ui.show_image(ws, im.path, SIDE, caption="original")
    with cols[1]:
        ui.show_masked_input(ws, im.path, run.mask_path, SIDE, caption="masked input")
    for col, s in zip(cols[2:], sorted(im.samples, key=lambda s: (s["sample"] != im.chosen_sample, s["distance"]))):
        with col:
            tag = "chosen" if s["sample"] == im.chosen_sample else f"#{s['sample']}"
            ui.show_image(ws, s["path"], SIDE, caption=f"{tag} · {s['distance']:.3f}")
