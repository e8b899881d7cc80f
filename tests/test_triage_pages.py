"""The Triage page and the Generate page's start from the ranking, through AppTest on a real
audited workspace scored by a real (tiny) pipeline."""

from __future__ import annotations

import pytest

from core import results, triage
from dashboard_data import labelled_copy
from test_dashboard import metric, no_exception, open_app, texts


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_text2image):
    """(ws, audit run, triage run): the audited workspace's prompts, plus two never generated, triaged."""
    ws, run_id = labelled_copy(tmp_path_factory, "triage-pages")
    prompts = [r.prompt for r in results.prompt_results(ws, run_id)] + ["a prompt never generated", "another one"]
    report = triage.triage(ws, str(tiny_text2image), prompts, triage.make_params(ws, samples=1), device="cpu")
    return ws, run_id, report.run_id


def test_triage_page_without_a_run_says_what_to_do(tmp_path):
    from core.store import Workspace

    at = no_exception(open_app(Workspace.init(tmp_path / "ws"), "triage"))
    assert any("memaudit triage" in t for t in texts(at.info))


def test_triage_page_ranks_and_checks_against_the_audit(scored):
    ws, run_id, triage_run = scored
    at = no_exception(open_app(ws, "triage"))
    v = triage.validate(ws, triage_run, run_id)
    assert v.not_audited == 2 and v.prompts == len(results.prompt_results(ws, run_id))
    table = at.dataframe[0].value
    assert list(table["prompt"]) == [r.prompt for r in triage.ranked(ws, triage_run)]
    assert set(table["audit"]) >= {"extracted", ""}
    assert v.calibration is not None and v.positives and v.negatives
    assert metric(at, "AUC") == f"{v.auc:.3f}"
    assert metric(at, "TPR at 1% FPR") == f"{v.tpr_at_1pct_fpr:.3f}"
    assert metric(at, "Top N keeping every extracted prompt") == f"{v.keep_all_rank} of {v.prompts}"
    assert any("2 scored prompts have no verdict" in t for t in texts(at.caption))

    at.segmented_control(key="triage_verdict").set_value("flagged").run()
    no_exception(at)
    flagged = triage.validate(ws, triage_run, run_id, "flagged")
    assert metric(at, "Top N keeping every flagged prompt") == f"{flagged.keep_all_rank} of {flagged.prompts}"


def test_sending_the_top_prompts_fills_the_generate_page(scored):
    ws, _, triage_run = scored
    at = no_exception(open_app(ws, "triage"))
    at.number_input(key="triage_top").set_value(3).run()
    at.button(key="triage_send").click().run()
    no_exception(at)
    assert at.title[0].value == "Generate"
    top = triage.top_prompts(ws, triage_run, 3)
    assert at.text_area(key="generate_prompts_text").value == "\n".join(top)
    assert any(f"3 highest-scoring of the {len(triage.ranked(ws, triage_run))} prompts of triage run {triage_run}" in t
               and "lower bound" in t for t in texts(at.caption))


def test_generate_page_starts_from_the_latest_triage_ranking(scored):
    ws, _, triage_run = scored
    at = no_exception(open_app(ws, "generate"))
    assert at.text_area(key="generate_prompts_text").value == "\n".join(triage.top_prompts(ws, triage_run, 20))
    at.button(key="generate_fill_triage").click().run()
    assert no_exception(at).text_area(key="generate_prompts_text").value == "\n".join(triage.top_prompts(ws, triage_run, 20))
