"""The layering: dashboard -> core, never back; pages hold no SQL; `import core` stays cheap.

Read from the source (every module's imports and string constants), so a new module or page is
covered the day it is added.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "core").rglob("*.py"))
DASHBOARD = sorted((ROOT / "dashboard").rglob("*.py"))
PAGES = sorted((ROOT / "dashboard" / "app_pages").glob("*.py"))
# A statement of SQL in a string: a keyword that starts one, then what it acts on.
SQL = re.compile(r"\b(SELECT\b.+\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX))\b", re.S)
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "faiss", "streamlit", "sklearn")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1] if path.name != "__init__.py"
                       else path.relative_to(ROOT).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out += [(node.lineno, f"{module}.{alias.name}" if not node.module else module) for alias in node.names]
    return out


def test_the_scanner_resolves_relative_imports():
    names = {m for _, m in imported_modules(ROOT / "core" / "demo" / "runner.py")}
    assert "core.store" in names and "core.demo.data" in names and "core.audit" in names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_dashboard_or_streamlit(path):
    """The engine works without its front end: the CLI starts the dashboard by the app's file path."""
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        assert top not in ("dashboard", "streamlit"), f"{path.relative_to(ROOT)}:{line} imports {module}"


@pytest.mark.parametrize("path", DASHBOARD, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_dashboard_holds_no_sql(path):
    """Pages (and the helpers they share) read widgets, call core and render: queries live in core."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            assert name not in ("execute", "executemany", "executescript", "connect"), \
                f"{path.relative_to(ROOT)}:{node.lineno} calls {name}() itself"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not SQL.search(node.value), f"{path.relative_to(ROOT)}:{node.lineno} holds SQL: {node.value[:60]!r}"
    for line, module in imported_modules(path):
        assert module.split(".")[0] != "sqlite3", f"{path.relative_to(ROOT)}:{line} imports sqlite3"


def test_the_sql_pattern_finds_sql():
    assert SQL.search("SELECT id, path FROM training_images WHERE id = ?")
    assert SQL.search("INSERT OR IGNORE INTO labels(a) VALUES (?)") and SQL.search("DELETE FROM runs")
    assert not SQL.search("Select the images from the list") and not SQL.search("Update the settings")


def test_pages_exist_and_are_scanned():
    assert len(PAGES) >= 8 and set(PAGES) <= set(DASHBOARD)


def test_importing_core_and_its_light_modules_loads_no_heavy_library():
    """`import core`, the CLI's parser, the settings and the launcher import no torch, Streamlit or faiss."""
    code = ("import sys, core, core.config, core.cli, core.launch, core.demo, core.store, core.errors, core.textfiles; "
            "core.cli.build_parser(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
