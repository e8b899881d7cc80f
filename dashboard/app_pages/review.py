"""Review: label each candidate (its clique's medoid against its nearest training image).

Every click is written at once (core.labels.add_label) with a token that is fixed for what
was on screen, so a repeated delivery of the same click is stored once. Keys 1-4 label,
U undoes, N / P move through the queue.
"""

from __future__ import annotations

import uuid

import streamlit as st

from core import labels, results, runs, views
from core.errors import MemauditError
from dashboard import ui

BIG = 300
CHOICES = (("exact_copy", "Exact copy", "1"), ("near_copy", "Near copy", "2"),
           ("not_memorized", "Not memorized", "3"), ("unsure", "Unsure", "4"))
TEXT = {value: text for value, text, _ in CHOICES}

st.title("Review")
ws = ui.workspace()
run = ui.run_id(ws)
params = runs.run_params(ws, run)
nonce = st.session_state.setdefault("review_nonce", uuid.uuid4().hex[:12])

top = st.columns([3, 3, 2, 2], vertical_alignment="bottom")
signed_in = ui.signed_in_reviewer()
if signed_in:  # a shared deployment: the identity is the reviewer, not a typed name
    top[0].text_input("Reviewer", value=signed_in, disabled=True, help="You are signed in; labels carry this identity.")
    reviewer = signed_in
else:
    reviewer = (top[0].text_input("Reviewer", key="reviewer", bind="query-params", placeholder="your name",
                                  help="Stored with every label; kept in the page address, so a reload remembers it.") or "").strip()
scope = top[1].segmented_control("Queue", ["not labelled by me", "all candidates"], default="not labelled by me",
                                 required=True, key="review_scope", persist_state="session")
flagged_only = top[2].toggle("Flagged only", key="review_flagged", persist_state="session",
                             help="Only candidates whose clique reaches k.")
blind = top[3].toggle("Blind mode", key="review_blind", persist_state="session",
                      help="Hide distances, verdicts and other reviewers' labels while you judge.")

for kind in ("review_flash", "review_error"):
    if msg := st.session_state.pop(kind, None):
        (st.toast if kind == "review_flash" else st.error)(msg)

if not reviewer:
    st.info("Enter your name as reviewer to start labelling: every label is stored with it.")
    st.stop()

unlabelled_only = scope != "all candidates"
try:
    state = labels.review_state(ws, run, reviewer, unlabeled_only=unlabelled_only, flagged_only=flagged_only)
except MemauditError as e:
    st.error(str(e))
    st.stop()
queue, current, mine = state.queue, state.labels, state.labelled_by_reviewer
my_events = sum(1 for e in labels.label_events(ws) if e.reviewer == reviewer)

st.progress(mine / max(1, state.candidates), text=f"{mine} of {state.candidates} candidates labelled by {reviewer}")

POS = f"review_pos_{run}"
if (goto := st.session_state.pop("review_goto", None)) is not None:
    ids = [c.id for c in queue]
    st.session_state[POS] = ids.index(goto) if goto in ids else 0
pos = min(max(0, st.session_state.get(POS, 0)), max(0, len(queue) - 1))
st.session_state[POS] = pos


def on_label(candidate_id: int, label: str, token: str, note_key: str) -> None:
    try:
        labels.add_label(ws, candidate_id, label, reviewer, note=st.session_state.get(note_key, ""), token=token)
    except MemauditError as e:
        st.session_state["review_error"] = str(e)
        return
    st.session_state["review_flash"] = f"Candidate {candidate_id}: {TEXT[label]}"
    if not unlabelled_only:
        st.session_state[POS] = pos + 1


def on_undo(token: str) -> None:
    try:
        undo_id = labels.undo_last(ws, reviewer, token=token)
    except MemauditError as e:
        st.session_state["review_error"] = str(e)
        return
    if undo_id is None:
        st.session_state["review_flash"] = "Nothing of yours to undo."
        return
    event = next((e for e in labels.label_events(ws) if e.id == undo_id), None)
    st.session_state["review_flash"] = "Undid your last label."
    if event is not None and event.candidate_id is not None:
        st.session_state["review_goto"] = event.candidate_id


def on_move(step: int) -> None:
    st.session_state[POS] = pos + step


nav = st.columns([1, 1, 1, 5], vertical_alignment="center")
nav[0].button("Previous", key="review_prev", shortcut="P", on_click=on_move, args=(-1,), disabled=pos == 0,
              width="stretch")
nav[1].button("Next", key="review_next", shortcut="N", on_click=on_move, args=(1,), disabled=pos >= len(queue) - 1,
              width="stretch")
nav[2].button("Undo", key="review_undo", shortcut="U", on_click=on_undo, args=(f"{nonce}:undo:{reviewer}:{my_events}",),
              disabled=mine == 0 and my_events == 0, width="stretch", help="Cancel your latest label (keeps it in the history).")

if not queue:
    nav[3].success("Nothing left to label here: every candidate in this queue has your label."
                   if unlabelled_only else "This run has no candidates to review.")
    st.stop()

c = queue[pos]
nav[3].caption(f"Candidate {pos + 1} of {len(queue)} in this queue · id {c.id}")
pair_labels = current.get((c.medoid_generation_id, c.nearest_training_id), {})

st.markdown(f"**Prompt:** {c.prompt or '(unconditional)'}")
if c.nearest_training_path is None:
    st.warning("This candidate has no nearest training image (the training index was empty when it was audited).")
    st.stop()
pixels = ui.pair_or_warn(ws, c.medoid_path, c.nearest_training_path)
if pixels is None:
    st.stop()
gen_arr, train_arr = pixels
cols = st.columns([1, 1, 1.2], gap="medium")
with cols[0]:
    ui.show_image(ws, c.medoid_path, BIG, caption=f"generation {c.medoid_generation_id} (clique medoid)")
with cols[1]:
    ui.show_image(ws, c.nearest_training_path, BIG, caption=f"nearest training image {c.nearest_training_id}")
with cols[2]:
    if blind:
        st.html(ui.blink_html(gen_arr, train_arr, BIG))
    else:
        diff, vmax = views.difference_image(gen_arr, train_arr)
        st.image(views.upscale_nearest(diff, BIG), width=BIG, output_format="PNG",
                 caption=f"|generation − training| per pixel: black 0, pale yellow ≥ {vmax:.2f}")

if not blind:
    m = st.columns(5)
    m[0].metric("L2", ui.fmt(c.l2, 4), help=f"extracted when <= delta = {params.delta:g}")
    m[1].metric("Tiled L2", ui.fmt(c.tiled_l2, 4))
    m[2].metric("Relative L2", ui.fmt(c.relative_l2, 3), help="unconditional models: extracted when < 1")
    m[3].metric("Clique size", c.clique_size, help=f"flagged when >= k = {params.min_clique}")
    m[4].metric("Mean distance in clique", ui.fmt(c.mean_distance, 4), help="tiled L2, averaged over the clique's pairs")
    st.caption(f"At the run's thresholds: {'flagged' if c.flagged else 'not flagged'} "
               f"(clique {c.clique_size} {'>=' if c.clique_size >= params.min_clique else '<'} k = {params.min_clique}) · "
               f"{'extracted' if c.extracted else 'not extracted'} "
               f"(L2 {ui.fmt(c.l2, 4)} {'<=' if (c.l2 or 1) <= params.delta else '>'} delta = {params.delta:g})")
    others = {r: lab for r, lab in pair_labels.items() if r != reviewer}
    if others:
        st.caption("Other reviewers: " + ", ".join(f"{r}: {TEXT[lab]}" for r, lab in sorted(others.items())))
if reviewer in pair_labels:
    st.caption(f"Your current label: **{TEXT[pair_labels[reviewer]]}** (a new click replaces it; Undo restores the previous one).")

note_key = f"review_note_{c.id}"
st.text_input("Note (optional, saved with the label)", key=note_key, placeholder="what you saw")
buttons = st.columns(4)
for col, (value, text, key) in zip(buttons, CHOICES):
    col.button(f"{text}", key=f"review_label_{c.id}_{value}", shortcut=key, width="stretch",
               on_click=on_label, args=(c.id, value, f"{nonce}:{reviewer}:{c.id}:{value}:{my_events}", note_key))
st.caption("Keys: 1 exact copy · 2 near copy · 3 not memorized · 4 unsure · U undo · N next · P previous.")

members = results.get_candidate(ws, c.id).members
if len(members) > 1:
    with st.expander(f"The clique's {len(members)} generations"):
        gens = results.get_generations(ws, list(members))
        cols = st.columns(10)
        for j, gid in enumerate(list(members)[:30]):
            with cols[j % 10]:
                ui.show_image(ws, gens[gid].path, 72)
