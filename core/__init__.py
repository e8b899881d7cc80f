"""memaudit's engine: importable without Streamlit; heavy libraries load where they are used."""

__version__ = "0.1.0"
