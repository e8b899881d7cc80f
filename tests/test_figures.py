"""Figure builders: the data they are given is what they draw; empty input gives a labelled empty figure."""

import numpy as np
import pytest

from core import figures
from core.calibrate import calibrate


def test_distance_distributions_share_bins_and_mark_the_threshold():
    fig = figures.distance_distributions([0.01, 0.02, np.nan], [0.3, 0.4, 0.5], metric="l2", threshold=0.15)
    neg, pos = fig.data
    assert list(pos.x) == [0.01, 0.02] and list(neg.x) == [0.3, 0.4, 0.5]  # NaN dropped
    assert pos.xbins == neg.xbins
    assert pos.name == "memorised (2)" and neg.name == "not memorised (3)"
    assert [s.x0 for s in fig.layout.shapes] == [0.15]


def test_extraction_rate_is_extracted_over_total():
    fig = figures.extraction_rate_by_duplicates([("1", 10, 1), ("2-3", 4, 2), ("4-7", 0, 0)], delta=0.15)
    bar = fig.data[0]
    assert list(bar.x) == ["1", "2-3", "4-7"]
    np.testing.assert_allclose(bar.y, [0.1, 0.5, 0.0])
    assert list(bar.text) == ["1/10", "2/4", "0/0"]


def test_clique_sizes_colour_the_flagged_side():
    fig = figures.clique_size_distribution([1, 1, 4, 12, 12], min_clique=10)
    bar = fig.data[0]
    assert list(bar.x) == [1, 4, 12] and list(bar.y) == [2, 1, 2]
    assert list(bar.marker.color) == [figures.NEGATIVE_COLOUR, figures.NEGATIVE_COLOUR, figures.POSITIVE_COLOUR]


def test_roc_and_pr_draw_one_curve_per_metric():
    cals = {"l2": calibrate([0.01, 0.2, 0.3], [1, 0, 1], metric="l2"),
            "similarity": calibrate([0.9, 0.5, 0.4], [1, 0, 1], metric="similarity")}
    roc = figures.roc_curves(cals)
    assert len(roc.data) == 3  # the chance diagonal and two curves
    assert roc.data[1].name.startswith("normalised L2: AUC 0.50")
    np.testing.assert_allclose(roc.data[1].x, cals["l2"].fpr)
    pr = figures.precision_recall_curves(cals)
    np.testing.assert_allclose(pr.data[0].y, cals["l2"].precision)


@pytest.mark.parametrize("build", [
    lambda: figures.distance_distributions([], []),
    lambda: figures.extraction_rate_by_duplicates([]),
    lambda: figures.clique_size_distribution([]),
    lambda: figures.roc_curves({}),
    lambda: figures.precision_recall_curves({}),
    lambda: figures.precision_at_rank([np.nan, np.nan]),
])
def test_empty_input_says_so(build):
    fig = build()
    assert not fig.data and fig.layout.annotations[0].text.startswith("no")
