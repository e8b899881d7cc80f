"""The Inpainting page in a real browser (Chromium through Playwright) on a workspace with an inpainting
run: numbers, histogram and every completion render; the sort order changes the gallery. The
screenshot lands in test-artifacts/screenshots/ for a person to look at."""

from __future__ import annotations

import os

import pytest
from servers import free_port, running_dashboard

from test_browser import ROOT, browser, metric_value, page, settle, shoot  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_unconditional):
    from core import inpaint
    from dashboard_data import empty_workspace
    from test_inpaint import random_images

    tmp = tmp_path_factory.mktemp("browser-inpainting")
    ws = empty_workspace(tmp / "ws")
    inpaint.run_inpainting(ws, str(tiny_unconditional), random_images(tmp / "m", 3, seed=1),
                           random_images(tmp / "n", 3, seed=2), samples=3, steps=3, device="cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with running_dashboard(ws.root, free_port(), tmp / "streamlit.log", cwd=ROOT, env=env, timeout=60) as base:
        yield base, ws


def test_the_inpainting_page_shows_the_run(server, page):  # noqa: F811 - the fixture
    from core import inpaint

    base, ws = server
    page.goto(f"{base}/inpainting")
    settle(page, "Inpainting")
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]
    assert metric_value(page, "Members / non-members") == "3 / 3"
    s = inpaint.summary(ws)
    assert metric_value(page, "Members: median L2") == f"{s['chosen']['members']['median']:.3f}"
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)  # the chart library loads lazily
    assert page.locator(".js-plotly-plot").count() == 1
    # six images: original, masked input and three completions each, all loaded
    assert page.locator('[data-testid="stImage"] img').count() == 6 * 5
    shot = shoot(page, "inpainting")
    assert shot.stat().st_size > 10_000

    page.locator('[data-testid="stSelectbox"]').filter(has_text="Sort").click()
    page.get_by_role("option", name="members, largest gap first", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stImage\"] img').length === 15", timeout=30_000)
    settle(page, "Inpainting")
    body = page.inner_text('[data-testid="stMain"]')
    assert "non-member ·" not in body and body.count("member ·") == 3
