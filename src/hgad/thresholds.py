"""Decision maths: a threshold for a target false-positive rate, and what a threshold does on labelled scores.

Pure functions on arrays, kept apart from models and files so that each rule can be checked against
values computed by hand. The decision rule everywhere in hgad is ``score > threshold`` = anomalous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["threshold_for_fpr", "DecisionCounts", "decision_counts", "decision_metrics", "DECISION_METRICS",
           "lower_limit"]

# keys of :func:`decision_metrics`, in the order the reports show them
DECISION_METRICS: tuple[str, ...] = ("thr_f1", "thr_recall", "thr_fpr", "thr_precision")


def _finite(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite")
    return arr


def threshold_for_fpr(normal_scores: Any, target_fpr: float) -> float:
    """The lowest observed normal score ``t`` with ``#{s > t} / n <= target_fpr``.

    Among the thresholds that keep the false-positive rate on these normal images within the target,
    this one flags the most images (it catches the most defects). With ``n`` images the rate moves in
    steps of ``1 / n``: below ``1 / n`` the result is the highest normal score.
    """
    s = np.sort(_finite(normal_scores, "normal scores"))[::-1]
    if len(s) == 0:
        raise ValueError("no normal scores to calibrate on")
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    allowed = math.floor(target_fpr * len(s) + 1e-9)  # images that may score above the threshold
    return float(s[allowed])


@dataclass(frozen=True)
class DecisionCounts:
    """Confusion counts of ``score > threshold`` against labels (1 = defective)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        """Flagged images that are defective; nan when nothing is flagged."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        """Defects caught; nan without defective images."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def fpr(self) -> float:
        """Normal images flagged; nan without normal images."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan

    @property
    def f1(self) -> float:
        """``2 TP / (2 TP + FP + FN)``: 0 when no defect is caught, nan when there is nothing to catch or flag."""
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else math.nan


def decision_counts(scores: Any, labels: Any, thresholds: Any) -> DecisionCounts:
    """Counts of ``scores > thresholds`` (one threshold, or one per image) against 0/1 ``labels``."""
    s = _finite(scores, "scores")
    t = np.broadcast_to(_finite(thresholds, "thresholds"), s.shape) if np.ndim(thresholds) else \
        np.full(s.shape, _finite([thresholds], "threshold")[0])
    y = np.asarray(labels).ravel().astype(bool)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels for {len(s)} scores")
    flagged = s > t
    return DecisionCounts(tp=int((flagged & y).sum()), fp=int((flagged & ~y).sum()),
                          tn=int((~flagged & ~y).sum()), fn=int((~flagged & y).sum()))


def decision_metrics(scores: Any, labels: Any, thresholds: Any) -> dict[str, float]:
    """Recall (defects caught), false-positive rate, precision and F1 of the deployed decision."""
    c = decision_counts(scores, labels, thresholds)
    return {"thr_recall": c.recall, "thr_fpr": c.fpr, "thr_precision": c.precision, "thr_f1": c.f1}


def lower_limit(values: Any, margin: float) -> float:
    """``min - margin * (median - min)`` of values seen on in-distribution images.

    A value below it is further under the lowest in-distribution value than ``margin`` times the gap
    between that lowest value and the typical one: the scale comes from the data, so one rule fits
    log-likelihoods and posterior probabilities alike.
    """
    v = _finite(values, "values")
    if len(v) == 0:
        raise ValueError("no values")
    lo, mid = float(v.min()), float(np.median(v))
    return lo - margin * (mid - lo)
