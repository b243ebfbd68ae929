"""DeLong (fast, Sun & Xu 2014) and the paired bootstrap against hand-computed values and brute-force formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from CCELLACore.study.stats import delong_test, fast_delong, paired_bootstrap_ap, weighted_average_precision


def _brute_delong(y, scores):
    """DeLong (1988) by its definition: psi(x, y) = 1, 1/2, 0 over all positive-negative pairs."""
    y = np.asarray(y)
    k = len(scores)
    v10, v01, aucs = [], [], []
    for s in scores:
        s = np.asarray(s, float)
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = len(v10[0]), len(v01[0])
    s10 = np.array([[np.sum((v10[i] - v10[i].mean()) * (v10[j] - v10[j].mean())) / (m - 1) for j in range(k)]
                    for i in range(k)])
    s01 = np.array([[np.sum((v01[i] - v01[i].mean()) * (v01[j] - v01[j].mean())) / (n - 1) for j in range(k)]
                    for i in range(k)])
    return np.array(aucs), s10 / m + s01 / n


def test_delong_hand_computed_case():
    # Positives 0.9, 0.4; negatives 0.6, 0.1. V10 = (1, 1/2), V01 = (1/2, 1): AUC 3/4,
    # var = var(V10)/2 + var(V01)/2 = 0.125/2 + 0.125/2 = 0.125.
    auc, cov = fast_delong([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert auc[0] == pytest.approx(0.75) and cov[0, 0] == pytest.approx(0.125)
    # Classifier b ranks both positives first (AUC 1, V10 = V01 = 1: no variance): the difference 1/4 has
    # variance var(a) = 0.125, z = 0.25 / sqrt(0.125) = 0.7071, p = 2 (1 - Phi(0.7071)) = 0.4795.
    result = delong_test([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], [0.9, 0.8, 0.2, 0.1])
    assert result.difference == pytest.approx(-0.25)
    assert result.standard_error == pytest.approx(math.sqrt(0.125))
    assert result.p_value == pytest.approx(0.4795, abs=1e-4)


def test_fast_delong_matches_the_definition_with_ties():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(13, int), np.zeros(17, int)]
    scores = np.round(rng.normal(size=(3, 30)) + 0.8 * y * np.array([[1.0], [0.5], [0.0]]), 1)  # ties
    auc, cov = fast_delong(y, scores)
    ref_auc, ref_cov = _brute_delong(y, scores)
    np.testing.assert_allclose(auc, ref_auc, atol=1e-12)
    np.testing.assert_allclose(auc, [roc_auc_score(y, s) for s in scores], atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    # Trials: the mean-AUC contrast's variance is L S L^T of the brute-force covariance.
    result = delong_test(y, scores[:2], scores[2:])
    contrast = np.array([0.5, 0.5, -1.0])
    assert result.difference == pytest.approx(contrast @ ref_auc)
    assert result.standard_error == pytest.approx(math.sqrt(contrast @ ref_cov @ contrast))
    same = delong_test(y, scores[0], scores[0])
    assert same.difference == 0 and same.p_value == 1.0


def test_weighted_ap_equals_sklearn_on_the_resampled_cases():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 40)
    y[:2] = (0, 1)
    s = np.round(rng.random(40), 1)  # ties
    assert weighted_average_precision(y, s, np.ones(40))[0] == pytest.approx(average_precision_score(y, s))
    weights = rng.integers(0, 3, size=(5, 40)).astype(float)
    weights[:, :2] = 1
    got = weighted_average_precision(y, s, weights)
    for w, value in zip(weights, got):
        idx = np.repeat(np.arange(40), w.astype(int))
        assert value == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-12)


def test_paired_bootstrap_ap():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20, int), np.zeros(40, int)]
    good = y + rng.normal(0, 0.5, 60)
    poor = rng.normal(0, 1.0, 60)
    result = paired_bootstrap_ap(y, good, poor, n_bootstrap=500, seed=1)
    assert result.difference == pytest.approx(average_precision_score(y, good) - average_precision_score(y, poor))
    assert result.p_value == pytest.approx(2 / 501) and result.ci_low > 0  # no replicate at or below 0
    assert paired_bootstrap_ap(y, good, good, n_bootstrap=200).p_value == 1.0
    again = paired_bootstrap_ap(y, [good, good], [poor, poor], n_bootstrap=500, seed=1)
    assert again.difference == pytest.approx(result.difference) and again.p_value == result.p_value
    close = paired_bootstrap_ap(y, good, good + rng.normal(0, 0.05, 60), n_bootstrap=500, seed=1)
    assert close.p_value > 0.05
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_ap(np.ones(5, int), np.ones(5), np.ones(5))
