"""The latent data set the diffusion model trains on: autoencoder latents, report encodings and labels per exam.

Built once from a preprocessed manifest (``ccella preprocess --target ldm``): each sequence is encoded on its own by
the autoencoder's posterior mean (the reference used one random sample), cached per case as safetensors so that a
crashed or repeated run reuses it, and the report is encoded by the text encoder (``ccella encode``'s cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.manifest import Manifest
from ..data.study import SEQUENCES, Study
from ..errors import DataError, VolumeError
from ..fileio import atomic_path
from ..models.autoencoder import SequenceAutoencoder
from ..models.text_encoder import TextEncoding
from .distributed import DistributedContext, shard

__all__ = ["LatentData", "encode_latents", "load_latent_data", "reference_intensities"]

logger = logging.getLogger("CCELLACore")


@dataclass
class LatentData:
    """Training tensors of N exams, kept in memory (latents are 64x smaller than the images).

    Attributes:
        case_ids: N case ids.
        latents: (N, 4*S, x, y, z) unscaled posterior means, channel group s = sequence s.
        lesion: (N, 1, x, y, z) fraction of each latent voxel's image voxels inside the exam's lesion mask (0 where
            the exam has none), for :attr:`~CCELLACore.models.losses.LossConfig.lesion_weight`.
        spacing: (N, 3) voxel spacing (mm) of the images the latents came from.
        text: report encodings, (N, L, D) features and (N, L) mask; the null encoding for exams without a report.
        labels: (N,) long csPCa labels (0 where unknown; ``has_label`` tells).
        has_report: (N,) bool.
        has_label: (N,) bool.
    """

    case_ids: list[str]
    latents: torch.Tensor
    lesion: torch.Tensor
    spacing: torch.Tensor
    text: TextEncoding
    labels: torch.Tensor
    has_report: torch.Tensor
    has_label: torch.Tensor

    def __len__(self) -> int:
        return len(self.case_ids)


def _latent_file(cache_dir: Path, case_id: str) -> Path:
    return cache_dir / f"{case_id}.safetensors"


def encode_latents(
    studies: list[Study],
    autoencoder: SequenceAutoencoder,
    cache_dir: str | Path,
    ctx: DistributedContext,
    sequences: tuple[str, ...] = SEQUENCES,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """Encode each study's sequences into ``<cache_dir>/<case_id>.safetensors`` (ranks share the work; cases
    already cached are skipped). Returns ``(case_id, reason)`` for the studies that could not be encoded."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in studies if not _latent_file(cache_dir, s.case_id).is_file()]
    problems: list[tuple[str, str]] = []
    mine = shard(todo, ctx)
    for study in tqdm(mine, desc="encode latents", unit="exam", disable=not (progress and ctx.is_main)):
        try:
            exam = study.load(sequences, masks=True)
            exam.check_same_space()
        except (DataError, VolumeError) as exc:
            problems.append((study.case_id, str(exc)))
            continue
        images = torch.from_numpy(np.stack([exam.volumes[s].array.astype(np.float32) for s in sequences]))[None]
        z = autoencoder.encode_sequences(images)[0]
        spacing = torch.tensor(exam.reference.spacing, dtype=torch.float32)
        lesion = _lesion_fraction(exam, tuple(z.shape[1:]))
        with atomic_path(_latent_file(cache_dir, study.case_id), suffix=".safetensors") as tmp:
            save_file({"latent": z.contiguous(), "spacing": spacing, "lesion": lesion}, str(tmp))
    ctx.barrier()
    return problems


def _lesion_fraction(exam, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """(1, x, y, z) fraction of each latent voxel's image voxels inside the lesion mask (zeros without a mask)."""
    mask = exam.masks.get("lesion")
    if mask is None:
        return torch.zeros((1, *latent_shape))
    if tuple(mask.shape) != tuple(exam.reference.shape):
        raise DataError(exam.case_id, f"lesion mask is {tuple(mask.shape)}, the images {tuple(exam.reference.shape)}")
    inside = torch.from_numpy(np.asarray(mask.array) > 0).float()[None, None]
    return torch.nn.functional.adaptive_avg_pool3d(inside, latent_shape)[0].contiguous()


def load_latent_data(
    studies: list[Study],
    cache_dir: str | Path,
    encodings: dict[str, TextEncoding],
    null: TextEncoding,
) -> LatentData:
    """Stack the cached latents of ``studies`` (in order) with their report encodings and labels.

    Args:
        encodings: per case id, the (1, L, D) report encoding; cases missing from it use ``null``.
    """
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    latents, lesion, spacing, text = [], [], [], []
    for study in studies:
        path = _latent_file(cache_dir, study.case_id)
        if not path.is_file():
            raise DataError(study.case_id, f"latent file missing: {path}")
        saved = load_file(str(path))
        latents.append(saved["latent"])
        lesion.append(saved.get("lesion", torch.zeros((1, *saved["latent"].shape[1:]))))
        spacing.append(saved["spacing"])
        text.append(encodings.get(study.case_id, null) if study.has_report else null)
    if not latents:
        raise DataError("<none>", "no exam to train on")
    shapes = {tuple(z.shape) for z in latents}
    if len(shapes) > 1:
        raise DataError(studies[0].case_id, f"latents have different shapes {sorted(shapes)}; preprocess all exams "
                        "onto one grid (ccella preprocess)")
    return LatentData(
        case_ids=[s.case_id for s in studies],
        latents=torch.stack(latents),
        lesion=torch.stack(lesion),
        spacing=torch.stack(spacing),
        text=TextEncoding.cat(text),
        labels=torch.tensor([s.label or 0 for s in studies], dtype=torch.long),
        has_report=torch.tensor([s.has_report for s in studies], dtype=torch.bool),
        has_label=torch.tensor([s.label is not None for s in studies], dtype=torch.bool),
    )


def reference_intensities(manifest: Manifest, sequences: tuple[str, ...] = SEQUENCES) -> dict[str, float]:
    """Per sequence, the value a normalised 1.0 maps back to (decisions.md, Geometry and units).

    AxT2/HighB: the mean over the exams of their normalisation's upper bound (the 99.5th percentile recorded by
    ``ccella preprocess``); ADC: the upper end of its fixed window (3000 x 10^-6 mm^2/s).
    """
    from ..data.preprocess import read_normalization
    from ..data.volume import read_metadata

    uppers: dict[str, list[float]] = {s: [] for s in sequences}
    for study in manifest.studies:
        for seq in sequences:
            if seq not in study.images:
                continue
            record = read_normalization(read_metadata(study.images[seq]))  # header only, no voxels decoded
            if record is None:
                raise DataError(study.case_id, f"{study.images[seq]} carries no normalisation record; "
                                "run ccella preprocess --target ldm first")
            uppers[seq].append(float(record.upper))
    missing = [s for s, values in uppers.items() if not values]
    if missing:
        raise DataError("<all>", f"no exam has {missing}")
    return {s: float(np.mean(values)) for s, values in uppers.items()}
