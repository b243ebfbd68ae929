"""Put a study's AxT2, HighB, ADC and masks on one fixed grid around the gland, and normalise their intensities.

Steps (per study):

1. **Target grid**: ``config.grid.size`` voxels at ``config.grid.spacing`` mm, with the AxT2 direction matrix, centred
   on the gland mask's centroid in world (LPS) coordinates when ``center="gland"`` and a non-empty gland mask is
   given, else on the physical centre of the AxT2 volume.
2. **One resampling** of every sequence and mask onto that grid (images ``"linear"`` or clipped ``"bspline"``, masks
   nearest neighbour; 0 outside each input's field of view). Resampling to AxT2, to the spacing and the crop/pad are
   one interpolation, not three.
3. **Intensity normalisation** as the reference (``diff_model_create_training_data_multi.create_transforms``): AxT2 and
   HighB per-volume percentiles ``lower_percentile``..``upper_percentile`` (0..99.5) -> [0, 1] with clipping; ADC a
   fixed window ``adc_window`` (0..3000 x 10^-6 mm^2/s) -> [0, 1] with clipping. Each output volume records its
   :class:`Normalization` so :func:`denormalize` inverts it exactly (up to the clipping).

Relation to ``picai_prep`` (2.1.13, ``preprocessing.Sample`` / ``PreprocessingSettings``): we *match* its behaviour
instead of calling it. Its ``preprocess()`` resamples each scan to the spacing on its own grid, centre-crops or pads
in voxel space (start index ``floor((n - size) / 2)``, constant 0), then resamples every scan to the first (T2) and
copies the T2's physical metadata onto the others. Our grid has the same size, spacing, T2 direction and zero
padding, and with ``center="volume"`` the same centre up to half an output voxel (picai_prep keeps the input origin
when it changes spacing, which shifts its centre slightly; ours is the exact physical centre). We do not call it
because (a) it interpolates scans twice (spacing, then onto T2), blurring HighB/ADC more than one resampling does;
(b) it can only centre-crop, while we centre on the gland (its ``align_segmentation`` raises NotImplementedError);
(c) its B-spline scan interpolation overshoots (negative ADC) and it validates with ``assert``. A test checks our
``center="volume"`` grid against picai_prep's output geometry.

Example:
    >>> config = PreprocessConfig(grid=GridConfig((32, 32, 16), (4.0, 4.0, 4.0)))  # doctest: +SKIP
    >>> new_study = preprocess_study(study, config, "out/cases/case1")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError
from .normalization import Normalization, denormalize, denormalize_array, normalize_volume, read_normalization
from .study import MASKS, SEQUENCES, Exam, Study, read_case_volume
from .volume import Volume, make_grid, resample_to_grid, write_volume

__all__ = [
    "GridConfig",
    "PreprocessConfig",
    "Normalization",
    "OUTPUT_FILES",
    "target_grid",
    "gland_centroid",
    "normalize_volume",
    "denormalize",
    "denormalize_array",
    "read_normalization",
    "preprocess_exam",
    "preprocess_study",
    "config_hash",
    "case_folder_name",
]

logger = logging.getLogger("CCELLACore")

#: Bump when the output of preprocessing changes for the same config (invalidates resumed cases).
PREPROCESS_VERSION = 1

#: Output file name per sequence / mask inside ``<out>/cases/<case_id>/``.
OUTPUT_FILES: dict[str, str] = {
    "AxT2": "axt2.nii.gz",
    "HighB": "highb.nii.gz",
    "ADC": "adc.nii.gz",
    "gland": "gland.nii.gz",
    "lesion": "lesion.nii.gz",
}
DONE_FILE = "done.json"



# --- configuration -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridConfig:
    """The output grid: ``size`` voxels (X, Y, Z) at ``spacing`` mm (i, j, k). Defaults = the paper's LDM grid."""

    size: tuple[int, int, int] = (256, 256, 128)
    spacing: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(int(n) != n or n < 1 for n in self.size):
            raise ValueError(f"grid size must be 3 positive integers, got {self.size}")
        if len(self.spacing) != 3 or any(not s > 0 for s in self.spacing):
            raise ValueError(f"grid spacing must be 3 positive numbers (mm), got {self.spacing}")

    @property
    def field_of_view(self) -> tuple[float, float, float]:
        """Extent in mm along each axis."""
        return tuple(n * s for n, s in zip(self.size, self.spacing))  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """How one target (LDM or classifier) wants its volumes. Defaults = the paper's LDM preprocessing.

    Args:
        grid: output size and spacing.
        normalize: apply the reference's intensity normalisation (the classifier does its own clip + z-score).
        center: ``"gland"`` = centre on the gland mask's centroid when the study has one (else the AxT2 centre);
            ``"volume"`` = always the AxT2 volume's physical centre (picai_prep's centre crop).
        upper_percentile, lower_percentile: AxT2/HighB percentile window mapped to [0, 1] (reference: 0 and 99.5).
        adc_window: ADC values (10^-6 mm^2/s) mapped to [0, 1] (reference: 0 to 3000).
        interpolation: images ``"linear"`` or ``"bspline"`` (clipped to the input range); masks always nearest.
    """

    grid: GridConfig = field(default_factory=GridConfig)
    normalize: bool = True
    center: Literal["gland", "volume"] = "gland"
    upper_percentile: float = 99.5
    lower_percentile: float = 0.0
    adc_window: tuple[float, float] = (0.0, 3000.0)
    interpolation: Literal["linear", "bspline"] = "linear"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {self.lower_percentile}, {self.upper_percentile}"
            )
        if len(self.adc_window) != 2 or not self.adc_window[0] < self.adc_window[1]:
            raise ValueError(f"adc_window must be (low, high) with low < high, got {self.adc_window}")
        if self.center not in ("gland", "volume"):
            raise ValueError(f"center must be 'gland' or 'volume', got {self.center!r}")
        if self.interpolation not in ("linear", "bspline"):
            raise ValueError(f"interpolation must be 'linear' or 'bspline', got {self.interpolation!r}")


def config_hash(config: PreprocessConfig) -> str:
    """A short stable hash of the config (and of :data:`PREPROCESS_VERSION`): a changed value changes it."""
    from ..config import to_dict

    text = json.dumps({"version": PREPROCESS_VERSION, "config": to_dict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- geometry ----------------------------------------------------------------------------------------------------
def gland_centroid(mask: Volume) -> np.ndarray | None:
    """World (LPS mm) centroid of ``mask > 0``, or None when the mask is empty."""
    index = np.argwhere(mask.array > 0)
    if len(index) == 0:
        return None
    return (mask.affine_lps @ np.append(index.mean(axis=0), 1.0))[:3]


def target_grid(axt2: Volume, grid: GridConfig, center_lps: np.ndarray | None = None) -> Volume:
    """The output grid (all zeros, float32 (X, Y, Z) = ``grid.size``): AxT2 direction, ``grid.spacing``, centred on
    ``center_lps`` or, when None, on the AxT2 volume's physical centre."""
    if center_lps is None:
        center_lps = (axt2.affine_lps @ np.append((np.asarray(axt2.shape, float) - 1) / 2, 1.0))[:3]
    return make_grid(grid.size, grid.spacing, center_lps, axt2.direction)


def _bounds(vol: Volume) -> np.ndarray:
    """(2, 3) world bounding box of the voxel *edges* (half a voxel beyond the centres)."""
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, vol.shape[0] - 0.5) for j in (-0.5, vol.shape[1] - 0.5)
                        for k in (-0.5, vol.shape[2] - 0.5)])
    world = (vol.affine_lps @ corners.T).T[:, :3]
    return np.stack([world.min(0), world.max(0)])


def _overlaps(a: Volume, b: Volume) -> bool:
    box_a, box_b = _bounds(a), _bounds(b)
    return bool(np.all(box_a[1] > box_b[0]) and np.all(box_b[1] > box_a[0]))


def _as_label_map(volume: Volume) -> Volume:
    """Masks as small unsigned integers (uint8, or uint16 beyond 255 labels)."""
    labels = np.rint(volume.array).astype(np.int64)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    return Volume(np.clip(labels, 0, None).astype(dtype), volume.spacing, volume.origin, volume.direction.copy(), {})


#: Voxel sizes (mm, per axis) an MR volume can have; anything else is a unit mix-up or a broken header.
PLAUSIBLE_SPACING_MM = (0.01, 50.0)


def preprocess_exam(
    exam: Exam,
    config: PreprocessConfig,
    *,
    files: dict[str, Path] | None = None,
) -> tuple[Exam, dict[str, Any]]:
    """Resample every volume and mask of ``exam`` onto the target grid in one interpolation, then normalise.

    Args:
        exam: ``volumes`` (AxT2 required; HighB/ADC optional), ``masks`` (``gland`` label map: > 0 = gland; ``lesion``),
            each (X, Y, Z) on its own grid.
        files: input file per name, only to name them in errors.

    Returns:
        The new exam (every volume (X, Y, Z) = ``config.grid.size``, one grid; images float32, masks uint8) and an
        info dict: ``center`` (``"gland"`` or ``"volume"``), ``center_lps``, ``normalization`` per sequence.

    Raises:
        DataError: naming the case and file: no physical overlap with AxT2, empty gland mask, constant image,
            implausible voxel spacing (outside :data:`PLAUSIBLE_SPACING_MM`).
    """
    files = files or {}
    case = exam.case_id or "<exam>"
    if "AxT2" not in exam.volumes:
        raise DataError(case, "no AxT2 image")
    axt2 = exam.volumes["AxT2"]

    def name(key: str) -> str:
        return str(files.get(key, key))

    # Inputs that miss AxT2 altogether would resample to an all-zero volume: refuse them, naming the file.
    for key, vol in (*exam.volumes.items(), *exam.masks.items()):
        low, high = PLAUSIBLE_SPACING_MM
        if not all(low <= s <= high for s in vol.spacing):
            raise DataError(case, f"{name(key)}: voxel spacing {tuple(round(s, 6) for s in vol.spacing)} mm is "
                            f"outside {low}-{high} mm (a header in metres or micrometres, or corrupt)")
        if key != "AxT2" and not _overlaps(vol, axt2):
            raise DataError(case, f"{name(key)}: {key} has no physical overlap with AxT2 {name('AxT2')} "
                            "(check origin/direction in the headers)")

    # 1. Target grid, centred on the gland when asked and possible.
    center_lps, center_source = None, "volume"
    if "gland" in exam.masks:
        centroid = gland_centroid(exam.masks["gland"])
        if centroid is None:
            raise DataError(case, f"{name('gland')}: gland mask is empty")
        if config.center == "gland":
            center_lps, center_source = centroid, "gland"
    grid = target_grid(axt2, config.grid, center_lps)

    # 2. One resampling per volume (0 outside its field of view).
    volumes: dict[str, Volume] = {}
    normalization: dict[str, dict[str, Any]] = {}
    for seq in SEQUENCES:
        if seq not in exam.volumes:
            continue
        out = resample_to_grid(exam.volumes[seq], grid, interpolation=config.interpolation, default_value=0.0)
        # Drop the input's header entries: they may hold patient identifiers.
        out = Volume(out.array.astype(np.float32), out.spacing, out.origin, out.direction, {})
        # 3. Intensities.
        if config.normalize:
            try:
                out = normalize_volume(out, seq, config, source=name(seq))
            except DataError as exc:
                raise DataError(case, exc.reason) from None
            normalization[seq] = read_normalization(out).to_dict()  # type: ignore[union-attr]
        volumes[seq] = out
    masks = {
        key: _as_label_map(resample_to_grid(exam.masks[key], grid, interpolation="nearest", default_value=0))
        for key in MASKS
        if key in exam.masks
    }
    grid_center = grid.affine_lps @ np.append((np.asarray(grid.shape, float) - 1) / 2, 1.0)
    info = {"center": center_source, "center_lps": [round(float(c), 4) for c in grid_center[:3]],
            "normalization": normalization}
    return Exam(volumes=volumes, masks=masks, case_id=exam.case_id), info


# --- one study -----------------------------------------------------------------------------------------------------
def _check_sequences(study: Study, allow_missing: bool) -> None:
    missing = [s for s in SEQUENCES if s not in study.images]
    if missing and not allow_missing:
        raise DataError(study.case_id, f"no {', '.join(missing)} image; give --allow-missing (allow_missing=True) "
                        "to process the sequences it has")


def preprocess_study(
    study: Study,
    config: PreprocessConfig,
    out_dir: str | Path,
    *,
    allow_missing: bool = False,
) -> Study:
    """Preprocess one study and write its files (atomically) into ``out_dir``.

    Writes ``out_dir/{axt2,highb,adc,gland,lesion}.nii.gz`` for what the study has (see :data:`OUTPUT_FILES`).

    Args:
        study: the input record (any format :func:`read_volume` reads).
        out_dir: the case's own folder, e.g. ``<out>/cases/<case_id>``.
        allow_missing: process a study that lacks HighB or ADC with the sequences it has (else DataError).

    Returns:
        A copy of ``study`` (same labels and report) whose images and masks point to the written files.

    Raises:
        DataError: naming the case and the file (missing/corrupt/not-3D/NaN input, no overlap, empty gland mask).
    """
    new_study, _ = _preprocess_study(study, config, Path(out_dir), allow_missing)
    return new_study


def _preprocess_study(study: Study, config: PreprocessConfig, out_dir: Path, allow_missing: bool) -> tuple[Study, dict]:
    _check_sequences(study, allow_missing)
    # Read everything first: a bad input fails before anything is written.
    volumes = {seq: read_case_volume(study.case_id, path) for seq, path in study.images.items()}
    masks = {key: read_case_volume(study.case_id, path) for key, path in study.masks.items()}
    files = {**study.images, **study.masks}
    exam, info = preprocess_exam(Exam(volumes, masks, study.case_id), config,
                                 files={k: Path(v).name for k, v in files.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for seq, vol in exam.volumes.items():
        images[seq] = write_volume(vol, out_dir / OUTPUT_FILES[seq])
    new_masks: dict[str, Path] = {}
    for key, vol in exam.masks.items():
        new_masks[key] = write_volume(vol, out_dir / OUTPUT_FILES[key])
    # A file left from an earlier run with other inputs (e.g. a lesion mask since removed) is not ours any more.
    for key, file_name in OUTPUT_FILES.items():
        if key not in images and key not in new_masks and (out_dir / file_name).exists():
            (out_dir / file_name).unlink()
    return study.with_paths(images, new_masks), info


# --- a manifest ----------------------------------------------------------------------------------------------------
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def case_folder_name(case_id: str) -> str:
    """A file-system-safe folder name for ``case_id`` (unsafe ids get a hash suffix so two never collide)."""
    if _SAFE.match(case_id) and len(case_id) <= 120:
        return case_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80].lstrip(".") or "case"
    return f"{cleaned}-{hashlib.sha256(case_id.encode('utf-8')).hexdigest()[:8]}"
