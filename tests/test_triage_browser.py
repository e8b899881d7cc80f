"""The Triage page in a real browser: a workspace audited and triaged by a real (tiny) pipeline, the
score checked against the audit's verdicts, and the top prompts sent to the Generate page.
Screenshots land in test-artifacts/screenshots/."""

from __future__ import annotations

import os

import pytest
from servers import free_port, running_dashboard
from test_browser import ROOT, browser, metric_value, page, settle, shoot  # noqa: F401 - fixtures

from core import results, triage

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_text2image):
    from dashboard_data import labelled_copy

    ws, run_id = labelled_copy(tmp_path_factory, "triage-browser")
    prompts = [r.prompt for r in results.prompt_results(ws, run_id)]
    triage_run = triage.triage(ws, str(tiny_text2image), prompts, triage.make_params(ws, samples=1), device="cpu").run_id
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    with running_dashboard(ws.root, free_port(), log_path, cwd=ROOT, env=env, timeout=60) as base:
        yield base, ws, run_id, triage_run


def test_triage_page_checks_the_score_and_sends_the_top_to_generate(server, page):
    base, ws, run_id, triage_run = server
    v = triage.validate(ws, triage_run, run_id)
    page.goto(f"{base}/triage")
    settle(page, "Triage")
    assert metric_value(page, "AUC") == f"{v.auc:.3f}"
    assert metric_value(page, "Top N keeping every extracted prompt") == f"{v.keep_all_rank} of {v.prompts}"
    charts = page.locator('[data-testid="stPlotlyChart"]')
    charts.nth(1).wait_for(timeout=20_000)  # the charts draw after the metrics
    assert charts.count() == 2
    assert shoot(page, "triage").stat().st_size > 10_000

    box = page.get_by_role("spinbutton", name="How many of the highest-scoring prompts")
    box.fill("3")
    box.press("Enter")
    page.get_by_role("button", name="Send the top 3 to Generate").click()
    settle(page, "Generate")
    area = page.get_by_role("textbox", name="Prompts, one per line (leave empty for an unconditional model)")
    assert area.input_value() == "\n".join(triage.top_prompts(ws, triage_run, 3))
    assert "3 highest-scoring" in page.inner_text("body")
    shoot(page, "triage-generate")
