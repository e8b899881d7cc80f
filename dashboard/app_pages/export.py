"""Export: the chosen audit run as JSON (everything), CSV (one row per candidate) or an HTML report."""

from __future__ import annotations

import json

import streamlit as st

from core import export, report
from dashboard import ui

st.title("Export")
ws = ui.workspace()
run = ui.run_id(ws)
name = f"{ws.root.name}-run{run}"

st.caption(f"Audit run {run} of `{ws.root}`. Labels are included as they stand now.")
cols = st.columns(3)
with cols[0]:
    st.markdown("**JSON**: parameters, summary, prompts, candidates with members and labels, every label event.")
    st.download_button("Download JSON", data=lambda: json.dumps(export.export_json(ws, run), indent=2),
                       file_name=f"{name}.json", mime="application/json", key="export_json", on_click="ignore")
with cols[1]:
    st.markdown(f"**CSV**: one row per candidate ({', '.join(export.CSV_COLUMNS[:6])}, …).")
    st.download_button("Download CSV", data=lambda: export.export_csv(ws, run), file_name=f"{name}.csv",
                       mime="text/csv", key="export_csv", on_click="ignore")
with cols[2]:
    st.markdown("**HTML report**: one self-contained file (figures and thumbnails inline) to share or archive.")
    st.download_button("Download HTML report", data=lambda: report.build_report(ws, run),
                       file_name=f"{name}-report.html", mime="text/html", key="export_html", on_click="ignore")

st.subheader("Candidates in the CSV")
rows = export.export_json(ws, run)["candidates"]
st.dataframe([{"id": c["id"], "prompt": c["prompt"], "clique": c["clique_size"], "flagged": c["flagged"],
               "extracted": c["extracted"], "l2": c["l2"], "tiled l2": c["tiled_l2"],
               "labels": ", ".join(f"{r}: {lab}" for r, lab in sorted(c["labels"].items()))} for c in rows],
             hide_index=True, height="auto" if len(rows) <= 12 else 440,
             column_config={"l2": st.column_config.NumberColumn(format="%.4f"),
                            "tiled l2": st.column_config.NumberColumn(format="%.4f")})
