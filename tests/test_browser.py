"""The dashboard in a real browser: a Streamlit server started by the launcher's own command line,
driven by Debian's Chromium through Playwright. Screenshots of every page land in
test-artifacts/screenshots/ for a person to look at."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, running_dashboard

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "screenshots"
PAGES = {  # url path -> heading
    "": "Overview", "generate": "Generate", "cliques": "Cliques", "review": "Review",
    "calibrate": "Calibrate", "training": "Training data", "export": "Export", "triage": "Triage",
}

if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (`make browser` or "
                "`apt-get install chromium`)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package (test extra)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dashboard_data import labelled_copy

    ws, run_id = labelled_copy(tmp_path_factory, "browser")
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with running_dashboard(ws.root, port, log_path, cwd=ROOT, env=env, timeout=60) as base:
        yield base, ws, run_id


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


# Streamlit marks its root with the script's state; idle also means every st.image has loaded.
IDLE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.dataset.testScriptState !== 'notRunning' || app.dataset.testConnectionState !== 'CONNECTED') return false;
  const boxes = document.querySelectorAll('[data-testid="stImage"]');
  const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
  return imgs.length === boxes.length && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def settle(pg, heading: str) -> None:
    """Wait for the page's heading, then until Streamlit has finished running the script."""
    pg.get_by_role("heading", name=heading, exact=True).wait_for(timeout=30_000)
    pg.wait_for_function(IDLE, timeout=30_000)
    pg.wait_for_timeout(400)  # charts finish painting


def shoot(pg, name: str) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so the viewport is
    grown to the content's height for the shot."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    size = pg.viewport_size
    height = pg.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    pg.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height) + 20, 8000))})
    pg.wait_for_function(IDLE, timeout=30_000)
    pg.wait_for_timeout(400)
    pg.screenshot(path=str(path), full_page=True)
    pg.set_viewport_size(size)
    return path


def metric_value(pg, label: str) -> str:
    box = pg.locator('[data-testid="stMetric"]').filter(has=pg.get_by_text(label, exact=True)).first
    return box.locator('[data-testid="stMetricValue"]').inner_text().strip()


def wait_for_metric(pg, label: str, value: str, timeout: int = 20_000) -> None:
    """Wait until the metric labelled ``label`` shows ``value`` (after a widget change reran the page)."""
    pg.wait_for_function(
        "([label, value]) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
        "m.innerText.startsWith(label) && m.querySelector('[data-testid=\"stMetricValue\"]').innerText.trim() === value)",
        arg=[label, value], timeout=timeout)


def test_a_fresh_server_opened_at_a_page_address(server, page):
    """The first visitor of a new server arrives at /review, not at the root (a bookmark)."""
    base, ws, _ = server
    page.goto(f"{base}/review")
    settle(page, "Review")
    page.get_by_role("textbox", name="Reviewer").wait_for(timeout=20_000)
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert "Training data" in nav and "app" not in nav.split()
    assert str(ws.root) in page.locator('[data-testid="stSidebar"]').inner_text()


def test_every_page_renders_without_error(server, page):
    base, _, _ = server
    for path, heading in PAGES.items():
        page.goto(f"{base}/{path}")
        settle(page, heading)
        assert page.locator('[data-testid="stException"]').count() == 0, f"{heading}: {page.inner_text('body')[:2000]}"
        shot = shoot(page, f"{list(PAGES).index(path) + 1}-{heading.lower().replace(' ', '-')}")
        assert shot.stat().st_size > 10_000


def test_moving_a_slider_recounts(server, page):
    base, ws, run_id = server
    page.goto(f"{base}/cliques")
    settle(page, "Cliques")
    assert metric_value(page, "Flagged prompts") == "4"
    slider = page.get_by_role("slider").nth(1)  # k: minimum clique size
    slider.focus()
    for _ in range(4):  # k 10 -> 6: the six-copy prompt joins the flagged ones
        page.keyboard.press("ArrowLeft")
    wait_for_metric(page, "Flagged prompts", "5")
    settle(page, "Cliques")
    shoot(page, "3-cliques-k6")


def test_moving_the_grid_slider_recounts(server, page):
    """G 4 -> 1 by keyboard: plain L2 links the flat-texture trap, a fifth flagged prompt."""
    base, ws, run_id = server
    page.goto(f"{base}/cliques")
    settle(page, "Cliques")
    assert metric_value(page, "Flagged prompts") == "4"
    slider = page.get_by_role("slider").nth(3)  # G: tile grid (options 1, 2, 4, 8)
    assert slider.get_attribute("aria-valuetext") == "4 x 4"
    slider.focus()
    for _ in range(2):
        page.keyboard.press("ArrowLeft")
    wait_for_metric(page, "Flagged prompts", "5")
    settle(page, "Cliques")
    assert slider.get_attribute("aria-valuetext") == "1 x 1"
    shoot(page, "3-cliques-grid1")


def test_labelling_by_click_and_by_key_lands_in_the_database(server, page):
    from core import labels

    base, ws, run_id = server
    page.goto(f"{base}/review")
    settle(page, "Review")
    page.get_by_role("textbox", name="Reviewer").fill("browser")
    page.get_by_role("textbox", name="Reviewer").press("Enter")
    page.get_by_role("button", name=re.compile("^Exact copy")).wait_for(timeout=20_000)
    settle(page, "Review")
    assert "reviewer=browser" in page.url  # the name survives a reload
    first = labels.review_queue(ws, run_id, "browser")[0]
    page.get_by_role("button", name=re.compile("^Exact copy")).click()
    deadline = time.monotonic() + 20
    while not [e for e in labels.label_events(ws) if e.reviewer == "browser"] and time.monotonic() < deadline:
        time.sleep(0.1)
    mine = [e for e in labels.label_events(ws) if e.reviewer == "browser"]
    assert [(e.candidate_id, e.label) for e in mine] == [(first.id, "exact_copy")]
    settle(page, "Review")
    shoot(page, "4-review-after-label")
    # digits typed into the note are text, not shortcuts
    note = page.get_by_role("textbox", name="Note (optional, saved with the label)")
    note.click()
    page.keyboard.type("seen 3 times")
    page.wait_for_timeout(500)
    assert note.input_value() == "seen 3 times"
    assert len([e for e in labels.label_events(ws) if e.reviewer == "browser"]) == 1
    # key 3 labels the next candidate "not memorized", with the note typed
    second = labels.review_queue(ws, run_id, "browser")[0]
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    settle(page, "Review")
    page.keyboard.press("3")
    deadline = time.monotonic() + 20
    while len([e for e in labels.label_events(ws) if e.reviewer == "browser"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    mine = [e for e in labels.label_events(ws) if e.reviewer == "browser"]
    assert [(e.candidate_id, e.label) for e in mine] == [(first.id, "exact_copy"), (second.id, "not_memorized")]
    assert mine[1].note == "seen 3 times"
    # a reload keeps the reviewer and writes nothing
    page.reload()
    settle(page, "Review")
    assert page.get_by_role("textbox", name="Reviewer").input_value() == "browser"
    assert len([e for e in labels.label_events(ws) if e.reviewer == "browser"]) == 2


def test_streamlit_run_app_py_from_a_checkout(server, browser, tmp_path):
    """`streamlit run dashboard/app.py -- WS` from the repository root (its .streamlit/config.toml applies)."""
    _, ws, _ = server
    port = free_port()
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", f"--server.port={port}",
                                 "--", str(ws.root)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.2)
        context = browser.new_context()
        pg = context.new_page()
        pg.goto(f"{base}/training")
        settle(pg, "Training data")
        assert metric_value(pg, "Images") == "8"
        assert str(ws.root) in pg.locator('[data-testid="stSidebar"]').inner_text()
        context.close()
        assert "127.0.0.1" in (tmp_path / "log").read_text()  # the checkout's config binds to loopback
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_html_report_loads_nothing_from_the_network(server, browser, tmp_path):
    from core import report

    _, ws, run_id = server
    path = report.write_report(ws, tmp_path / "report.html", run_id)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(path.as_uri())
    pg.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0", timeout=30_000)
    pg.wait_for_timeout(500)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert pg.locator(".js-plotly-plot").count() >= 4  # the figures drew from the inline plotly.js
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / "8-html-report.png"), full_page=True)
    context.close()
