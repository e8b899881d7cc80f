"""The HTML report: self-contained (no external URL), with the run's numbers, figures and thumbnails."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from core import report, results
from core.errors import InputError
from dashboard_data import empty_workspace, labelled_workspace


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws, run_id = labelled_workspace(tmp_path_factory)
    return ws, run_id, report.build_report(ws, run_id, top=10)


def test_report_is_self_contained(built):
    _, _, text = built
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing is fetched: outside the inline scripts every src/href is a data URI, no stylesheet
    # or font is linked, no script is loaded (plotly.js carries link texts inside its own code)
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", text, flags=re.S)
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", markup)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), [r for r in refs if not r.startswith("data:")][:5]
    assert not re.search(r"<link\b", markup, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", markup, re.I)
    assert not re.search(r"<script[^>]+src=", text, re.I)
    # plotly.js is embedded exactly once, inline
    assert text.count("* plotly.js v") == 1


def test_report_holds_the_runs_numbers_and_labels(built):
    ws, run_id, text = built
    summary = results.count_summary(ws, run_id)
    assert f"audit run {run_id}" in text
    assert f"<th>flagged prompts</th><td class='num'>{summary['flagged_prompts']}</td>" in text
    assert f"<th>extracted candidates</th><td class='num'>{summary['extracted_candidates']}</td>" in text
    assert "alice: near_copy, bob: not_memorized" in text and "alice: exact_copy, bob: exact_copy" in text
    assert "alice / bob" in text  # agreement between the two reviewers
    assert "Calibration against human labels" in text


def test_thumbnails_are_inline_pngs_enlarged_with_nearest_neighbour(built):
    ws, run_id, text = built
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    shown = min(10, len(results.candidates(ws, run_id)))
    assert len(uris) == 2 * shown  # medoid and nearest training image per candidate
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))))
    assert img.shape[0] >= 128 and img.shape[0] % 64 == 0  # 64 px planted images, enlarged by an integer factor
    f = img.shape[0] // 64
    assert (img[::f, ::f].repeat(f, 0).repeat(f, 1) == img).all()  # every source pixel is an f x f block


def test_write_report_and_its_errors(built, tmp_path):
    ws, run_id, _ = built
    out = report.write_report(ws, tmp_path / "r.html", run_id)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(InputError, match="does not exist"):
        report.write_report(ws, tmp_path / "missing" / "r.html", run_id)
    with pytest.raises(InputError, match="no audit run"):
        report.build_report(empty_workspace(tmp_path / "empty"))
