"""Calibration maths against hand-computed values and a brute-force reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.calibrate import calibrate, calibrate_metrics, ground_truth, precision_at_rank
from core.errors import InputError


def test_ground_truth_majority_without_unsure():
    assert ground_truth({"a": "exact_copy"}) is True
    assert ground_truth({"a": "near_copy", "b": "not_memorized", "c": "exact_copy"}) is True
    assert ground_truth({"a": "not_memorized", "b": "unsure"}) is False
    assert ground_truth({"a": "unsure"}) is None
    assert ground_truth({"a": "near_copy", "b": "not_memorized"}) is None  # a tie is undecided
    assert ground_truth({}) is None
    assert ground_truth(["exact_copy", "exact_copy", "not_memorized"]) is True


def test_hand_computed_curve_for_a_distance():
    # distances: positives 0.01, 0.02, 0.05; negatives 0.05 (tied with a positive), 0.2, 0.3
    c = calibrate([0.01, 0.02, 0.05, 0.2, 0.3, 0.05], [1, 1, 0, 0, 0, 1], metric="l2")
    assert not c.higher_is_positive and c.rule() == "l2 <= t"
    assert c.n_positive == 3 and c.n_negative == 3
    np.testing.assert_allclose(c.thresholds, [0.01, 0.02, 0.05, 0.2, 0.3])
    np.testing.assert_allclose(c.tpr, [0, 1 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(c.fpr, [0, 0, 0, 1 / 3, 2 / 3, 1])   # the tie enters together
    np.testing.assert_allclose(c.precision, [1, 1, 0.75, 0.6, 0.5])
    # AUC = P(positive closer than negative), ties half: (3 + 3 + 2.5) / 9
    assert c.auc == pytest.approx(8.5 / 9)
    assert c.tpr_at_1pct_fpr == pytest.approx(2 / 3)
    op = c.targets[0.9]  # admits 0.01 and 0.02; the next labelled score is 0.05: the gap's midpoint
    assert op.threshold == pytest.approx(0.035) and op.tp == 2 and op.fp == 0 and op.recall == pytest.approx(2 / 3)
    at = c.at(0.05)
    assert (at.tp, at.fp) == (3, 1) and at.precision == pytest.approx(0.75)


def test_similarity_direction_is_mirrored():
    d = np.array([0.01, 0.02, 0.05, 0.2, 0.3])
    y = np.array([1, 1, 0, 1, 0], bool)
    a = calibrate(d, y, metric="l2")
    b = calibrate(1 - d, y, metric="similarity")
    assert b.higher_is_positive and b.rule() == "similarity >= t"
    np.testing.assert_allclose(a.tpr, b.tpr)
    np.testing.assert_allclose(a.fpr, b.fpr)
    assert a.auc == pytest.approx(b.auc)
    assert b.targets[0.99].threshold == pytest.approx(1 - a.targets[0.99].threshold)


def test_unreachable_precision_and_missing_class():
    c = calibrate([0.1, 0.2, 0.3], [0, 1, 0], metric="l2", precisions=(0.9, 0.3))
    assert c.targets[0.9] is None  # the best precision reachable is 0.5
    assert c.targets[0.3].threshold == pytest.approx(0.3)  # admits everything: the last score itself
    with pytest.raises(InputError, match="at least one pair labelled a copy"):
        calibrate([0.1, 0.2], [1, 1], metric="l2")


def test_non_finite_scores_are_dropped():
    c = calibrate([0.1, np.nan, 0.3, np.inf], [1, 1, 0, 0], metric="relative_l2")
    assert (c.n_positive, c.n_negative) == (1, 1)


def test_calibrate_metrics_skips_what_cannot_be_calibrated():
    truth = [True, False, None, True]
    out = calibrate_metrics({"l2": [0.01, 0.3, 0.02, 0.05],
                             "relative_l2": [np.nan, np.nan, 0.5, np.nan],   # no labelled value
                             "similarity": [0.99, np.nan, 0.5, 0.98]},       # only positives labelled
                            truth)
    assert set(out) == {"l2"}
    assert out["l2"].auc == pytest.approx(1.0)


def test_precision_at_rank_skips_unlabelled():
    p = precision_at_rank([None, True, False, None, True])
    assert np.isnan(p[0])
    np.testing.assert_allclose(p[1:], [1.0, 0.5, 0.5, 2 / 3])


def _brute(scores, y, t):
    sel = scores <= t
    tp, fp = int((sel & y).sum()), int((sel & ~y).sum())
    return tp, fp


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=40))
def test_curve_points_match_brute_force(pairs):
    scores = np.array([s / 20 for s, _ in pairs])
    y = np.array([b for _, b in pairs])
    if y.all() or not y.any():
        return
    c = calibrate(scores, y, metric="l2")
    for i, t in enumerate(c.thresholds):
        tp, fp = _brute(scores, y, t)
        assert (c.tp[i], c.fp[i]) == (tp, fp)
        assert c.tpr[i + 1] == pytest.approx(tp / y.sum()) and c.fpr[i + 1] == pytest.approx(fp / (~y).sum())
    # AUC equals the Mann-Whitney probability (ties count half)
    pos, neg = scores[y], scores[~y]
    mw = np.mean([(1.0 if p < n else 0.5 if p == n else 0.0) for p in pos for n in neg])
    assert c.auc == pytest.approx(mw)
    # every reachable target threshold reproduces its stated precision and is the most permissive one
    for p, op in c.targets.items():
        if op is None:
            assert (c.precision < p - 1e-12).all()
            continue
        tp, fp = _brute(scores, y, op.threshold)
        assert (tp, fp) == (op.tp, op.fp) and tp / (tp + fp) >= p - 1e-12
        assert op.threshold in c.thresholds or not np.any((scores > op.threshold - 1e-12) & (scores < op.threshold + 1e-12))
        looser = c.thresholds[c.thresholds > op.threshold]
        assert all(_brute(scores, y, t)[0] / sum(_brute(scores, y, t)) < p - 1e-12 for t in looser)
