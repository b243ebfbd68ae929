"""Paired comparisons of classifiers scored on one test set: DeLong's test for AUC and a paired bootstrap for AP.

- :func:`fast_delong`: the AUCs of k classifiers on the same cases and their covariance matrix, with the fast
  algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)): midranks (``scipy.stats.rankdata``) instead of
  DeLong's O(m n) comparisons. Ties count one half.
- :func:`delong_test`: two strategies, each with T trials (T classifiers) scored on the same cases; the statistic is
  the difference of their mean AUCs over trials, a linear contrast of the 2T correlated AUCs, with variance
  ``L S L^T`` from DeLong's covariance; two-sided normal p-value. With T = 1 it is the classic paired DeLong test.
- :func:`paired_bootstrap_ap`: the same contrast for average precision. Each bootstrap replicate resamples the test
  cases with replacement within each class (so both classes stay present and AP stays defined), the same replicate
  for every classifier (paired); AP is scikit-learn's step-wise definition, computed for all replicates at once with
  case weights (:func:`weighted_average_precision`). Two-sided p-value ``min(1, 2 min(P(d* <= 0), P(d* >= 0)))``
  with the ``(count + 1) / (B + 1)`` correction, so it is never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["fast_delong", "delong_test", "weighted_average_precision", "paired_bootstrap_ap", "Comparison"]


@dataclass(frozen=True)
class Comparison:
    """Strategy a minus strategy b: ``difference`` (of mean metrics over trials), its standard error, the
    two-sided ``p_value`` and a 95 % interval (normal for DeLong, percentile for the bootstrap)."""

    difference: float
    standard_error: float
    p_value: float
    ci_low: float
    ci_high: float


def _split(labels: Sequence[int], scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, int)
    s = np.atleast_2d(np.asarray(scores, float))
    if s.shape[1] != len(y):
        raise ValueError(f"scores have {s.shape[1]} cases, labels {len(y)}")
    if not set(np.unique(y)) <= {0, 1} or len(np.unique(y)) < 2:
        raise ValueError("labels must be 0/1 with both classes present")
    return y, s


def fast_delong(labels: Sequence[int], scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance.

    Args:
        labels: (N,) 0/1, both classes present.
        scores: (K, N) or (N,): K classifiers' scores of the same N cases (higher = more likely positive).

    Returns:
        ``(auc (K,), covariance (K, K))``.
    """
    from scipy.stats import rankdata

    y, s = _split(labels, scores)
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)  # midranks within the positives
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v_pos = (tz[:, :m] - tx) / n  # per positive: fraction of negatives it outranks (DeLong's V10)
    v_neg = 1.0 - (tz[:, m:] - ty) / m  # per negative: fraction of positives outranking it (V01)
    s_pos = np.atleast_2d(np.cov(v_pos)) if m > 1 else np.zeros((len(s), len(s)))
    s_neg = np.atleast_2d(np.cov(v_neg)) if n > 1 else np.zeros((len(s), len(s)))
    return auc, s_pos / m + s_neg / n


def _normal_p(z: float) -> float:
    from scipy.stats import norm

    return float(2.0 * norm.sf(abs(z)))


def delong_test(labels: Sequence[int], scores_a, scores_b) -> Comparison:
    """DeLong test of mean AUC over trials, strategy a minus b.

    Args:
        labels: (N,) test labels.
        scores_a, scores_b: (T, N) or (N,): each strategy's scores of the same cases, one row per trial (paired by
            case; the trials need not be paired with each other).
    """
    a = np.atleast_2d(np.asarray(scores_a, float))
    b = np.atleast_2d(np.asarray(scores_b, float))
    auc, cov = fast_delong(labels, np.concatenate([a, b]))
    contrast = np.concatenate([np.full(len(a), 1.0 / len(a)), np.full(len(b), -1.0 / len(b))])
    diff = float(contrast @ auc)
    var = float(contrast @ cov @ contrast)
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-12:  # identical rankings: no evidence of a difference
        p = 1.0 if abs(diff) <= 1e-12 else 0.0
    else:
        p = _normal_p(diff / se)
    return Comparison(diff, se, p, diff - 1.959964 * se, diff + 1.959964 * se)


def weighted_average_precision(labels: Sequence[int], scores: Sequence[float], weights) -> np.ndarray:
    """scikit-learn's average precision with case weights, for many weight vectors at once.

    Args:
        labels, scores: (N,) one classifier's test cases.
        weights: (B, N) or (N,) non-negative case weights (a bootstrap replicate = how often each case was drawn).

    Returns:
        (B,) AP per weight vector: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, descending.
    """
    y = np.asarray(labels, float)
    s = np.asarray(scores, float)
    w = np.atleast_2d(np.asarray(weights, float))
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last case of each run of tied scores
    tp = np.cumsum(w * y, axis=1)[:, last]
    fp = np.cumsum(w * (1.0 - y), axis=1)[:, last]
    total = tp + fp
    precision = np.divide(tp, total, out=np.zeros_like(tp), where=total > 0)
    recall = tp / tp[:, -1:]
    steps = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    return (steps * precision).sum(axis=1)


def paired_bootstrap_ap(labels: Sequence[int], scores_a, scores_b, n_bootstrap: int = 2000,
                        seed: int = 0) -> Comparison:
    """Paired, class-stratified bootstrap of mean AP over trials, strategy a minus b (see the module docstring).

    Args:
        labels: (N,) test labels.
        scores_a, scores_b: (T, N) or (N,) as :func:`delong_test`.
        n_bootstrap: replicates (B).
        seed: the replicates' generator seed (same seed, same p-value).
    """
    y, a = _split(labels, scores_a)
    _, b = _split(labels, scores_b)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng([int(seed), 2014])
    weights = np.zeros((n_bootstrap, len(y)))
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        draws = rng.integers(0, len(idx), size=(n_bootstrap, len(idx)))
        for r in range(n_bootstrap):  # counts per case, B x |class| draws
            weights[r, idx] = np.bincount(draws[r], minlength=len(idx))
    ones = np.ones((1, len(y)))

    def mean_ap(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.mean([weighted_average_precision(y, row, w) for row in rows], axis=0)

    diff = float(mean_ap(a, ones)[0] - mean_ap(b, ones)[0])
    boot = mean_ap(a, weights) - mean_ap(b, weights)
    below = (np.sum(boot <= 0) + 1) / (n_bootstrap + 1)
    above = (np.sum(boot >= 0) + 1) / (n_bootstrap + 1)
    p = float(min(1.0, 2.0 * min(below, above)))
    if np.all(boot == 0) and diff == 0:
        p = 1.0
    low, high = np.percentile(boot, [2.5, 97.5])
    return Comparison(diff, float(np.std(boot, ddof=1)) if n_bootstrap > 1 else 0.0, p, float(low), float(high))
