"""FID, KID and their bootstrap confidence intervals on feature matrices (one row per exam or slice).

* **FID** = ||mu_r - mu_s||^2 + tr(S_r + S_s - 2 (S_r S_s)^(1/2)), MONAI's ``FIDMetric`` value computed through a
  symmetric eigen-decomposition (:func:`fid` says why). With fewer samples
  than feature dimensions (100 exams, 2048 features) both covariances live in the span of the samples, so the
  features are first rotated onto an orthonormal basis of that span: FID is invariant to rotations, the result is
  exact, and the matrix square root is taken on an (n_r + n_s)-sized matrix instead of a 2048-sized one.
* **KID** = the unbiased estimate of MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  ``subsets`` random subsets of ``subset_size`` rows of each set (without replacement within a subset).
* **Bootstrap**: exams of each set are resampled with replacement (the slices of a 2.5D exam stay together) and
  the metric recomputed. A resample holds fewer distinct exams, which biases FID upwards, so the interval takes its
  width from the bootstrap percentiles and its location from the estimate: [est - (median - q_lo),
  est + (q_hi - median)] (FID's clipped at 0), the bootstrap percentile interval re-centred on the estimate.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["fid", "kid", "bootstrap_interval", "metric_with_interval"]


def _rows(features: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(features, np.ndarray):
        return np.asarray(features, np.float64)
    return np.concatenate([np.asarray(f, np.float64) for f in features]) if len(features) else np.zeros((0, 1))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def fid(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FID between two (n, d) feature matrices, each n >= 2 (the value of MONAI's ``FIDMetric``, computed stably).

    ``tr((S_r S_s)^(1/2))`` is taken as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    ``S_r^(1/2) S_s S_r^(1/2)`` (same eigenvalues): MONAI's ``FIDMetric`` takes SciPy's ``sqrtm`` of the
    non-symmetric product, which returns complex noise and raises ("Imaginary component ... too high") when both
    covariances are rank-deficient, as they are for 40 exams."""
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    if len(real) < 2 or len(synthetic) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} real and {len(synthetic)} synthetic")
    if len(real) + len(synthetic) < real.shape[1]:
        basis, _ = np.linalg.qr(np.concatenate([real, synthetic]).T)  # (d, r): the samples' span, exact for FID
        real, synthetic = real @ basis, synthetic @ basis
    cov_r = np.atleast_2d(np.cov(real, rowvar=False))
    cov_s = np.atleast_2d(np.cov(synthetic, rowvar=False))
    root = _sqrt_psd(cov_r)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_s @ root), 0.0, None)).sum()
    diff = real.mean(axis=0) - synthetic.mean(axis=0)
    return max(float(diff @ diff + np.trace(cov_r) + np.trace(cov_s) - 2.0 * cross), 0.0)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: np.ndarray, synthetic: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
    """Kernel Inception Distance between two (n, d) feature matrices.

    MONAI's ``MMDMetric`` is not used: it computes MMD with a linear kernel on its inputs, and the cubic polynomial
    kernel of KID has no feature map small enough to pass through its ``y_mapping``.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    size = min(subset_size, len(real), len(synthetic))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(synthetic)} synthetic")
    if size == len(real) == len(synthetic):
        return _polynomial_mmd2(real, synthetic)  # every subset would be the whole set
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd2(real[rng.choice(len(real), size, replace=False)],
                               synthetic[rng.choice(len(synthetic), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values))


def bootstrap_interval(estimate: float, samples: Sequence[float], level: float = 0.95,
                       floor: float | None = None) -> tuple[float, float]:
    """The bootstrap percentile interval re-centred on ``estimate`` (see the module docstring), its lower end
    clipped at ``floor`` (0 for FID; None for KID, whose unbiased estimate may be negative)."""
    samples = np.asarray([s for s in samples if np.isfinite(s)], np.float64)
    if not len(samples):
        return float("nan"), float("nan")
    low, median, high = np.percentile(samples, [50 * (1 - level), 50, 50 * (1 + level)])
    lower = estimate - (median - low)
    return (lower if floor is None else max(floor, lower)), estimate + (high - median)


def metric_with_interval(metric: Callable[[np.ndarray, np.ndarray], float], real: Sequence[np.ndarray],
                         synthetic: Sequence[np.ndarray], *, n_bootstrap: int = 100, seed: int = 0,
                         level: float = 0.95, floor: float | None = None) -> dict:
    """``metric`` on all rows and its bootstrap interval over exams.

    Args:
        real, synthetic: one (k_i, d) feature matrix per exam (k_i = 1 for 3D features, slices for 2.5D).

    Returns:
        ``{"value", "ci_low", "ci_high", "level", "n_bootstrap", "n_real", "n_synthetic", "rows_real",
        "rows_synthetic"}`` (exams and feature rows).
    """
    real, synthetic = [np.asarray(r) for r in real if len(r)], [np.asarray(s) for s in synthetic if len(s)]
    value = metric(_rows(real), _rows(synthetic))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        r = [real[i] for i in rng.integers(0, len(real), len(real))]
        s = [synthetic[i] for i in rng.integers(0, len(synthetic), len(synthetic))]
        try:
            samples.append(metric(_rows(r), _rows(s)))
        except (ValueError, np.linalg.LinAlgError):  # a resample with too few distinct rows
            continue
    low, high = bootstrap_interval(value, samples, level, floor) if samples else (float("nan"), float("nan"))
    return {"value": value, "ci_low": low, "ci_high": high, "level": level, "n_bootstrap": len(samples),
            "n_real": len(real), "n_synthetic": len(synthetic), "rows_real": int(sum(len(r) for r in real)),
            "rows_synthetic": int(sum(len(s) for s in synthetic))}
