"""The Membership page: under AppTest on a workspace with real runs of a tiny real pipeline (a
loss run and a two-checkpoint trend), its background job, and once in headless Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import membership_runs
from core.store import Workspace
from dashboard import ui
from tiny_models import build_unconditional

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")


def _images(folder: Path, seed: int, n: int = 12) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia-page")
    members, nonmembers = _images(root / "members", 0), _images(root / "nonmembers", 1)
    build_unconditional(root / "checkpoints" / "step-10", seed=1)
    model = build_unconditional(root / "model", seed=2)
    ws = Workspace.init(root / "ws")
    membership_runs.run_checkpoints(ws, root / "checkpoints", members, nonmembers, final_model=model, timestep=50,
                                    noise_draws=2)
    run = membership_runs.run_membership(ws, str(model), members, nonmembers, attack="loss", timestep=50, noise_draws=2)
    return ws, run, root


def open_page(ws: Workspace | None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state[ui.WS_KEY] = str(ws.root) if ws is not None else None
    at.switch_page("app_pages/membership.py")
    return at.run()


def test_page_shows_the_latest_run_with_metrics_roc_gallery_and_trend(scored):
    ws, run, _ = scored
    at = open_page(ws)
    assert not at.exception, [e.value for e in at.exception]
    labels = {m.label: m.value for m in at.metric}
    info = membership_runs.get_run(ws, run)
    assert labels["AUC"] == f"{info.metrics['auc']:.3f}"
    assert labels["TPR at 1% FPR"] == f"{info.metrics['tpr_at_1pct_fpr']:.1%}"
    assert at.selectbox(key="membership_run").value == run
    assert len(at.get("plotly_chart")) == 2 and len(at.get("image")) >= 2
    # the trend belongs to the checkpoint series: choose its last run
    at.selectbox(key="membership_run").set_value(run - 1).run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 3
    assert any("Along training" in str(h.value) for h in at.subheader)


def test_page_on_a_workspace_without_runs_says_what_to_do(tmp_path):
    at = open_page(Workspace.init(tmp_path / "ws"))
    assert not at.exception
    assert any("No membership run yet" in str(i.value) for i in at.info)


def test_a_run_started_on_the_page_runs_in_the_background_and_is_stored(scored, tmp_path):
    _, _, root = scored
    ws = Workspace.init(tmp_path / "ws")
    at = open_page(ws)
    at.text_input(key="membership_model").input(str(root / "model"))
    at.text_input(key="membership_members").input(str(root / "members"))
    at.text_input(key="membership_nonmembers").input(str(root / "nonmembers"))
    at.number_input(key="membership_timestep").set_value(50)
    at.number_input(key="membership_draws").set_value(2)
    at.run()
    at.button(key="membership_start").click().run()
    job = ui.jobs().get((str(ws.root), "membership"))
    assert job is not None
    job.join(120)
    assert job.status().state == "done", job.status().error
    assert [r.id for r in membership_runs.list_runs(ws)] == [job.status().result]


def test_a_bad_start_shows_one_sentence_and_stores_nothing(scored, tmp_path):
    _, _, root = scored
    ws = Workspace.init(tmp_path / "ws")
    at = open_page(ws)
    at.text_input(key="membership_model").input(str(root / "model"))
    at.text_input(key="membership_members").input(str(root / "members"))
    at.text_input(key="membership_nonmembers").input(str(root / "members"))
    at.run()
    at.button(key="membership_start").click().run()
    job = ui.jobs().get((str(ws.root), "membership"))
    job.join(60)
    assert job.status().state == "failed" and "both members and non-members" in job.status().error
    assert job.status().traceback is None
    assert membership_runs.list_runs(ws) == []


@pytest.mark.browser
def test_membership_page_in_a_real_browser(scored):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    from servers import free_port, running_dashboard
    from test_browser import FLAGS, IDLE, SHOTS

    ws, run, root = scored
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with running_dashboard(ws.root, port, root / "streamlit.log", cwd=ROOT, env=env, timeout=60) as base, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
        pg = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
        pg.goto(f"{base}/membership")
        pg.get_by_role("heading", name="Membership inference", exact=True).wait_for(timeout=30_000)
        pg.wait_for_function(IDLE, timeout=30_000)
        pg.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=30_000)
        pg.wait_for_timeout(600)
        SHOTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(SHOTS / "membership.png"), full_page=True)
        text = pg.inner_text("body")
        info = membership_runs.get_run(ws, run)
        assert f"{info.metrics['auc']:.3f}" in text and "Hardest and easiest members" in text
        browser.close()
