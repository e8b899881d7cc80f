"""Generate: sample images for a list of prompts in the background (core.generate.generate).

The prompt list starts from the highest-scoring prompts of the latest triage run (core.triage)
when the workspace has one, so the expensive sampling goes where memorisation is likely first.
The job runs in a worker thread shared by every browser tab of this workspace; a cancelled or
interrupted run resumes where it stopped when started again with the same settings (stored
images are skipped, not redrawn)."""

from __future__ import annotations

import streamlit as st

from core import config, results, triage
from core.errors import MemauditError
from core.store import Workspace
from dashboard import ui

PROMPTS_TEXT = "generate_prompts_text"
SENT = "generate_prompts"  # set by the Training data and Triage pages
SOURCE = "generate_prompts_source"  # what the prompt list was filled from (shown while it is unchanged)
START_TOP = 20  # prompts taken from the latest triage run on a first visit

st.title("Generate")
ws = ui.workspace()
settings = ws.settings()
registry = ui.jobs()
JOB = (str(ws.root), "generate")

triage_runs = triage.list_runs(ws)
if (sent := st.session_state.pop(SENT, None)) is not None:
    st.session_state[PROMPTS_TEXT] = "\n".join(sent)
    st.toast(f"{len(sent)} prompts are in the prompt list.")
elif PROMPTS_TEXT not in st.session_state and triage_runs:
    latest = triage_runs[-1]
    top = triage.top_prompts(ws, latest.id, START_TOP)
    st.session_state[PROMPTS_TEXT] = "\n".join(top)
    st.session_state[SOURCE] = (latest.id, len(top), latest.prompts, st.session_state[PROMPTS_TEXT])
    st.session_state.setdefault("generate_model", latest.model_ref)


ui.job_panel(JOB, name="generate", unit="images", stopping="stopping after this batch",
             cancel_help="Stops after the batch in flight; everything written so far is kept.",
             done=lambda r: (f"Done: {r.generated} images generated, {r.skipped_existing} already in the workspace, "
                             f"in {ui.duration(r.seconds)}. Audit them from the Overview page or with `memaudit audit WS`."),
             cancelled=lambda s: f"Cancelled after {s.done} of {s.total} images: start again with the same settings to resume.")
running = (job := registry.get(JOB)) is not None and job.status().running


def fill_top(n: int) -> None:
    from core import training

    captions = [training.prompt_line(cap) for cap, _, _ in training.top_duplicated(ws, n)]
    st.session_state[PROMPTS_TEXT] = "\n".join(cap for cap in captions if cap)
    st.session_state[SOURCE] = None


def fill_triage(n: int) -> None:
    latest = triage_runs[-1]
    top = triage.top_prompts(ws, latest.id, n)
    st.session_state[PROMPTS_TEXT] = "\n".join(top)
    st.session_state[SOURCE] = (latest.id, len(top), latest.prompts, st.session_state[PROMPTS_TEXT])


def fill_upload() -> None:
    from core.generate import parse_prompts

    f = st.session_state.get("generate_upload")
    if f is not None:
        try:  # the same prompts, and the same one-line refusal of a file that is not UTF-8, as the CLI's
            st.session_state[PROMPTS_TEXT] = "\n".join(parse_prompts(f.getvalue(), f.name))
        except MemauditError as e:
            st.session_state["generate_error"] = str(e)


left, right = st.columns([3, 2], gap="large")
with left:
    known = results.model_refs(ws)
    if "generate_model" not in st.session_state and known:
        st.session_state["generate_model"] = known[0]
    model = st.text_input("Model: a local diffusers folder or a hub id", key="generate_model", persist_state="session",
                          placeholder="/path/to/model or org/name")
    if known:
        def use_known() -> None:
            if st.session_state.get("generate_known"):
                st.session_state["generate_model"] = st.session_state["generate_known"]

        st.pills("Models used in this workspace", known, key="generate_known", on_change=use_known)
    st.text_area("Prompts, one per line (leave empty for an unconditional model)", key=PROMPTS_TEXT, height=220,
                 persist_state="session")
    source = st.session_state.get(SOURCE)
    if source and source[3] == st.session_state.get(PROMPTS_TEXT):
        st.caption(f"Starting from the {source[1]} highest-scoring of the {source[2]} prompts of triage run {source[0]} "
                   f"(Triage page){': the rest are not generated, so an audit of these is a lower bound' if source[1] < source[2] else ''}.")
    src = st.columns([5, 3, 3, 3], vertical_alignment="bottom")
    src[0].file_uploader("Or load a text file", type=["txt"], key="generate_upload", on_change=fill_upload)
    top_n = src[1].number_input("Or the top N", 1, 100_000, START_TOP, key="generate_top_n", persist_state="session")
    src[2].button("most duplicated", width="stretch", on_click=fill_top, args=(int(top_n),), key="generate_fill_top",
                  help="Captions of the training images with the most near-duplicates (the paper's prompts).")
    src[3].button("by triage score", width="stretch", on_click=fill_triage, args=(int(top_n),), key="generate_fill_triage",
                  disabled=not triage_runs,
                  help="The highest-scoring prompts of the latest triage run (`memaudit triage`): likely memorised first.")
with right:
    per_prompt = ui.number_setting(st, "Images per prompt", "per_prompt", settings["per_prompt"], key="generate_per_prompt")
    steps = ui.number_setting(st, "Steps", "steps", settings["steps"], key="generate_steps")
    guidance = ui.number_setting(st, "Guidance", "guidance", settings["guidance"], key="generate_guidance", step=0.5)
    batch = ui.number_setting(st, "Batch size", "batch_size", settings["batch_size"], key="generate_batch")
    seed = ui.number_setting(st, "First seed", "seed", settings["seed"], key="generate_seed")
    devices = list(config.SETTINGS["device"].choices or ("auto",))
    device = st.selectbox("Device", devices, index=devices.index(settings["device"]), key="generate_device")

prompts = [line.strip() for line in (st.session_state.get(PROMPTS_TEXT) or "").splitlines() if line.strip()]
planned = max(1, len(prompts)) * int(per_prompt)
seeds = f"seeds {int(seed)}–{int(seed) + int(per_prompt) - 1}"
st.caption((f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''} × {int(per_prompt)} images = {planned} images "
            f"({seeds} for every prompt)" if prompts else
            f"No prompts: {planned} unconditional images ({seeds})") + "; images already stored are skipped.")


def start() -> None:
    from core.generate import generate

    root, ref = str(ws.root), (model or "").strip()
    args = dict(steps=int(steps), guidance=float(guidance), batch_size=int(batch), seed=int(seed), device=device)

    def work(progress, should_stop):
        return generate(Workspace(root), ref, prompts or None, int(per_prompt), progress=progress,
                        should_stop=should_stop, **args)

    try:
        registry.start(JOB, "generate", work)
    except MemauditError as e:  # a job already running: one sentence
        st.session_state["generate_error"] = str(e)


st.button("Start generating", type="primary", on_click=start, key="generate_start",
          disabled=running or not (model or "").strip(),
          help="Runs in the background; you can switch pages while it works.")
if msg := st.session_state.pop("generate_error", None):
    st.error(msg)
