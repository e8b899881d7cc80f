"""memaudit dashboard: ``streamlit run dashboard/app.py -- WS`` (or ``memaudit dashboard WS``)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

try:
    from dashboard import ui
except ImportError:  # `streamlit run dashboard/app.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dashboard import ui

st.set_page_config(page_title="memaudit", page_icon=":material/policy:", layout="wide")
ui.require_sign_in()  # only when .streamlit/secrets.toml has an [auth] section
ui.set_workspace_from_args(sys.argv[1:])

page = st.navigation(ui.pages())
ws = ui.try_workspace()
if ws is not None:
    st.sidebar.caption(f"Workspace `{ws.root}`")
    ui.run_selector(ws)
page.run()
