"""Exams -> the classifier's input: one grid and one intensity rule for real and synthetic exams alike.

1. **Grid** (:func:`prepare_exam`): :func:`~CCELLACore.data.preprocess.preprocess_exam` with the classifier's
   ``preprocess.classifier`` config resamples every sequence in one interpolation onto ``grid.size`` voxels at
   ``grid.spacing`` mm with the AxT2 direction. The grid is centred on the AxT2 volume's physical centre, never on a
   gland mask, even when the exam has one: synthetic exams and the exams ``ccella classify`` is given have no mask,
   and a crop that depended on having one would differ between real and synthetic exams, the defect the reference has
   (its ``CropForegroundd(x > 0)`` crops z-scored synthetic volumes to above-mean voxels but raw real volumes to the
   whole field of view). Voxels outside an input's field of view are 0 before the intensity step.
2. **Intensities** (:func:`intensity_transform`), per sequence and volume, as the reference: MONAI
   ``ClipIntensityPercentiles(2, 98, sharpness_factor=10)`` (soft clipping) then ``NormalizeIntensity`` (z-score over
   the whole grid).
3. **Augmentation** (:func:`build_augmentation`, training only): flips, in-plane rotation, translation and zoom with
   MONAI transforms, the same spatial transform for all channels. Each sample's random state is seeded from
   ``(seed, step, position in the batch)``, so a batch never depends on the data-loader workers or on a resume.

The training cache (:func:`prepare_studies`) keeps each prepared exam as ``<cache>/<case>.npy`` (float32, (C, X, Y, Z))
with a fingerprint of the inputs and settings; a re-run (or another run sharing the cache) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import to_dict
from ..data.preprocess import PreprocessConfig, case_folder_name, preprocess_exam
from ..data.study import Exam, Study, read_case_volume
from ..data.volume import Volume
from ..errors import DataError
from ..fileio import atomic_path, atomic_write_json, read_json
from .config import AugmentationConfig, IntensityConfig

__all__ = [
    "intensity_transform",
    "prepare_exam",
    "PreparedCase",
    "prepare_studies",
    "build_augmentation",
    "augment",
    "sample_seed",
    "batch_indices",
    "steps_per_epoch",
    "PREPARE_VERSION",
]

logger = logging.getLogger("CCELLACore")

#: Bump when the prepared arrays change for the same inputs and settings (invalidates caches).
PREPARE_VERSION = 1


def intensity_transform(cfg: IntensityConfig, sequence: str = "AxT2") -> Callable[[np.ndarray], np.ndarray]:
    """``f(volume (X, Y, Z)) -> float32 (X, Y, Z)``: soft clipping at the volume's percentiles (``sequence``'s own
    when ``cfg.per_sequence`` names it; an upper percentile of 100 = no upper clipping), then a z-score."""
    from monai.transforms import ClipIntensityPercentiles, NormalizeIntensity

    lower, upper = cfg.percentiles(sequence)
    low, high = (lower if lower > 0 else None), (upper if upper < 100 else None)
    clip = (ClipIntensityPercentiles(lower=low, upper=high, sharpness_factor=cfg.sharpness)
            if low is not None or high is not None else (lambda v: v))
    norm = NormalizeIntensity()

    def apply(array: np.ndarray) -> np.ndarray:
        x = np.asarray(array, dtype=np.float32)[None]
        out = norm(clip(x))
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return np.asarray(out, dtype=np.float32)[0]

    return apply


def prepare_exam(
    exam: Exam,
    preprocess: PreprocessConfig,
    intensity: IntensityConfig,
    sequences: tuple[str, ...],
    *,
    files: dict[str, Path] | None = None,
) -> tuple[np.ndarray, Volume]:
    """One exam on the classifier's grid with the classifier's intensities.

    Args:
        exam: volumes of any geometry (each (X, Y, Z) with its own spacing/origin/direction); masks are ignored.
        sequences: the channels wanted, AxT2 first.
        files: input file per sequence, to name them in errors.

    Returns:
        ``(array (C, X, Y, Z) float32, grid)`` where ``grid`` is the AxT2 volume on the classifier's grid (its
        geometry places the array in the world; its values are the resampled, not normalised, AxT2).

    Raises:
        DataError: naming the case and file: a sequence missing, no physical overlap with AxT2, no finite values,
            a sequence that is constant on the grid (empty field of view).
    """
    case = exam.case_id or "<exam>"
    files = files or {}
    missing = [s for s in sequences if s not in exam.volumes]
    if missing:
        have = ", ".join(exam.volumes) or "none"
        raise DataError(case, f"the classifier needs {', '.join(sequences)}; missing {', '.join(missing)} "
                        f"(given: {have})")
    for seq in sequences:
        if not exam.volumes[seq].is_finite():
            raise DataError(case, f"{files.get(seq, seq)}: {seq} has NaN/Inf voxels")
    config = replace(preprocess, normalize=False, center="volume")
    prepared, _ = preprocess_exam(Exam({s: exam.volumes[s] for s in sequences}, {}, case), config,
                                  files={k: Path(v).name for k, v in files.items()})
    channels = []
    for seq in sequences:
        apply = intensity_transform(intensity, seq)
        values = prepared.volumes[seq].array
        if not float(values.max()) > float(values.min()):
            raise DataError(case, f"{Path(files.get(seq, seq)).name}: {seq} is constant on the classifier grid "
                            "(does its field of view cover the AxT2 centre?)")
        channels.append(apply(values))
    return np.stack(channels).astype(np.float32), prepared.volumes["AxT2"]


# ----------------------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class PreparedCase:
    """One prepared training or validation exam: ``<cache>/<case>.npy`` holds (C, X, Y, Z) float32."""

    case_id: str
    patient_id: str
    label: int
    label_source: str
    institution: str
    path: Path

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def _fingerprint(study: Study, settings: dict[str, Any]) -> str:
    items = []
    for key, path in sorted(study.images.items()):
        if key not in settings["sequences"]:
            continue
        try:
            stat = Path(path).stat()
            items.append([key, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            items.append([key, str(path), None, None])
    text = json.dumps({"settings": settings, "inputs": items}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prepare_studies(
    studies: list[Study],
    preprocess: PreprocessConfig,
    intensity: IntensityConfig,
    sequences: tuple[str, ...],
    cache_dir: str | Path,
    *,
    progress: bool = False,
) -> tuple[list[PreparedCase], list[tuple[str, str]]]:
    """Prepare (or reuse from ``cache_dir``) every labelled study; bad ones are skipped with a reason.

    Returns:
        ``(cases in the input order, [(case_id, reason)] skipped)``; reasons name the file (missing, corrupt,
        NaN, no overlap) or say that the study has no label.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"version": PREPARE_VERSION, "preprocess": to_dict(replace(preprocess, normalize=False,
                                                                           center="volume")),
                "intensity": to_dict(intensity), "sequences": list(sequences)}
    cases: list[PreparedCase] = []
    skipped: list[tuple[str, str]] = []
    for study in tqdm(studies, desc="prepare", unit="exam", disable=not progress):
        if study.label is None:
            skipped.append((study.case_id, "no label (csPCa 0/1)"))
            continue
        name = case_folder_name(study.case_id)
        array_path, record_path = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
        fingerprint = _fingerprint(study, settings)
        record = None
        if record_path.is_file() and array_path.is_file():
            try:
                record = read_json(record_path)
            except Exception:  # an unreadable record means "not prepared"
                record = None
        if not (isinstance(record, dict) and record.get("fingerprint") == fingerprint):
            try:
                missing = [s for s in sequences if s not in study.images]
                if missing:
                    raise DataError(study.case_id, f"no {', '.join(missing)} image in the manifest")
                volumes = {s: read_case_volume(study.case_id, study.images[s]) for s in sequences}
                array, _ = prepare_exam(Exam(volumes, {}, study.case_id), preprocess, intensity, sequences,
                                        files=study.images)
            except DataError as exc:
                skipped.append((study.case_id, exc.reason))
                continue
            with atomic_path(array_path, suffix=".npy") as tmp:
                np.save(tmp, array)
            atomic_write_json(record_path, {"case_id": study.case_id, "fingerprint": fingerprint,
                                            "shape": list(array.shape)})
        cases.append(PreparedCase(study.case_id, study.patient_id, int(study.label),
                                  getattr(study.label_source, "value", str(study.label_source)),
                                  study.institution, array_path))
    return cases, skipped


# --------------------------------------------------------------------------------------------------- augmentation
def build_augmentation(cfg: AugmentationConfig, spacing: tuple[float, float, float]):
    """The training augmentation as one MONAI ``Compose`` (None when disabled), for (C, X, Y, Z) tensors."""
    if not cfg.enabled or cfg.probability == 0:
        return None
    from monai.transforms import Compose, RandAffine, RandFlip, RandRotate, RandZoom

    p = cfg.probability
    steps = []
    if cfg.flip:
        steps.append(RandFlip(prob=p, spatial_axis=0))
    if cfg.rotate_deg > 0:
        steps.append(RandRotate(range_z=math.radians(cfg.rotate_deg), prob=p, keep_size=True, mode="bilinear",
                                padding_mode="border"))
    if any(t > 0 for t in cfg.translate_mm):
        voxels = tuple(float(t) / float(s) for t, s in zip(cfg.translate_mm, spacing))
        steps.append(RandAffine(prob=p, translate_range=voxels, mode="bilinear", padding_mode="zeros"))
    if cfg.zoom != (1.0, 1.0):
        steps.append(RandZoom(prob=p, min_zoom=cfg.zoom[0], max_zoom=cfg.zoom[1], mode="trilinear",
                              padding_mode="constant", keep_size=True))
    return Compose(steps) if steps else None


def sample_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of one sample (a 32-bit integer) from the run seed, the step and its batch position."""
    return int(np.random.SeedSequence([int(seed), int(step), int(position), 7]).generate_state(1)[0])


def augment(array: np.ndarray, transform, seed: int):
    """``transform`` applied to one (C, X, Y, Z) array with its random state set from ``seed``; a float32 tensor."""
    import torch

    x = torch.as_tensor(np.array(array, dtype=np.float32))
    if transform is None:
        return x
    transform.set_random_state(seed=seed)
    out = transform(x)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return torch.as_tensor(out, dtype=torch.float32).contiguous()


# -------------------------------------------------------------------------------------------------- sample order
def steps_per_epoch(n: int, global_batch: int) -> int:
    return max(1, math.ceil(n / global_batch))


def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The global batch of optimiser step ``step``: epochs are seeded permutations of the ``n`` samples cut into
    ``ceil(n / global_batch)`` batches; the last batch of an epoch wraps around to the epoch's first samples, so every
    batch is full. Rank ``r`` of ``w`` takes positions ``r, r + w, ...``."""
    import torch

    epoch, k = divmod(step, steps_per_epoch(n, global_batch))
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(epoch), 3]).generate_state(1)[0]))
    order = torch.randperm(n, generator=g).tolist()
    chunk = order[k * global_batch:(k + 1) * global_batch]
    while len(chunk) < global_batch:
        chunk += order[: global_batch - len(chunk)]
    return chunk
