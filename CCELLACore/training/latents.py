"""The latent data set the diffusion model trains on: autoencoder latents, report encodings and labels per exam.

Built once from a preprocessed manifest (``ccella preprocess --target ldm``): each sequence is encoded on its own by
the autoencoder's posterior mean (the reference used one random sample) and cached per case as a float16 safetensors
file, so that a crashed or repeated run reuses it; the report is encoded by the text encoder (``ccella encode``'s
float16 cache of the real tokens only).

Memory at scale: nothing of the data set is held in memory but its small per-exam records (file names, token counts,
spacing, labels). :meth:`LatentData.read` reads the exams of one batch through memory maps (safetensors
``safe_open``), so a DDP rank touches only the exams of its own slice of each global batch, and its memory does not
grow with the number of exams (docs/memory.md: measured and extrapolated figures).
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
from ..models.autoencoder import LatentStats, SequenceAutoencoder
from ..models.text_encoder import TextEncoding
from .distributed import DistributedContext, shard

__all__ = ["LatentData", "LatentBatch", "STORAGE_DTYPE", "encode_latents", "write_latent_file", "load_latent_data",
           "latent_stats", "lesion_sides", "reference_intensities"]

logger = logging.getLogger("CCELLACore")

#: dtype of latents and lesion fractions on disk (half the bytes of fp32; read back as fp32).
STORAGE_DTYPE = torch.float16


@dataclass
class LatentBatch:
    """The tensors of a few exams, read from the caches (float32).

    Attributes:
        latents: (B, 4*S, x, y, z) unscaled posterior means, channel group s = sequence s.
        lesion: (B, 1, x, y, z) fraction of each latent voxel's image voxels inside the lesion mask (0 without one).
        text: (B, L, D) features and (B, L) mask, L = the longest report of the batch.
    """

    latents: torch.Tensor
    lesion: torch.Tensor
    text: TextEncoding


@dataclass
class LatentData:
    """N training exams: per-exam records in memory, latents and report features on disk, read per batch.

    Attributes:
        case_ids: N case ids.
        latent_files: N latent cache files (``latent`` (4*S, x, y, z), ``lesion`` (1, x, y, z), ``spacing`` (3,)).
        text_files: N text cache files (the null encoding's for exams without a report).
        text_lengths: (N,) long, real tokens per report.
        latent_shape: (4*S, x, y, z), the same for every exam.
        spacing: (N, 3) voxel spacing (mm) of the images the latents came from.
        labels: (N,) long csPCa labels (0 where unknown; ``has_label`` tells).
        has_report: (N,) bool.
        has_label: (N,) bool.
        has_lesion_mask: (N,) bool, exams whose manifest names a lesion mask (an empty mask = no lesion).
    """

    case_ids: list[str]
    latent_files: list[Path]
    text_files: list[Path]
    text_lengths: torch.Tensor
    latent_shape: tuple[int, ...]
    spacing: torch.Tensor
    labels: torch.Tensor
    has_report: torch.Tensor
    has_label: torch.Tensor
    has_lesion_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.case_ids)

    def read(self, index: torch.Tensor | list[int]) -> LatentBatch:
        """Read exams ``index`` (and nothing else) from the caches, as float32."""
        from ..models.encode_cli import read_tokens

        index = [int(i) for i in index]
        latents, lesion = zip(*(_read_latent_file(self.latent_files[i], self.case_ids[i], ("latent", "lesion"))
                                for i in index))
        tokens = [read_tokens(self.text_files[i]) for i in index]
        length = max(max(t.shape[0] for t in tokens), 1)  # no padding beyond the longest report of the batch
        features = torch.zeros(len(index), length, tokens[0].shape[1])
        mask = torch.zeros(len(index), length, dtype=torch.bool)
        for row, t in enumerate(tokens):
            features[row, : t.shape[0]] = t.float()
            mask[row, : t.shape[0]] = True
        return LatentBatch(torch.stack(latents).float(), torch.stack(lesion).float(), TextEncoding(features, mask))


def _latent_file(cache_dir: Path, case_id: str) -> Path:
    return cache_dir / f"{case_id}.safetensors"


def _read_latent_file(path: Path, case_id: str, keys: tuple[str, ...]) -> list[torch.Tensor]:
    """``keys`` of one latent cache file, read through a memory map; a missing ``lesion`` is zeros."""
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(case_id, f"latent file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            shape = f.get_slice("latent").get_shape()
            return [f.get_tensor(k) if k in names else torch.zeros((1, *shape[1:]), dtype=STORAGE_DTYPE)
                    for k in keys]
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(case_id, f"{path}: not a readable latent cache file ({exc}); delete it to re-encode") from None


def write_latent_file(path: str | Path, latent: torch.Tensor, spacing: torch.Tensor, lesion: torch.Tensor,
                      case_id: str = "") -> Path:
    """Write one exam's latent cache file atomically: ``latent`` (4*S, x, y, z) and ``lesion`` (1, x, y, z) in
    float16, ``spacing`` (3,) float32.

    Raises:
        DataError: the latent does not fit float16 (non-finite after the cast).
    """
    from safetensors.torch import save_file

    half = latent.detach().to("cpu", STORAGE_DTYPE).contiguous()
    if not torch.isfinite(half).all():
        raise DataError(case_id, f"latent values up to {float(latent.abs().max()):.3g} overflow float16")
    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        save_file({"latent": half, "spacing": spacing.to(torch.float32).contiguous(),
                   "lesion": lesion.to("cpu", STORAGE_DTYPE).contiguous()}, str(tmp))
    return Path(path)


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
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Shard all studies, then skip the cached ones: a rank that listed the cache after another rank had begun
    # writing to it would shard a shorter list and leave cases to nobody.
    mine = [s for s in shard(studies, ctx) if not _latent_file(cache_dir, s.case_id).is_file()]
    problems: list[tuple[str, str]] = []
    for study in tqdm(mine, desc="encode latents", unit="exam", disable=not (progress and ctx.is_main)):
        try:
            exam = study.load(sequences, masks=True)
            exam.check_same_space()
            images = torch.from_numpy(np.stack([exam.volumes[s].array.astype(np.float32) for s in sequences]))[None]
            z = autoencoder.encode_sequences(images)[0]
            spacing = torch.tensor(exam.reference.spacing, dtype=torch.float32)
            write_latent_file(_latent_file(cache_dir, study.case_id), z, spacing,
                              _lesion_fraction(exam, tuple(z.shape[1:])), study.case_id)
        except (DataError, VolumeError) as exc:
            problems.append((study.case_id, str(exc)))
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


def load_latent_data(studies: list[Study], cache_dir: str | Path, text_cache) -> LatentData:
    """The records of ``studies`` (in order): latent files checked to exist and to share one shape (headers only),
    report files and token counts from ``text_cache`` (a :class:`~CCELLACore.models.encode_cli.EncodingCache`).
    No latent or feature values are read."""
    from safetensors import safe_open

    from ..models.encode_cli import NULL_FILE

    cache_dir = Path(cache_dir)
    if not studies:
        raise DataError("<none>", "no exam to train on")
    files, text_files, lengths, spacing, shapes = [], [], [], [], {}
    null_length = int(text_cache.index["null"]["n_tokens"])
    for study in studies:
        path = _latent_file(cache_dir, study.case_id)
        if not path.is_file():
            raise DataError(study.case_id, f"latent file missing: {path}")
        with safe_open(str(path), framework="pt") as f:
            shapes.setdefault(tuple(f.get_slice("latent").get_shape()), study.case_id)
            spacing.append(f.get_tensor("spacing").float())
        files.append(path)
        # is_null: a case missing from the text cache is an error naming it, report or not
        if not text_cache.is_null(study.case_id) and study.has_report:
            text_files.append(text_cache.file(study.case_id))
            lengths.append(int(text_cache.cases[study.case_id]["n_tokens"]))
        else:
            text_files.append(text_cache.directory / NULL_FILE)
            lengths.append(null_length)
    if len(shapes) > 1:
        raise DataError(next(iter(shapes.values())), f"latents have different shapes {sorted(shapes)}; preprocess all "
                        "exams onto one grid (ccella preprocess)")
    return LatentData(
        case_ids=[s.case_id for s in studies],
        latent_files=files,
        text_files=text_files,
        text_lengths=torch.tensor(lengths, dtype=torch.long),
        latent_shape=next(iter(shapes)),
        spacing=torch.stack(spacing),
        labels=torch.tensor([s.label or 0 for s in studies], dtype=torch.long),
        has_report=torch.tensor([s.has_report for s in studies], dtype=torch.bool),
        has_label=torch.tensor([s.label is not None for s in studies], dtype=torch.bool),
        has_lesion_mask=torch.tensor(["lesion" in s.masks for s in studies], dtype=torch.bool),
    )


#: Lesion fraction (in latent voxels) below which an exam counts as having no lesion.
MIN_LESION_MASS = 0.5


def lesion_sides(lesion: torch.Tensor) -> torch.Tensor:
    """(B, 1, x, y, z) lesion fractions -> (B,) long side classes (:data:`~CCELLACore.models.unet.SIDES`): 0 = no
    lesion (less than :data:`MIN_LESION_MASS` latent voxels), 1 = left, 2 = right, by which half of axis 0 holds
    more lesion (axis 0 = LPS x, larger index = patient left, on the gland-centred grid). With lesions on both sides
    the larger total wins: phantom and real index lesions are usually the largest."""
    mass = lesion.float().sum(dim=(1, 3, 4))  # (B, x)
    half = mass.shape[1] / 2
    u = torch.arange(mass.shape[1], device=mass.device).float() + 0.5
    left = (mass * (u > half)).sum(dim=1)
    right = (mass * (u < half)).sum(dim=1)
    sides = torch.where(left >= right, 1, 2)
    return torch.where(mass.sum(dim=1) < MIN_LESION_MASS, 0, sides).long()


def latent_stats(data: LatentData, sequences: tuple[str, ...], ctx: DistributedContext) -> LatentStats:
    """Per-sequence latent statistics over ALL exams of ``data``: each rank streams its share (one exam at a time),
    then the ranks combine exactly (:meth:`LatentStats.all_reduce`)."""
    stats = LatentStats(sequences, data.latent_shape[0] // len(sequences))
    for i in shard(list(range(len(data))), ctx):
        (latent,) = _read_latent_file(data.latent_files[i], data.case_ids[i], ("latent",))
        stats.update(latent.float()[None])
    stats.all_reduce()
    return stats


def reference_intensities(studies: Manifest | list[Study], sequences: tuple[str, ...] = SEQUENCES) -> dict[str, float]:
    """Per sequence, the value a normalised 1.0 maps back to (docs/data.md, "Geometry and units"), over ``studies``
    (the training exams, or a whole manifest).

    AxT2/HighB: the mean over the exams of their normalisation's upper bound (the 99.5th percentile recorded by
    ``ccella preprocess``); ADC: the upper end of its fixed window (3000 x 10^-6 mm^2/s).
    """
    from ..data.normalization import read_normalization
    from ..data.volume import read_metadata

    uppers: dict[str, list[float]] = {s: [] for s in sequences}
    for study in getattr(studies, "studies", studies):
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
