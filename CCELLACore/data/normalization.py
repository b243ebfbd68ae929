"""Intensity normalisation of preprocessed volumes, its record in each volume's metadata, and its inverse.

AxT2 and HighB: per-volume percentiles ``lower_percentile``..``upper_percentile`` (0..99.5) -> [0, 1] with clipping;
ADC: a fixed window ``adc_window`` (0..3000 x 10^-6 mm^2/s) -> [0, 1] with clipping (the reference's
``create_transforms``). Each output volume records its :class:`Normalization` so :func:`denormalize` inverts it exactly
(up to the clipping); generated volumes, which have no record, get units from :func:`denormalize_array`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import DataError
from .study import SEQUENCES
from .volume import Volume

if TYPE_CHECKING:  # preprocess imports this module
    from .preprocess import PreprocessConfig

__all__ = ["Normalization", "read_normalization", "normalize_volume", "denormalize", "denormalize_array"]

# Metadata keys of the normalisation record (NRRD/MHA keep them; NIfTI keeps only ``descrip``, see below).
_NORM_KEYS = {"sequence": "CCELLA_norm_sequence", "method": "CCELLA_norm_method", "lower": "CCELLA_norm_lower",
              "upper": "CCELLA_norm_upper"}
_NOTES_KEY = "ITK_FileNotes"  # ITK writes it to NIfTI's 80-character descrip field
_NOTES_PREFIX = "CCELLA_norm="


@dataclass(frozen=True)
class Normalization:
    """How a volume was mapped to [0, 1]: ``x = clip((v - lower) / (upper - lower), 0, 1)``.

    Args:
        sequence: ``"AxT2"``, ``"HighB"`` or ``"ADC"``.
        method: ``"percentile"`` (bounds are the volume's own percentiles, arbitrary units) or ``"window"`` (fixed
            bounds; ADC in 10^-6 mm^2/s).
        lower, upper: the intensities mapped to 0 and 1.
    """

    sequence: str
    method: Literal["percentile", "window"]
    lower: float
    upper: float

    def to_metadata(self) -> dict[str, str]:
        """Metadata entries (``repr`` keeps every float64 bit, so the inverse is exact)."""
        notes = f"{_NOTES_PREFIX}{self.sequence};{self.method};{self.lower!r};{self.upper!r}"
        return {
            _NORM_KEYS["sequence"]: self.sequence,
            _NORM_KEYS["method"]: self.method,
            _NORM_KEYS["lower"]: repr(self.lower),
            _NORM_KEYS["upper"]: repr(self.upper),
            _NOTES_KEY: notes[:80],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "method": self.method, "lower": self.lower, "upper": self.upper}


def read_normalization(volume: Volume | dict[str, str]) -> Normalization | None:
    """The :class:`Normalization` recorded in a volume's metadata (NRRD/MHA keys or the NIfTI ``descrip``), or None.

    Takes the volume or its metadata alone (e.g. :func:`~CCELLACore.data.volume.read_metadata`, header only)."""
    meta = volume.metadata if isinstance(volume, Volume) else volume
    if _NORM_KEYS["method"] in meta:
        return Normalization(meta[_NORM_KEYS["sequence"]], meta[_NORM_KEYS["method"]],  # type: ignore[arg-type]
                             float(meta[_NORM_KEYS["lower"]]), float(meta[_NORM_KEYS["upper"]]))
    for key in (_NOTES_KEY, "descrip"):
        notes = meta.get(key, "")
        if notes.startswith(_NOTES_PREFIX):
            parts = notes[len(_NOTES_PREFIX):].split(";")
            if len(parts) == 4:
                return Normalization(parts[0], parts[1], float(parts[2]), float(parts[3]))  # type: ignore[arg-type]
    return None


def normalize_volume(volume: Volume, sequence: str, config: PreprocessConfig, *, source: str = "") -> Volume:
    """Map ``volume`` to [0, 1] the reference's way and record the mapping in its metadata.

    AxT2/HighB: ``lower``/``upper`` = the volume's ``lower_percentile``/``upper_percentile`` (numpy's linear
    percentile over every voxel of the target grid, zero padding included, as MONAI's
    ``ScaleIntensityRangePercentilesd`` on the reference's already-resampled volumes). ADC: the fixed ``adc_window``.

    Args:
        volume: array (X, Y, Z), any real dtype.
        source: file name for error messages.

    Returns:
        float32 volume (X, Y, Z) in [0, 1], metadata holding the :class:`Normalization`.

    Raises:
        DataError: an AxT2/HighB volume has no intensity range (constant).
    """
    values = volume.array.astype(np.float64)
    if sequence == "ADC":
        lower, upper = (float(v) for v in config.adc_window)
        method = "window"
    elif sequence in ("AxT2", "HighB"):
        lower = float(np.percentile(values, config.lower_percentile))
        upper = float(np.percentile(values, config.upper_percentile))
        method = "percentile"
        if not upper > lower:
            raise DataError(source or sequence, f"{sequence} {source}: constant intensities on the target grid, "
                            "cannot normalise (empty field of view?)")
    else:
        raise ValueError(f"sequence must be one of {SEQUENCES}, got {sequence!r}")
    record = Normalization(sequence, method, lower, upper)  # type: ignore[arg-type]
    scaled = np.clip((values - lower) / (upper - lower), 0.0, 1.0).astype(np.float32)
    return Volume(scaled, volume.spacing, volume.origin, volume.direction.copy(), record.to_metadata())


def denormalize(volume: Volume) -> Volume:
    """Invert :func:`normalize_volume` using the record in ``volume.metadata``: ``v = x * (upper - lower) + lower``.

    Returns:
        float32 volume (X, Y, Z) in the input's units (ADC: 10^-6 mm^2/s; AxT2/HighB: the scanner's arbitrary
        units); values that were clipped come back as the clip bounds.

    Raises:
        ValueError: the volume carries no normalisation record.
    """
    record = read_normalization(volume)
    if record is None:
        raise ValueError("volume carries no CCELLA normalisation record (was it written with normalize=false?)")
    values = volume.array.astype(np.float64) * (record.upper - record.lower) + record.lower
    # Drop the record (NRRD/MHA keys, or NIfTI's descrip read back as both ITK_FileNotes and descrip).
    meta = {k: v for k, v in volume.metadata.items()
            if k not in _NORM_KEYS.values() and not str(v).startswith(_NOTES_PREFIX)}
    return Volume(values.astype(np.float32), volume.spacing, volume.origin, volume.direction.copy(), meta)


def denormalize_array(
    array: np.ndarray,
    sequence: str,
    reference_intensity: float | None = None,
    *,
    adc_window: tuple[float, float] = (0.0, 3000.0),
) -> np.ndarray:
    """Units for a generated volume (no per-volume record exists): docs/data.md, "Geometry and units".

    Args:
        array: normalised values, any shape, e.g. (X, Y, Z).
        sequence: ``"ADC"`` -> ``lower + x * (upper - lower)`` of ``adc_window`` (x * 3000, 10^-6 mm^2/s);
            ``"AxT2"``/``"HighB"`` -> ``x * reference_intensity`` (arbitrary units; the model stores the training
            set's mean 99.5th percentile).
        reference_intensity: required for AxT2/HighB.

    Returns:
        float32 array of the same shape.
    """
    x = np.asarray(array, dtype=np.float64)
    if sequence == "ADC":
        low, high = adc_window
        return (x * (high - low) + low).astype(np.float32)
    if sequence in ("AxT2", "HighB"):
        if reference_intensity is None or not reference_intensity > 0:
            raise ValueError(f"{sequence} needs a positive reference_intensity, got {reference_intensity!r}")
        return (x * float(reference_intensity)).astype(np.float32)
    raise ValueError(f"sequence must be one of {SEQUENCES}, got {sequence!r}")
