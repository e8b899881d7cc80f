"""The Inpainting page under AppTest: a stored run's figures and gallery, and a run started in the background."""

from __future__ import annotations

import pytest

from core import inpaint
from dashboard import ui
from dashboard_data import empty_workspace
from test_dashboard import no_exception, open_app, texts
from test_inpaint import random_images


@pytest.fixture(scope="module")
def inpainted(tmp_path_factory, tiny_unconditional):
    tmp = tmp_path_factory.mktemp("inpainting-page")
    ws = empty_workspace(tmp / "ws")
    inpaint.run_inpainting(ws, str(tiny_unconditional), random_images(tmp / "m", 3, seed=1),
                           random_images(tmp / "n", 2, seed=2), samples=3, steps=3, device="cpu")
    return ws


def test_without_a_workspace_the_page_says_so():
    at = no_exception(open_app(page="inpainting"))
    assert texts(at.info) == ["No workspace is open: start the dashboard with `memaudit dashboard WS`."]


def test_without_a_run_the_page_offers_to_start_one(tmp_path):
    at = no_exception(open_app(empty_workspace(tmp_path / "ws"), "inpainting"))
    assert any("No inpainting run yet" in t for t in texts(at.info))
    assert at.button(key="inpaint_start").disabled  # no model, no images yet


def test_a_stored_run_shows_its_numbers_histogram_and_completions(inpainted):
    at = no_exception(open_app(inpainted, "inpainting"))
    s = inpaint.summary(inpainted)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Members / non-members"] == "3 / 2"
    assert labels["Non-members: median L2"] == f"{s['chosen']['nonmembers']['median']:.3f}"
    table = at.dataframe[0].value
    assert list(table["distance"]) == ["model-chosen (lowest loss)", "best of N (oracle bound)", "mean of N"]
    assert len(at.get("plotly_chart")) == 1
    # 5 images: original, masked input and 3 completions each
    assert len(at.get("image")) == 5 * 5
    gaps = [float(m.value.split("gap ")[1].split(" ")[0]) for m in at.markdown if "· gap " in m.value]
    assert gaps == sorted(gaps, reverse=True) and len(gaps) == 5
    at.selectbox(key="inpaint_order").select("nonmembers").run()
    no_exception(at)
    assert [m.value.startswith("**non-member**") for m in at.markdown if "· gap " in m.value] == [True, True]
    at.segmented_control(key="inpaint_kind").set_value("best").run()
    no_exception(at)


def test_a_run_started_from_the_page_runs_in_the_background(tiny_unconditional, tmp_path):
    ws = empty_workspace(tmp_path / "ws")
    members = random_images(tmp_path / "m", 2, seed=5)
    at = no_exception(open_app(ws, "inpainting", inpaint_samples=2, inpaint_steps=2))
    at.text_input(key="inpaint_model").input(str(tiny_unconditional))
    at.text_input(key="inpaint_images").input(str(members)).run()
    at.button(key="inpaint_start").click().run()
    ui.jobs().get((str(ws.root), "inpainting")).join(120)
    at.run()
    no_exception(at)
    assert any(s.value.startswith("Done: inpainting run 1, 2 images x 2 completions") for s in at.success), texts(at.error)
    assert [r.images for r in inpaint.list_runs(ws)] == [2]
    # a bad model is one message, and nothing is stored
    at.button(key="inpaint_dismiss").click().run()
    at.text_input(key="inpaint_model").input(str(tmp_path / "nowhere")).run()
    at.button(key="inpaint_start").click().run()
    ui.jobs().get((str(ws.root), "inpainting")).join(60)
    at.run()
    assert len(at.error) == 1 and "no such model folder" in at.error[0].value
    assert len(inpaint.list_runs(ws)) == 1
