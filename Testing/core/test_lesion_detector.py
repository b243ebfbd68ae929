"""The fixed lesion detector on exams whose truth is known by construction."""

from __future__ import annotations

import numpy as np

from CCELLACore.data import Exam, Volume
from CCELLACore.metrics.lesion_detector import DetectorThresholds, detect_lesions


def _exam(lesions):
    """Gland ellipsoid at the grid centre (2 mm voxels); each lesion = (centre ijk, radius mm, adc, highb)."""
    shape, spacing = (40, 40, 20), (2.0, 2.0, 2.0)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    mm = ijk * spacing
    centre = (np.array(shape) - 1) / 2 * spacing
    gland = (((mm - centre) / (25.0, 20.0, 15.0)) ** 2).sum(-1) <= 1
    adc = np.where(gland, 1500.0, 2800.0)
    highb = np.where(gland, 20.0, 5.0)
    for c, radius, a, h in lesions:
        ball = np.linalg.norm(mm - np.array(c) * spacing, axis=-1) <= radius
        adc[ball], highb[ball] = a, h
    vols = {
        "HighB": Volume(highb.astype(np.float32), spacing),
        "ADC": Volume(adc.astype(np.float32), spacing),
    }
    return Exam(vols), gland


def test_finds_restricted_lesion_and_its_side():
    # LPS +x is patient left: a lesion at larger i (x) than the gland centre is on the left.
    exam, gland = _exam([((26, 20, 10), 5.0, 700.0, 60.0)])
    detection = detect_lesions(exam, gland)
    assert len(detection.lesions) == 1
    lesion = detection.largest
    assert lesion.side == "left"
    assert 400 < lesion.volume_mm3 < 700  # a 5 mm-radius ball is 524 mm^3
    assert abs(lesion.mean_adc - 700) < 1 and lesion.highb_ratio > 2.5
    exam, gland = _exam([((13, 20, 10), 5.0, 700.0, 60.0)])
    assert detect_lesions(exam, gland).largest.side == "right"


def test_ignores_shine_through_normal_and_tiny_regions():
    exam, gland = _exam([])
    assert not detect_lesions(exam, gland).found
    # bright on HighB but normal ADC: T2 shine-through, not restriction
    exam, gland = _exam([((26, 20, 10), 5.0, 1450.0, 60.0)])
    assert not detect_lesions(exam, gland).found
    # dark ADC but not bright on HighB
    exam, gland = _exam([((26, 20, 10), 5.0, 700.0, 21.0)])
    assert not detect_lesions(exam, gland).found
    # restricted but a single voxel (8 mm^3) is below the minimum volume
    exam, gland = _exam([((26, 20, 10), 0.5, 700.0, 60.0)])
    assert not detect_lesions(exam, gland).found
    assert DetectorThresholds().min_volume_mm3 == 65.0


def test_outside_gland_is_ignored_and_two_lesions_counted():
    exam, gland = _exam([((2, 2, 2), 4.0, 600.0, 80.0)])
    assert not detect_lesions(exam, gland).found
    exam, gland = _exam([((26, 20, 10), 5.0, 700.0, 60.0), ((13, 18, 10), 4.0, 650.0, 70.0)])
    detection = detect_lesions(exam, gland)
    assert [lesion.side for lesion in detection.lesions] == ["left", "right"]
