"""Distil a light decoder from a model folder's full MAISI decoder (``ccella distill-decoder``).

The student (:class:`~CCELLACore.models.light_decoder.LightDecoder`, 4x fewer channels by default) learns to map
latents to what the FULL decoder makes of them (L1 to the teacher's output), not to the original images: it is a
cheaper way to compute the same function, judged against the decoder it replaces. Latents are the posterior means of
the manifest's volumes under the model's own encoder; the exams are split by case into training and held-out sets
(seeded), and the held-out latents give the figures recorded in ``model.json["light_decoder"]``: PSNR and SSIM of
student vs full decoder, and their decode times on this machine.

Long runs resume exactly (checkpoints in ``<work>/checkpoints``; each step's crops come from a generator seeded by
the step, so nothing about the data order needs saving).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..errors import CCELLAError, DataError
from ..fileio import atomic_write_json
from ..models.autoencoder import AutoencoderConfig, build_autoencoder
from ..models.light_decoder import (LIGHT_COMPONENT, LightDecoder, LightDecoderConfig, SequenceCodec, light_record)
from ..models.serialization import add_component, load_model_dir, read_model_config
from ..precision import autocast_context, describe_device, training_dtype
from .checkpoint import TrainingState, config_hash, find_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["DistillConfig", "distill_decoder", "decoder_agreement"]

logger = logging.getLogger("CCELLACore")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run.

    Args:
        steps: optimiser steps.
        batch_size: latent crops per step.
        crop: latent crop (x, y, z) per sample; None = whole latents (small grids). 16^3 latent voxels = 64^3 voxels.
        lr: AdamW learning rate (constant; the student is small).
        held_out: fraction of exams kept out of training for the quality figures (at least one exam).
        channel_divisor: student channels = teacher channels / this (ignored when ``num_channels`` is given).
        num_channels: student channels per level, finest first (paper: [16, 32, 64]).
        checkpoint_every: steps between checkpoints.
        seed: seeds the student's initialisation, the held-out split and every step's crops.
    """

    steps: int = 2000
    batch_size: int = 4
    crop: tuple[int, int, int] | None = (16, 16, 16)
    lr: float = 1e-3
    held_out: float = 0.2
    channel_divisor: int = 4
    num_channels: tuple[int, ...] | None = None
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.checkpoint_every, self.channel_divisor) < 1:
            raise CCELLAError("steps, batch_size, checkpoint_every and channel_divisor must be >= 1")
        if not 0.0 < self.held_out < 1.0:
            raise CCELLAError(f"held_out must be a fraction in (0, 1), got {self.held_out}")


def _load_teacher(model_dir: Path) -> tuple[torch.nn.Module, AutoencoderConfig, dict[str, Any]]:
    raw = read_model_config(model_dir)
    ae_raw = raw.get("autoencoder")
    if not isinstance(ae_raw, dict):
        raise CCELLAError(f"{model_dir}/config.yaml: no 'autoencoder' section; distill-decoder needs a model folder "
                          "with an autoencoder (train-autoencoder or train-ldm output)")
    ae_cfg = from_dict(AutoencoderConfig, {k: v for k, v in ae_raw.items() if k != "weights_path"},
                       file=model_dir / "config.yaml")
    teacher = build_autoencoder(ae_cfg, "cpu")
    _, metadata, _ = load_model_dir(model_dir, {"autoencoder": teacher})
    return teacher.eval(), ae_cfg, metadata


def _latents(teacher, manifest_path: Path, sequences: tuple[str, ...], device, dtype, seed: int, held_out: float,
             joint: bool = False):
    """Posterior-mean latents (N, 4C, x, y, z) of every sequence (C = 1) of every usable exam, or of every exam
    (C = its sequences, a joint autoencoder), split by case."""
    from ..data.manifest import read_manifest
    from .autoencoder_data import load_sequence_samples

    manifest = read_manifest(manifest_path)
    samples, skipped = load_sequence_samples(manifest.studies, sequences, source=manifest_path, joint=joint)
    for case, reason in skipped:
        logger.warning("distill-decoder: skipped case %s: %s", case, reason)
    if samples is None or samples.n_exams < 2:
        raise DataError(str(manifest_path), "distill-decoder needs at least 2 usable exams (training + held out)")
    codec = SequenceCodec(teacher, device, dtype)
    latents = torch.cat([codec.encode(samples.images[i:i + 1]).cpu() for i in range(len(samples))])
    cases = sorted({case for case, _ in samples.names})
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(1, round(held_out * len(cases)))
    held = {cases[i] for i in order[:n_held]}
    is_held = torch.tensor([case in held for case, _ in samples.names])
    return latents[~is_held], latents[is_held], len(cases) - n_held, n_held


def _batch(latents: torch.Tensor, step: int, cfg: DistillConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    index = torch.randint(len(latents), (cfg.batch_size,), generator=g)
    if cfg.crop is None:
        return latents[index]
    size = latents.shape[2:]
    crop = [min(c, s) for c, s in zip(cfg.crop, size)]
    out = []
    for i in index.tolist():
        corner = [int(torch.randint(s - c + 1, (1,), generator=g)) for c, s in zip(crop, size)]
        out.append(latents[i, :, corner[0]:corner[0] + crop[0], corner[1]:corner[1] + crop[1],
                           corner[2]:corner[2] + crop[2]])
    return torch.stack(out)


@torch.no_grad()
def decoder_agreement(teacher_decode, student_decode, latents: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB, data range 1) and SSIM (3D) of the student's volumes against the teacher's, both clamped to
    [0, 1] as generation clamps them, and each decoder's mean seconds per volume."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    seconds = {"teacher": 0.0, "student": 0.0}
    for i in range(len(latents)):
        z = latents[i:i + 1]
        started = time.perf_counter()
        ref = teacher_decode(z).float().clamp(0, 1).cpu()
        seconds["teacher"] += time.perf_counter() - started
        started = time.perf_counter()
        out = student_decode(z).float().clamp(0, 1).cpu()
        seconds["student"] += time.perf_counter() - started
        psnr(out, ref)
        ssim(out, ref)
    n = len(latents)
    psnr_db = float(psnr.aggregate().item())
    return {"psnr_db": round(psnr_db if math.isfinite(psnr_db) else 99.0, 3),
            "ssim": round(float(ssim.aggregate().item()), 5), "volumes": n,
            "full_decode_s": round(seconds["teacher"] / n, 4), "light_decode_s": round(seconds["student"] / n, 4)}


def distill_decoder(model_dir: str | Path, manifest_path: str | Path, work_dir: str | Path,
                    cfg: DistillConfig = DistillConfig(), *, device: str = "auto", stop_after: int | None = None,
                    progress: bool = True) -> dict[str, Any] | None:
    """Train the light decoder and add it to ``model_dir``; returns its ``model.json`` record.

    Args:
        model_dir: a model folder with an ``autoencoder`` component (its decoder is the teacher).
        manifest_path: a ``ccella preprocess --target ldm`` manifest on the model's grid.
        work_dir: checkpoints (resume) and ``distill.json`` (the record, also written on success).
        stop_after: stop with a checkpoint after this step, writing nothing into the model (time-boxed sessions);
            returns None then.

    Raises:
        DataError: fewer than 2 usable exams. CCELLAError: no autoencoder, a checkpoint of other settings.
    """
    from tqdm.auto import tqdm

    model_dir, work_dir = Path(model_dir), Path(work_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    dtype = training_dtype(dev)
    teacher, ae_cfg, metadata = _load_teacher(model_dir)
    teacher = teacher.to(dev)
    light_cfg = LightDecoderConfig.from_teacher(ae_cfg, cfg.channel_divisor, cfg.num_channels)
    sequences = tuple(metadata.get("sequences", ("AxT2", "HighB", "ADC")))
    train, held, n_train, n_held = _latents(teacher, Path(manifest_path), sequences, dev, dtype, cfg.seed,
                                            cfg.held_out, joint=ae_cfg.joint)
    logger.info("distill-decoder on %s: student %s from teacher %s; %d training / %d held-out exams",
                describe_device(dev), list(light_cfg.num_channels), list(ae_cfg.num_channels), n_train, n_held)
    torch.manual_seed(cfg.seed)
    student = LightDecoder(light_cfg).to(dev)
    optimiser = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = TrainingState(models={LIGHT_COMPONENT: student}, optimizers={"student": optimiser},
                          config_hash=config_hash({"distill": cfg, "light": light_cfg,
                                                   "teacher": metadata.get("model_hash", "")}))
    checkpoints = work_dir / "checkpoints"
    if find_checkpoint(checkpoints) is not None:
        load_checkpoint(checkpoints, state)
        logger.info("distill-decoder: resumed at step %d", state.step)
    last = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    bar = tqdm(total=last, initial=state.step, desc="distill", unit="step", disable=not progress)
    student.train()
    while state.step < last:
        z = _batch(train, state.step, cfg).to(dev)
        with torch.no_grad(), autocast_context(dev, dtype):
            target = teacher.decode(z).float()
        with autocast_context(dev, dtype):
            loss = (student(z).float() - target).abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        state.step += 1
        bar.update(1)
        bar.set_postfix(l1=f"{loss.item():.4f}")
        if state.step % cfg.checkpoint_every == 0 or state.step == last:
            save_checkpoint(checkpoints, state)
    bar.close()
    if state.step < cfg.steps:
        return None
    student.eval()
    full = SequenceCodec(teacher, dev, dtype)
    light = SequenceCodec(teacher, dev, dtype, light_decoder=student)
    quality = decoder_agreement(full.decode, light.decode, held)
    quality.update(held_out_exams=n_held, training_exams=n_train, steps=cfg.steps, machine=describe_device(dev))
    record = light_record(light_cfg, quality)
    add_component(model_dir, LIGHT_COMPONENT, student, record)
    atomic_write_json(work_dir / "distill.json", record)
    return record


def with_overrides(cfg: DistillConfig, **overrides: Any) -> DistillConfig:
    """``cfg`` with the given non-None fields replaced (CLI options)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
