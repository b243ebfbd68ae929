"""Pictures people would rather look at than read: a PNG montage of an exam's axial slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.study import SEQUENCES, Exam
from .fileio import atomic_path

__all__ = ["exam_montage", "write_montage"]


def _window(array: np.ndarray, sequence: str) -> np.ndarray:
    """Map a slice stack to [0, 1] for display: ADC on a fixed 0-3000 window, others on 1st-99.5th percentile."""
    if sequence == "ADC":
        low, high = 0.0, 3000.0
    else:
        low, high = np.percentile(array, [1.0, 99.5]) if array.size else (0.0, 1.0)
    return np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)


def exam_montage(exam: Exam, n_slices: int = 5, sequences: tuple[str, ...] = SEQUENCES) -> np.ndarray:
    """Rows = sequences, columns = ``n_slices`` evenly spaced axial slices; returns a uint8 (H, W) image.

    Slices are shown in radiological convention (patient left on the image right, anterior up): our arrays are LPS
    (x increases to patient left, y to posterior), so x runs left-to-right and y top-to-bottom unflipped.
    """
    rows = []
    for name in sequences:
        if name not in exam.volumes:
            continue
        array = np.asarray(exam.volumes[name].array, np.float32)
        z = np.linspace(0, array.shape[2] - 1, n_slices + 2)[1:-1].round().astype(int)
        tiles = [_window(array[:, :, k].T, name) for k in z]  # (y, x): rows are y (anterior at top)
        rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise ValueError("exam has none of the sequences to show")
    image = np.concatenate(rows, axis=0)
    return (image * 255).round().astype(np.uint8)


def write_montage(exam: Exam, path: str | Path, n_slices: int = 5, scale: int = 2) -> Path:
    """Write :func:`exam_montage` as a PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    import imageio.v3 as iio

    image = exam_montage(exam, n_slices)
    if scale > 1:
        image = np.kron(image, np.ones((scale, scale), np.uint8))
    with atomic_path(path, suffix=".png") as tmp:
        iio.imwrite(tmp, image)
    return Path(path)
