"""Case-level classification metrics on p(csPCa): AUC, AP (scikit-learn) and the threshold metrics at 0.5.

AP is scikit-learn's ``average_precision_score`` (step-wise, no interpolation), as the reference's test script; the
reference's validation used ignite's ``AveragePrecision``, which wraps the same function. With one class only, AUC and
AP are undefined and reported as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["classification_metrics", "auc", "average_precision"]


def _one_class(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) < 2


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (NaN with one class)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, int)
    return math.nan if _one_class(y) else float(roc_auc_score(y, np.asarray(scores, float)))


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Average precision (NaN with one class)."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels, int)
    return math.nan if _one_class(y) else float(average_precision_score(y, np.asarray(scores, float)))


def classification_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """``auc``, ``ap``, ``accuracy``, ``sensitivity``, ``specificity``, ``ppv``, ``npv`` (positive = score >=
    threshold), ``n``, ``n_pos``. Ratios with an empty denominator are NaN."""
    y = np.asarray(labels, int)
    p = np.asarray(scores, float)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {
        "auc": auc(y, p),
        "ap": average_precision(y, p),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "n": float(len(y)),
        "n_pos": float(int(np.sum(y == 1))),
    }
