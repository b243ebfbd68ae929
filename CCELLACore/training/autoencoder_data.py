"""The autoencoder's training samples: every sequence of every preprocessed exam as one single-channel volume (or,
for a joint autoencoder, every exam as one volume with a channel per sequence) held in memory, and the samples,
crops and flips of each optimiser step, derived from ``(seed, step)`` alone so that a killed run continues
bit-identically (:mod:`CCELLACore.training.autoencoder`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.study import read_case_volume
from ..errors import ConfigError, DataError
from .configs import AutoencoderTrainingConfig
from .distributed import DistributedContext

__all__ = ["SequenceSamples", "load_sequence_samples", "sample_batch", "gather_crops", "check_geometry"]

#: Intensities of an LDM-preprocessed volume lie in [0, 1]; a little slack for interpolation, none for raw data.
_INTENSITY_RANGE = (-0.05, 1.05)


@dataclass
class SequenceSamples:
    """Single-sequence volumes (or whole exams, one channel per sequence) held in memory.

    Attributes:
        images: (N, C, X, Y, Z) float32 intensities in [0, 1]; C = 1, or the number of sequences when joint.
        names: ``(case_id, sequence)`` of each sample (``(case_id, "AxT2+HighB+ADC")`` when joint).
        spacing: voxel spacing (mm) of the grid shared by all samples.
        masks: name -> (N, 1, X, Y, Z) bool, each sample's exam mask (``load_sequence_samples(..., masks=...)``).
    """

    images: torch.Tensor
    names: list[tuple[str, str]]
    spacing: tuple[float, float, float]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[2:])  # type: ignore[return-value]

    @property
    def n_exams(self) -> int:
        return len({case for case, _ in self.names})


def load_sequence_samples(studies, sequences: tuple[str, ...], *, grid_size: tuple[int, ...] | None = None,
                          source: str | Path = "manifest", masks: tuple[str, ...] = (), joint: bool = False
                          ) -> tuple[SequenceSamples | None, list[tuple[str, str]]]:
    """Read every sequence of every study into one tensor; exams that cannot be used are skipped, not fatal.

    Args:
        studies: :class:`~CCELLACore.data.study.Study` records of a preprocessed (``--target ldm``) manifest.
        sequences: the sequences to read from each exam (an exam lacking one is skipped).
        grid_size: the grid every volume must have (default: that of the first readable exam).
        source: the manifest, for error messages.
        masks: also read these masks of each exam (``SequenceSamples.masks``): an exam without its ``gland`` mask
            is skipped, one without a ``lesion`` mask has none (all false); one on another grid is skipped.
        joint: one sample per exam with its sequences as channels (a joint autoencoder) instead of one per sequence.

    Returns:
        ``(samples or None when no exam was usable, [(case_id, reason)] of the skipped exams)``; the reasons name the
        file (missing, corrupt) or the grid.

    Raises:
        DataError: an exam's intensities are outside [0, 1]: the manifest was not preprocessed with ``--target ldm``.
    """
    arrays: list[np.ndarray] = []
    mask_arrays: dict[str, list[np.ndarray]] = {name: [] for name in masks}
    names: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    spacing: tuple[float, float, float] | None = None
    for study in studies:
        try:
            if "gland" in masks and "gland" not in study.masks:
                raise DataError(study.case_id, "no gland mask in the manifest (column gland_mask)")
            exam = study.load(sequences, masks=False)
            read = {name: read_case_volume(study.case_id, study.masks[name]).array > 0.5
                    for name in masks if name in study.masks}
        except DataError as exc:
            skipped.append((study.case_id, exc.reason))
            continue
        shapes = {tuple(v.shape) for v in exam.volumes.values()}
        if len(shapes) != 1:
            skipped.append((study.case_id, f"sequences on different grids {sorted(shapes)}; run `ccella preprocess`"))
            continue
        shape = shapes.pop()
        if grid_size is None:
            grid_size = shape
        if shape != tuple(grid_size):
            skipped.append((study.case_id, f"grid {shape} differs from {tuple(grid_size)} of the other exams; "
                                           "run `ccella preprocess --target ldm` on all of them"))
            continue
        wrong = [f"{name} mask grid {tuple(m.shape)}" for name, m in read.items() if tuple(m.shape) != shape]
        if wrong:
            skipped.append((study.case_id, f"{wrong[0]} differs from the images' {shape}"))
            continue
        volumes = []
        for seq in sequences:
            array = np.asarray(exam.volumes[seq].array, dtype=np.float32)
            lo, hi = float(array.min()), float(array.max())
            if lo < _INTENSITY_RANGE[0] or hi > _INTENSITY_RANGE[1]:
                raise DataError(study.case_id, f"{study.images[seq].name}: intensities {lo:.3g}..{hi:.3g} are not "
                                f"normalised to [0, 1]; {source} must come from `ccella preprocess --target ldm`")
            volumes.append(array)
        samples = [np.stack(volumes)] if joint else [v[None] for v in volumes]
        arrays.extend(samples)
        names.extend([(study.case_id, "+".join(sequences))] if joint else [(study.case_id, s) for s in sequences])
        for name in masks:
            mask_arrays[name].extend([read[name] if name in read else np.zeros(shape, bool)] * len(samples))
        if spacing is None:
            spacing = tuple(float(s) for s in exam.reference.spacing)  # type: ignore[assignment]
    if not arrays:
        return None, skipped
    images = torch.from_numpy(np.stack(arrays)).clamp_(0.0, 1.0)
    tensors = {name: torch.from_numpy(np.stack(arrays)[:, None]) for name, arrays in mask_arrays.items()}
    return SequenceSamples(images, names, spacing, tensors), skipped  # type: ignore[arg-type]


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    # One generator per (seed, step, purpose): nothing about the data order needs saving to resume.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def sample_batch(n: int, step: int, batch_size: int, ctx: DistributedContext, seed: int,
                 grid: tuple[int, int, int], patch: tuple[int, int, int] | None, flip: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's samples of optimiser step ``step``, their crop corners and flips, all derived from ``(seed, step)``.

    Epochs are permutations of the ``n`` samples, cut into global batches of ``batch_size * world_size``; rank r
    takes every world_size-th sample of its global batch (the last batch of an epoch wraps around).

    Returns:
        ``(index (B,), corner (B, 3) crop start voxels, flipped (B,) bool)``.
    """
    global_batch = batch_size * ctx.world_size
    steps_per_epoch = max(1, math.ceil(n / global_batch))
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=_step_generator(seed, epoch, 0))
    chunk = order[k * global_batch: (k + 1) * global_batch]
    while len(chunk) < global_batch:
        chunk = torch.cat([chunk, order[: global_batch - len(chunk)]])
    g = _step_generator(seed, step, 1)
    if patch is None:
        corners = torch.zeros(global_batch, 3, dtype=torch.long)
    else:
        corners = torch.stack([torch.randint(0, g_ - p + 1, (global_batch,), generator=g)
                               for g_, p in zip(grid, patch)], dim=1)
    flips = (torch.rand(global_batch, generator=g) < 0.5) & flip
    return chunk[ctx.rank:: ctx.world_size], corners[ctx.rank:: ctx.world_size], flips[ctx.rank:: ctx.world_size]


def gather_crops(images: torch.Tensor, index: torch.Tensor, corners: torch.Tensor, flips: torch.Tensor,
                 patch: tuple[int, int, int] | None) -> torch.Tensor:
    """(B, C, *patch) crops of ``images`` (N, C, X, Y, Z), flipped along X where ``flips``."""
    out = []
    for i, corner, flipped in zip(index.tolist(), corners.tolist(), flips.tolist()):
        x = images[i]
        if patch is not None:
            (a, b, c), (p, q, r) = corner, patch
            x = x[:, a:a + p, b:b + q, c:c + r]
        out.append(x.flip(1) if flipped else x)
    return torch.stack(out)


def check_geometry(config, cfg: AutoencoderTrainingConfig, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The patch to crop (None = whole volume), after checking grid and patch against the autoencoder."""
    factor = config.autoencoder.downsample_factor
    if any(s % factor for s in grid):
        raise ConfigError(f"the preprocessed grid {grid} must be divisible by the autoencoder's downsampling factor "
                          f"{factor} on every axis; change the grid and preprocess again",
                          key="preprocess.ldm.grid.size")
    patch = cfg.patch_size
    if patch is not None:
        patch = tuple(int(p) for p in patch)
        if any(p % factor for p in patch) or any(p > g for p, g in zip(patch, grid)):
            raise ConfigError(f"patch_size {patch} must be a multiple of the downsampling factor {factor} and at most "
                              f"the grid {grid} on every axis", key="train_autoencoder.patch_size")
        if patch == grid:
            patch = None
    trained = patch or grid
    if cfg.ssim_weight > 0 and min(trained) < cfg.ssim_win_size:
        raise ConfigError(f"SSIM window {cfg.ssim_win_size} is larger than the trained volume {trained}",
                          key="train_autoencoder.ssim_win_size")
    if cfg.adversarial_weight > 0 and min(trained) < 2 ** (cfg.disc_layers + 2):
        # Each layer halves the side; instance norm needs > 1 voxel at the last one.
        raise ConfigError(f"a {cfg.disc_layers}-layer discriminator needs >= {2 ** (cfg.disc_layers + 2)} voxels per "
                          f"side, the trained volume is {trained}", key="train_autoencoder.disc_layers")
    return patch  # type: ignore[return-value]
