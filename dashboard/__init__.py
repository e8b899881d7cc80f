"""memaudit\x27s Streamlit dashboard: pages read widgets, call core, render."""
