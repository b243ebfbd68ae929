"""Image statistics that need no backbone: MS-SSIM diversity and the intensity table (the paper's Table 2).

* **MS-SSIM diversity**: the mean MS-SSIM (MONAI ``MultiScaleSSIMMetric``, 3D) over random pairs of exams of one
  set, per sequence. Lower means more varied exams; the same figure among the real exams is the yardstick (a
  generator that collapses onto a few exams scores far above it). Volumes are put on one voxel shape (linear
  resampling to the first exam's shape when shapes differ) and mapped to [0, 1] by their own 0.5th-99.5th
  percentiles. The kernel is a 7-voxel Gaussian (sigma 1.5), and the number of scales is the largest of 5..1 that
  the volume fits (MONAI's size rule), with the standard weights truncated and renormalised: 11-voxel kernels at 5
  scales need 161 voxels per side, more than a 128-slice exam has.
* **Intensity table**: per sequence, institution and split, the mean over volumes of each volume's 0.5th
  percentile, mean and 99.5th percentile (whole volume), as the paper's Table 2.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import torch

from ..data.study import SEQUENCES, Study

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_settings", "unit_range", "ms_ssim_diversity", "intensity_row",
           "intensity_table"]

#: The standard MS-SSIM scale weights (5 scales).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 7


def ms_ssim_settings(shape: tuple[int, ...]) -> dict:
    """Kernel and scale weights that MONAI's MS-SSIM accepts for volumes of ``shape`` (X, Y, Z)."""
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        div = max(1, n - 1) ** 2  # MONAI's own size rule
        if all(s // div > KERNEL_SIZE - 1 and s / 2 ** (n - 1) >= KERNEL_SIZE for s in shape):
            w = np.asarray(MS_SSIM_WEIGHTS[:n], np.float64)
            return {"kernel_size": KERNEL_SIZE, "kernel_sigma": 1.5, "weights": tuple(float(x) for x in w / w.sum())}
    raise ValueError(f"volumes of shape {tuple(shape)} are too small for MS-SSIM (>= {KERNEL_SIZE} voxels per side)")


def unit_range(array: np.ndarray) -> np.ndarray:
    """A volume mapped to [0, 1] by its 0.5th and 99.5th percentiles (clipped)."""
    array = np.asarray(array, np.float32)
    low, high = np.percentile(array, [0.5, 99.5])
    return np.clip((array - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def _on_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == tuple(shape):
        return array
    from scipy.ndimage import zoom

    return zoom(array, [t / s for t, s in zip(shape, array.shape)], order=1)[tuple(slice(0, t) for t in shape)]


def ms_ssim_diversity(volumes: list[np.ndarray], *, max_pairs: int = 100, seed: int = 0,
                      batch_voxels: int = 2 ** 24) -> dict:
    """Mean MS-SSIM over up to ``max_pairs`` random pairs of distinct volumes (each (X, Y, Z)), computed in batches
    of at most ``batch_voxels`` voxels per side of the comparison.

    Returns:
        ``{"mean", "std", "n_pairs", "n_volumes", "settings"}``; ``mean`` None with fewer than two volumes.
    """
    from monai.metrics import MultiScaleSSIMMetric

    if len(volumes) < 2:
        return {"mean": None, "std": None, "n_pairs": 0, "n_volumes": len(volumes), "settings": None}
    shape = tuple(np.asarray(volumes[0]).shape)
    settings = ms_ssim_settings(shape)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, **settings)
    pairs = [(i, j) for i in range(len(volumes)) for j in range(i + 1, len(volumes))]
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    cache: dict[int, torch.Tensor] = {}

    def tensor(k: int) -> torch.Tensor:
        if k not in cache:
            cache[k] = torch.from_numpy(unit_range(_on_shape(np.asarray(volumes[k], np.float32), shape)))[None, None]
        return cache[k]

    values, batch = [], max(1, batch_voxels // int(np.prod(shape)))  # pairs per call: bounded memory
    for start in range(0, len(pairs), batch):  # batched: one call per chunk of pairs, not per pair
        chunk = pairs[start:start + batch]
        a, b = torch.cat([tensor(i) for i, _ in chunk]), torch.cat([tensor(j) for _, j in chunk])
        values += [float(v) for v in metric(a, b).reshape(len(chunk), -1).mean(dim=1)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n_pairs": len(values),
            "n_volumes": len(volumes), "settings": {**settings, "shape": list(shape)}}


def intensity_row(array: np.ndarray) -> tuple[float, float, float]:
    """(0.5th percentile, mean, 99.5th percentile) of one volume."""
    array = np.asarray(array, np.float64)
    low, high = np.percentile(array, [0.5, 99.5])
    return float(low), float(array.mean()), float(high)


def intensity_table(rows: Iterable[tuple[Study, dict[str, tuple[float, float, float]]]], set_name: str) -> list[dict]:
    """Table 2: one row per (sequence, institution, split) of one set, each figure the mean over its volumes.

    Args:
        rows: per exam, its study and sequence -> :func:`intensity_row`.
    """
    groups: dict[tuple[str, str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for study, stats in rows:
        for name, values in stats.items():
            groups[(name, study.institution or "-", study.split or "-")].append(values)
    table = []
    for (name, institution, split), values in sorted(groups.items(), key=lambda kv: (SEQUENCES.index(kv[0][0]),
                                                                                        kv[0][1], kv[0][2])):
        v = np.asarray(values)
        table.append({"set": set_name, "sequence": name, "institution": institution, "split": split, "n": len(v),
                      "p0_5": float(v[:, 0].mean()), "mean": float(v[:, 1].mean()), "p99_5": float(v[:, 2].mean())})
    return table
