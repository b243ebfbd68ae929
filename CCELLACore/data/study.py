"""The record of one biparametric MRI study and the exam (three co-registered volumes) it points to.

A :class:`Study` is what a manifest row holds: paths, report, labels and where the label came from. ``study.load()``
reads its images into an :class:`Exam`, which checks that AxT2, HighB and ADC can be used together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, VolumeError
from .volume import Volume, read_volume

__all__ = [
    "SEQUENCES",
    "MASKS",
    "SPLITS",
    "LabelSource",
    "derive_label",
    "Study",
    "Exam",
    "read_case_volume",
]

#: The biparametric sequences, in the order used everywhere (latent channel groups, classifier channels, files).
SEQUENCES: tuple[str, ...] = ("AxT2", "HighB", "ADC")
#: Optional masks a study may carry.
MASKS: tuple[str, ...] = ("gland", "lesion")
#: Allowed values of ``Study.split`` ("" = not assigned yet).
SPLITS: tuple[str, ...] = ("train", "val", "test", "")


class LabelSource(str, enum.Enum):
    """Where a csPCa label came from (docs/data.md, "Labels")."""

    HISTOPATHOLOGY = "histopathology"  # ISUP grade group known: csPCa = ISUP >= 2
    PIRADS = "pirads"  # no histopathology: PI-RADS >= 4 stands in
    ANNOTATION = "annotation"  # Prostate158: a tumour annotation exists
    PREDICTED = "predicted"  # synthetic exams: the class the generating model predicted from the report
    NONE = "none"  # unlabelled


def derive_label(isup: int | None, pirads: int | None) -> tuple[int | None, LabelSource]:
    """csPCa label and its source: histopathology first (ISUP >= 2), else PI-RADS >= 4, else unlabelled.

    The paper prioritises histopathology; the authors' code reverses the order (a defect we do not copy).
    """
    if isup is not None:
        return int(isup >= 2), LabelSource.HISTOPATHOLOGY
    if pirads is not None:
        return int(pirads >= 4), LabelSource.PIRADS
    return None, LabelSource.NONE


@dataclass
class Study:
    """One bpMRI study as listed in a manifest.

    Args:
        case_id: unique key of the study (``<patient_id>_<study_id>`` for PI-CAI).
        patient_id: patients may have several studies; splits are made per patient.
        images: path per sequence name in :data:`SEQUENCES` (AxT2 required; HighB and ADC for bpMRI).
        masks: optional paths, keys in :data:`MASKS`.
        report: free-text report; ``""`` or ``None`` = no report (trains the unconditional branch).
        pirads, isup: case-level PI-RADS (1-5) and ISUP grade group (0-5), ``None`` when unknown.
        label: csPCa label (1 = clinically significant cancer), ``None`` when unknown.
        label_source: where ``label`` came from.
    """

    case_id: str
    patient_id: str
    images: dict[str, Path]
    study_id: str = ""
    institution: str = ""
    split: str = ""
    masks: dict[str, Path] = field(default_factory=dict)
    report: str | None = None
    pirads: int | None = None
    isup: int | None = None
    label: int | None = None
    label_source: LabelSource = LabelSource.NONE

    def __post_init__(self) -> None:
        if not self.case_id:
            raise DataError("<empty>", "case_id is empty")
        unknown = set(self.images) - set(SEQUENCES)
        if unknown:
            raise DataError(self.case_id, f"unknown sequence(s) {sorted(unknown)}; expected {SEQUENCES}")
        if "AxT2" not in self.images:
            raise DataError(self.case_id, "no AxT2 image")
        unknown = set(self.masks) - set(MASKS)
        if unknown:
            raise DataError(self.case_id, f"unknown mask(s) {sorted(unknown)}; expected {MASKS}")
        if self.split not in SPLITS:
            raise DataError(self.case_id, f"split must be one of {SPLITS[:-1]} or empty, got {self.split!r}")
        if self.pirads is not None and not 1 <= self.pirads <= 5:
            raise DataError(self.case_id, f"PI-RADS must be 1-5, got {self.pirads}")
        if self.isup is not None and not 0 <= self.isup <= 5:
            raise DataError(self.case_id, f"ISUP grade group must be 0-5, got {self.isup}")
        if self.label is not None and self.label not in (0, 1):
            raise DataError(self.case_id, f"label must be 0 or 1, got {self.label}")
        self.label_source = LabelSource(self.label_source)
        self.images = {k: Path(v) for k, v in self.images.items()}
        self.masks = {k: Path(v) for k, v in self.masks.items()}

    @property
    def has_report(self) -> bool:
        return bool(self.report and self.report.strip())

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(s for s in SEQUENCES if s in self.images)

    def with_paths(self, images: dict[str, Path], masks: dict[str, Path] | None = None) -> "Study":
        return replace(self, images=dict(images), masks=dict(self.masks if masks is None else masks))

    def load(self, sequences: tuple[str, ...] | None = None, *, masks: bool = True) -> "Exam":
        """Read the images (and masks) into an :class:`Exam`.

        Raises:
            DataError: naming the case and the file when an image is missing, corrupt, not 3D or not finite.
        """
        wanted = self.sequences if sequences is None else sequences
        volumes: dict[str, Volume] = {}
        for name in wanted:
            if name not in self.images:
                raise DataError(self.case_id, f"no {name} image")
            volumes[name] = read_case_volume(self.case_id, self.images[name])
        mask_volumes: dict[str, Volume] = {}
        if masks:
            for name, path in self.masks.items():
                mask_volumes[name] = read_case_volume(self.case_id, path)
        return Exam(volumes=volumes, masks=mask_volumes, case_id=self.case_id)


def read_case_volume(case_id: str, path: Path) -> Volume:
    """:func:`read_volume` whose errors name the case as well as the file (for batch jobs that go on)."""
    try:
        return read_volume(path)
    except VolumeError as exc:
        raise DataError(case_id, str(exc)) from None


@dataclass
class Exam:
    """Co-registered volumes of one study (real or synthetic), keyed by sequence name, plus optional masks."""

    volumes: dict[str, Volume]
    masks: dict[str, Volume] = field(default_factory=dict)
    case_id: str = ""

    @property
    def reference(self) -> Volume:
        """The AxT2 volume (the grid every other sequence is resampled to)."""
        return self.volumes["AxT2"] if "AxT2" in self.volumes else next(iter(self.volumes.values()))

    def same_space(self, atol: float = 1e-3) -> bool:
        ref = self.reference
        return all(v.same_grid(ref, atol) for v in (*self.volumes.values(), *self.masks.values()))

    def check_same_space(self, atol: float = 1e-3) -> None:
        """Raise :class:`DataError` naming the first volume whose grid differs from AxT2's, and how to fix it."""
        ref = self.reference
        for name, vol in (*self.volumes.items(), *((f"{k} mask", v) for k, v in self.masks.items())):
            if not vol.same_grid(ref, atol):
                raise DataError(
                    self.case_id,
                    f"{name} is not on the AxT2 grid ({vol!r} vs {ref!r}); run `ccella preprocess` to resample it",
                )

    def physical_overlap(self) -> bool:
        """True when every volume's bounding box intersects AxT2's (a coarse check for mismatched geometry)."""
        ref_box = _bounding_box(self.reference)
        for vol in (*self.volumes.values(), *self.masks.values()):
            box = _bounding_box(vol)
            if np.any(box[1] < ref_box[0]) or np.any(box[0] > ref_box[1]):
                return False
        return True


def _bounding_box(vol: Volume) -> np.ndarray:
    corners = np.array([[i, j, k, 1] for i in (0, vol.shape[0] - 1) for j in (0, vol.shape[1] - 1) for k in (0, vol.shape[2] - 1)], float)
    world = (vol.affine_lps @ corners.T).T[:, :3]
    return np.stack([world.min(0), world.max(0)])
