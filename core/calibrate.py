"""Calibrating a metric against human labels: ROC, precision-recall, TPR at low FPR, thresholds.

Ground truth for one (generation, training image) pair comes from its reviewers' current
labels: ``exact_copy`` and ``near_copy`` count as memorised (positive), ``not_memorized``
as not (negative), ``unsure`` is ignored. With several reviewers the majority of the
remaining labels decides; a tie, or a pair with only ``unsure`` labels, is excluded.

A metric is a score per pair with a direction. For distances (l2, tiled_l2, relative_l2)
lower means "more likely a copy" and the decision rule is ``score <= t``; for similarities
and clique sizes higher means more likely and the rule is ``score >= t``. Internally every
score is turned into a suspicion ``s`` (``-score`` for distances) so the rule is ``s >= -t``.

At each distinct threshold t (ties enter together):

    TP(t) = #positives with rule true     FP(t) = #negatives with rule true
    TPR = TP / P     FPR = FP / N     precision = TP / (TP + FP)     recall = TPR

The ROC curve starts at (0, 0) (nothing selected); its area is the trapezoidal sum.
TPR at FPR f is the largest TPR over thresholds whose FPR <= f, without interpolation
(the convention of low-FPR reporting: with fewer than 1/f negatives it means "with no
false positive at all"). The threshold a target precision p implies is the most permissive
threshold whose precision >= p (highest recall among those reaching p). Any t between the
last score it admits and the next labelled score gives the same counts; the midpoint of that
gap is reported (the last admitted score itself when every pair is admitted), so applying
``score <= t`` to the labelled pairs reproduces exactly the precision and recall reported with
it while leaving the same margin on both sides for pairs not yet labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError
from .records import POSITIVE_LABELS

NEGATIVE_LABELS = ("not_memorized",)

# Metric name -> True when a higher value means "more likely memorised".
HIGHER_IS_POSITIVE: dict[str, bool] = {
    "l2": False,
    "tiled_l2": False,
    "relative_l2": False,
    "similarity": True,
    "clique_size": True,
    "mean_distance": False,
}

DEFAULT_PRECISIONS: tuple[float, ...] = (0.9, 0.95, 0.99)


def ground_truth(labels: Mapping[str, str | None] | Sequence[str | None]) -> bool | None:
    """Majority of the positive/negative labels (by reviewer, or a plain list); None when undecided."""
    values = list(labels.values() if isinstance(labels, Mapping) else labels)
    pos = sum(1 for v in values if v in POSITIVE_LABELS)
    neg = sum(1 for v in values if v in NEGATIVE_LABELS)
    if pos == neg:
        return None
    return pos > neg


@dataclass(frozen=True)
class Operating:
    """One threshold and what it does on the labelled pairs."""
    threshold: float
    tp: int
    fp: int
    precision: float
    recall: float
    fpr: float


@dataclass(frozen=True)
class Calibration:
    metric: str
    higher_is_positive: bool
    n_positive: int
    n_negative: int
    thresholds: np.ndarray   # (T,) distinct scores, most suspicious first
    tpr: np.ndarray          # (T + 1,) ROC, starting at 0
    fpr: np.ndarray          # (T + 1,)
    precision: np.ndarray    # (T,)
    recall: np.ndarray       # (T,)
    tp: np.ndarray           # (T,) true positives admitted at each threshold
    fp: np.ndarray           # (T,) false positives admitted at each threshold
    auc: float
    tpr_at_1pct_fpr: float
    targets: dict[float, Operating | None]  # target precision -> implied threshold (None: unreachable)

    def rule(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_positive else '<='} t"

    def at(self, threshold: float) -> Operating:
        """What ``threshold`` does on the labelled pairs."""
        sel = self.thresholds >= threshold if self.higher_is_positive else self.thresholds <= threshold
        if not sel.any():
            return Operating(float(threshold), 0, 0, float("nan"), 0.0, 0.0)
        i = int(np.nonzero(sel)[0].max())
        return Operating(float(threshold), int(self.tp[i]), int(self.fp[i]), float(self.precision[i]),
                         float(self.recall[i]), float(self.fpr[i + 1]))


def _check(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must have the same length")
    if positive.dtype != np.bool_:
        positive = positive.astype(bool)
    keep = np.isfinite(scores)
    return scores[keep], positive[keep]


def calibrate(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray, *,
              metric: str = "score", higher_is_positive: bool | None = None,
              precisions: Sequence[float] = DEFAULT_PRECISIONS, max_fpr: float = 0.01) -> Calibration:
    """ROC and PR of one metric; non-finite scores (a metric absent for a pair) are dropped.

    Raises InputError when the labelled pairs lack a positive or a negative.
    """
    if higher_is_positive is None:
        higher_is_positive = HIGHER_IS_POSITIVE.get(metric, False)
    s, y = _check(np.asarray(scores, dtype=np.float64), np.asarray(positive))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"calibrating {metric} needs at least one pair labelled a copy and one labelled not memorized "
            f"(have {n_pos} and {n_neg}); label more candidates on the Review page")
    suspicion = s if higher_is_positive else -s
    order = np.argsort(-suspicion, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp_cum = np.cumsum(y_sorted)
    fp_cum = np.cumsum(~y_sorted)
    # the last index of each run of tied scores: ties enter together
    last = np.r_[np.nonzero(np.diff(s_sorted) != 0)[0], len(s_sorted) - 1]
    tp, fp = tp_cum[last].astype(np.float64), fp_cum[last].astype(np.float64)
    thresholds = s_sorted[last]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    ok = fpr <= max_fpr + 1e-12
    tpr_low = float(tpr[ok].max())
    targets: dict[float, Operating | None] = {}
    for p in precisions:
        reach = np.nonzero(precision >= p - 1e-12)[0]
        if len(reach) == 0:
            targets[float(p)] = None
            continue
        i = int(reach.max())
        t = float(thresholds[i]) if i == len(thresholds) - 1 else float((thresholds[i] + thresholds[i + 1]) / 2.0)
        targets[float(p)] = Operating(t, int(tp[i]), int(fp[i]), float(precision[i]), float(recall[i]), float(fpr[i + 1]))
    return Calibration(metric, bool(higher_is_positive), n_pos, n_neg, thresholds, tpr, fpr, precision,
                       recall, tp.astype(np.int64), fp.astype(np.int64), auc, tpr_low, targets)


def precision_at_rank(positive_in_rank_order: Sequence[bool | None]) -> np.ndarray:
    """Precision of the top-r of a ranked candidate list for r = 1..R, over its labelled entries.

    ``None`` entries (unlabelled or undecided) are skipped: element r-1 is the fraction of
    positives among the labelled entries in the first r positions (NaN while none is labelled).
    """
    pos = np.array([1.0 if v is True else 0.0 for v in positive_in_rank_order])
    lab = np.array([0.0 if v is None else 1.0 for v in positive_in_rank_order])
    num, den = np.cumsum(pos), np.cumsum(lab)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def calibrate_metrics(metrics: Mapping[str, Sequence[float] | np.ndarray], truth: Sequence[bool | None], *,
                      precisions: Sequence[float] = DEFAULT_PRECISIONS, max_fpr: float = 0.01) -> dict[str, Calibration]:
    """Calibrate every metric that has a value on at least one positive and one negative labelled pair.

    ``truth`` holds the ground truth per pair (None: excluded). Metrics that cannot be
    calibrated (absent, or only one class among their labelled values) are left out.
    """
    known = np.array([t is not None for t in truth], dtype=bool)
    y = np.array([bool(t) for t in truth], dtype=bool)
    out: dict[str, Calibration] = {}
    for name, values in metrics.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != known.shape:
            raise ValueError(f"metric {name} has {v.shape} values for {known.shape} labels")
        sel = known & np.isfinite(v)
        if not y[sel].any() or y[sel].all():
            continue
        out[name] = calibrate(v[sel], y[sel], metric=name, precisions=precisions, max_fpr=max_fpr)
    return out
