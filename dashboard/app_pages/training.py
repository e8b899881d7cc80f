"""Training data: duplicate counts, the most duplicated captions (the attack's prompts) and near-duplicate groups."""

from __future__ import annotations

import streamlit as st

from core import results, training
from dashboard import ui

GENERATE_PROMPTS = "generate_prompts"  # read by the Generate page

st.title("Training data")
ws = ui.workspace()
summary = results.training_summary(ws)
if not summary["images"]:
    st.info("No training images yet: add them with `memaudit add-training WS FOLDER`.")
    st.stop()

m = st.columns(5)
m[0].metric("Images", summary["images"])
m[1].metric("Distinct files", summary["unique_files"])
m[2].metric("With near-duplicates", summary["duplicated"],
            help="images with at least one other training image within the duplicate threshold (exact L2 at duplicate_size)")
m[3].metric("Captioned", summary["captioned"])
m[4].metric("Largest duplicate count", summary["max_duplicates"],
            help="an image's duplicate count: the training images within the duplicate threshold of it, itself included")

st.subheader("Most duplicated captions")
st.caption("Prompt selection by duplicate count, as in the paper: captions of the training images with the highest counts, "
           "one per group of copies. Select rows and send them to the Generate page.")
n = st.columns([1, 4])[0].number_input("How many", 1, 10_000, 50, key="training_top_n", persist_state="session")
top = [(training.prompt_line(cap), count, tid) for cap, count, tid in training.top_duplicated(ws, int(n))]
table = st.dataframe([{"caption": cap or "(no caption)", "duplicate count": count, "training image": tid} for cap, count, tid in top],
                     hide_index=True, on_select="rerun", selection_mode="multi-row", key="training_top",
                     height="auto" if len(top) <= 10 else 360,
                     column_config={"caption": st.column_config.TextColumn(width="large")})
picked = list(table.selection.rows) if table is not None and hasattr(table, "selection") else []
chosen = [top[i][0] for i in picked if top[i][0]] if picked else [cap for cap, _, _ in top if cap]


def send(captions: list[str]) -> None:
    st.session_state[GENERATE_PROMPTS] = captions


if not chosen:
    st.caption("None of these groups has a caption: add captions with `memaudit add-training WS FOLDER --captions FILE`.")
elif st.button(f"Send {len(chosen)}{' selected' if picked else ''} caption{'s' if len(chosen) != 1 else ''} to Generate",
               type="primary", on_click=send, args=(chosen,), key="training_send"):
    st.switch_page("app_pages/generate.py")

st.subheader("Near-duplicate groups")
st.caption("Each group is an image and the images within the duplicate threshold of it that no earlier group holds "
           "(its first image is shown first).")
groups = results.duplicate_groups(ws, limit=12, per_group=12)
if not groups:
    st.caption("No near-duplicate groups: every training image is unique at the duplicate threshold.")
for g in groups:
    with st.container(border=True):
        st.markdown(f"**duplicate count {g.count}** · {g.size} images in this group · " + (" · ".join(f"“{c}”" for c in g.captions[:3]) or "no caption")
                    + (f" · and {len(g.captions) - 3} more captions" if len(g.captions) > 3 else ""))
        cols = st.columns(12)
        for j, img in enumerate(g.images):
            with cols[j]:
                ui.show_image(ws, img.path, 72, caption=f"#{img.id}", fill=True)
