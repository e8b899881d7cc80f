"""Read-only views for the dashboard: counts, labelled scores, Figure 5 bins, image preparation."""

from collections import Counter

import numpy as np
import pytest

from core import labels, results, views
from dashboard_data import labelled_workspace, truth_of


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return labelled_workspace(tmp_path_factory)


def test_overview_counts(planted):
    ws, run_id = planted
    ov = results.overview(ws, run_id)
    cands = results.candidates(ws, run_id)
    assert ov.candidates == len(cands) and ov.labelled_candidates == len(cands) and ov.unlabelled_candidates == 0
    assert ov.flagged_prompts == 4 and ov.extracted_prompts == 3
    assert ov.extracted_candidates == sum(c.extracted for c in cands) == 4
    assert ov.reviewers == ("alice", "bob")
    kappa, n = ov.kappa[("alice", "bob")]
    assert n == len(cands) and 0 < kappa < 1


def test_candidate_scores_carry_metrics_and_majority_truth(planted):
    ws, run_id = planted
    s = results.candidate_scores(ws, run_id)
    cands = results.candidates(ws, run_id)
    assert list(s.candidate_ids) == [c.id for c in cands]
    np.testing.assert_allclose(s.metrics["l2"], [c.l2 for c in cands])
    assert np.isnan(s.metrics["relative_l2"]).all()  # text prompts: no relative L2
    sims = [results.neighbours(ws, c.id)[0].similarity for c in cands]
    np.testing.assert_allclose(s.metrics["similarity"], sims, rtol=1e-6)
    for c, t in zip(cands, s.truth):
        alice = truth_of(c)
        if alice == "near_copy":
            assert t is None  # alice near_copy vs bob not_memorized: a tie
        else:
            assert t is (alice == "exact_copy")
    assert "relative_l2" not in s.available_metrics() and "l2" in s.available_metrics()


def test_labelled_prompts(planted):
    ws, run_id = planted
    assert results.labelled_prompts(ws, run_id) == {c.prompt_id for c in results.candidates(ws, run_id)}


def test_label_counts(planted):
    ws, run_id = planted
    counts = results.label_counts(ws, run_id)
    current = labels.current_labels(ws)
    expected = Counter(lab for c in results.candidates(ws, run_id)
                       for lab in current.get((c.medoid_generation_id, c.nearest_training_id), {}).values())
    assert counts == dict(expected)
    assert counts["unsure"] >= 1 and counts["near_copy"] >= 1 and sum(counts.values()) >= 16


def test_bin_by_duplicates():
    rows = [{"k": 1, "prompts": 5, "extracted": 0}, {"k": 3, "prompts": 2, "extracted": 1},
            {"k": 2, "prompts": 1, "extracted": 1}, {"k": 300, "prompts": 4, "extracted": 4}]
    bins = results.bin_by_duplicates(rows)
    assert bins == [("1", 5, 0), ("2-3", 3, 2), (">=256", 4, 4)]  # empty bins are left out
    assert results.bin_by_duplicates([{"k": 5, "prompts": 1, "extracted": None}])[-1] == ("4-7", 1, 0)
    assert results.bin_by_duplicates([]) == []


def test_extraction_by_duplicates(planted):
    ws, run_id = planted
    rates = results.extraction_by_duplicates(ws, run_id)
    assert rates.bins == [("1", 10, 3)]  # every training image is unique; 3 of the 10 text prompts extracted
    assert "nearest to their largest clique" in rates.basis  # prompts are not training captions here


def test_duplicate_groups_and_summary(planted):
    ws, _ = planted
    summary = results.training_summary(ws)
    assert summary["images"] == 8 and summary["captioned"] == 8 and summary["max_duplicates"] == 1
    assert results.duplicate_groups(ws) == []


def test_upscale_nearest_keeps_pixels_square():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    up = views.upscale_nearest(a, 5)  # factor ceil(5 / 2) = 3
    assert up.shape == (6, 9, 3)
    assert (up[::3, ::3] == a).all() and (up[2, 8] == a[0, 2]).all()
    assert views.upscale_nearest(a, 2) is a


def test_difference_map_and_blend():
    a = np.zeros((4, 4, 3), np.float32)
    b = np.ones((4, 4, 3), np.float32)
    b[0, 0] = 0
    d = views.difference_map(a, b)
    assert d.shape == (4, 4) and d[0, 0] == 0 and d[1, 1] == 1
    np.testing.assert_allclose(views.blend(a, b, 0.25)[1, 1], 0.25)
    with pytest.raises(ValueError, match="differ in shape"):
        views.difference_map(a, b[:2])


def test_difference_image_colours():
    a = np.zeros((2, 2, 3), np.float32)
    b = np.zeros((2, 2, 3), np.float32)
    b[0, 0] = 0.5
    b[0, 1] = 0.01
    img, vmax = views.difference_image(a, b)
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3) and vmax == views.DIFFERENCE_VMAX
    assert (img[1, 1] == views.MAGMA[0]).all() and (img[0, 0] == views.MAGMA[-1]).all()  # 0.5 saturates
    assert 0 < img[0, 1].sum() < views.MAGMA[1].sum()  # a small difference stays dark on the fixed scale
    mid = views.colour_map(np.array([[0.5 / 9]]), 0.5)  # one anchor step up: exactly the second anchor
    assert (mid[0, 0] == views.MAGMA[1]).all()


def test_display_image_and_data_uri(planted):
    ws, run_id = planted
    c = results.candidates(ws, run_id)[0]
    img = views.display_image(ws, c.medoid_path, 192)
    assert img.dtype == np.uint8 and img.shape == (192, 192, 3)  # 64 px enlarged 3 x
    assert views.file_data_uri(ws, c.medoid_path).startswith("data:image/png;base64,")
    gen, train = views.pair_arrays(ws, c.medoid_path, c.nearest_training_path)
    assert gen.shape == train.shape == (64, 64, 3)
    l2 = float(np.sqrt(((gen - train) ** 2).mean()))
    assert l2 == pytest.approx(c.l2, abs=2e-3)


def test_views_write_nothing(planted):
    ws, run_id = planted
    before = ws.counts()
    events = len(labels.label_events(ws))
    results.overview(ws, run_id)
    results.candidate_scores(ws, run_id)
    results.extraction_by_duplicates(ws, run_id)
    assert ws.counts() == before and len(labels.label_events(ws)) == events


def test_distinct_neighbours_keeps_identical_files_once():
    from types import SimpleNamespace as NS

    from core.views import distinct_neighbours

    ns = [NS(training=NS(sha256=h), rank=i) for i, h in enumerate("aabac")]
    assert [n.rank for n in distinct_neighbours(ns)] == [0, 2, 4]
