"""``ccella train-ldm``: train the CCELLA adapter + U-Net on autoencoder latents of one institution's exams.

One process::

    ccella train-ldm --config demo --manifest prep/manifest.csv --autoencoder models/ae --out runs/ldm

Several GPUs or nodes (DDP; NCCL on GPUs, gloo on CPUs)::

    torchrun --standalone --nproc_per_node=4 Training/train_ldm.py --config paper --manifest ... --out ...

What it does, in order: encode the reports (cached), encode every exam's sequences with the autoencoder (cached),
compute the per-sequence latent scale factors over the whole training set, then optimise the joint loss (L1 on the
objective's target + weighted focal loss on the report class, masked to exams with a report) with AdamW, a
second-order polynomial learning rate over the real number of optimiser steps, gradient clipping, condition dropout for
classifier-free guidance and an EMA of the weights. A killed run started again with the same command resumes exactly
(weights, optimiser, scheduler, EMA, RNG, step, scale factors). The result is a model directory (EMA weights) that
:class:`~CCELLACore.pipelines.generation.CCELLAPipeline` loads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..data.manifest import read_manifest
from ..errors import ConfigError, DataError
from ..models.autoencoder import SequenceAutoencoder
from ..models.ldm import CCELLALDM, condition_dropout
from ..models.losses import ccella_loss
from ..sampling.objectives import TrainingObjective
from .configs import LDMTrainingConfig
from .checkpoint import TrainingState, config_hash, find_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistributedContext, init_distributed, run_record
from .ema import EMA
from .latents import LatentData, encode_latents, latent_stats, lesion_sides, load_latent_data, reference_intensities
from .logs import MetricsLogger
from ..precision import autocast_context, describe_device, training_dtype
from .schedule import polynomial_lr, set_lr

__all__ = ["LDMTrainingConfig", "train_ldm", "latent_batch"]

logger = logging.getLogger("CCELLACore")


def _epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    # A fresh permutation per epoch from (seed, epoch): the data order needs no state to resume.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def latent_batch(data: LatentData, step: int, batch_size: int, world_size: int, seed: int) -> torch.Tensor:
    """Indices of the GLOBAL batch (``batch_size * world_size`` exams) of optimiser step ``step``: epochs are
    permutations of all exams drawn from (seed, epoch); rank r trains on every world_size-th of them."""
    n = len(data)
    global_batch = batch_size * world_size
    steps_per_epoch = max(1, math.ceil(n / global_batch))
    epoch, k = divmod(step, steps_per_epoch)
    order = _epoch_order(n, epoch, seed)
    chunk = order[k * global_batch : (k + 1) * global_batch]
    if len(chunk) < global_batch:  # last batch of an epoch: wrap around so every rank gets a full batch
        chunk = torch.cat([chunk, order[: global_batch - len(chunk)]])
    return chunk


def _scale(latents: torch.Tensor, factors: torch.Tensor, group: int) -> torch.Tensor:
    """Multiply channel group s (``group`` channels each) by factors[s]."""
    per_channel = factors.repeat_interleave(group).to(latents)
    return latents * per_channel.view(1, -1, *([1] * (latents.ndim - 2)))


def _gather(data: LatentData, index: torch.Tensor, factors: torch.Tensor, group: int, device, lesion_weight: float):
    batch = data.read(index)  # this rank's exams only, from the on-disk caches
    return (
        _scale(batch.latents, factors, group).to(device),
        data.spacing[index].to(device),
        batch.text.features.to(device),
        batch.text.mask.to(device),
        data.labels[index].to(device),
        (data.has_report[index] & data.has_label[index]).to(device),
        (1.0 + lesion_weight * batch.lesion).to(device) if lesion_weight > 0 else None,
        lesion_sides(batch.lesion).to(device),
    )


def _step_loss(model, data, global_index, factors, group, objective, cfg, loss_cfg, null, generator, dtype, ctx,
               train: bool):
    """Loss of this rank's share of a global batch.

    Noise, timesteps and condition-dropout decisions are drawn for the WHOLE global batch from one generator that
    every rank holds in the same state, and each rank keeps its slice; the class loss is divided by the global
    number of exams with a report. So N processes compute exactly what one process computes on the global batch.
    """
    device, world = ctx.device, ctx.world_size
    g = len(global_index)
    latent_shape = (g, *data.latent_shape)
    noise = torch.randn(latent_shape, generator=generator, device=generator.device)
    t = objective.sample_timesteps(g, generator, device=generator.device, spatial_shape=tuple(latent_shape[2:]))
    dropped = torch.rand(g, generator=generator, device=generator.device) < (cfg.condition_dropout if train else 0.0)
    labelled = data.has_report[global_index] & data.has_label[global_index] & ~dropped.cpu()
    class_count = float(labelled.sum()) / world if world > 1 else None
    sided = data.has_report[global_index] & data.has_lesion_mask[global_index] & ~dropped.cpu()
    side_count = float(sided.sum()) / world if world > 1 else None

    mine = slice(ctx.rank, None, world)
    latents, spacing, text_f, text_m, labels, class_mask, weight, sides = _gather(
        data, global_index[mine], factors, group, device, loss_cfg.lesion_weight)
    if train and cfg.condition_dropout > 0:
        out = condition_dropout(text_f, text_m, null.features, null.mask, cfg.condition_dropout,
                                dropped=dropped[mine])
        text_f, text_m = out.features, out.mask
        class_mask = class_mask & ~out.dropped
    noise, t = noise[mine].to(device), t[mine].to(device)
    x_t = objective.add_noise(latents, noise, t)
    target = objective.target(latents, noise, t)
    with autocast_context(device, dtype):
        out = model(x_t, t, spacing, text_f, text_m)
    return ccella_loss(out.prediction.float(), target, out.class_logits.float(), labels, class_mask,
                       class_loss_weight=loss_cfg.class_loss_weight, focal_alpha=loss_cfg.focal_alpha,
                       focal_gamma=loss_cfg.focal_gamma, class_count=class_count, voxel_weight=weight,
                       side_logits=out.side_logits, side_labels=sides, side_mask=sided[mine].to(device),
                       side_loss_weight=loss_cfg.side_loss_weight, side_count=side_count)


@torch.no_grad()
def _validation_loss(model, data, factors, group, objective, cfg, loss_cfg, null, dtype, device) -> dict[str, float]:
    """Mean loss over the validation exams at fixed noise and timesteps (comparable across evaluations); computed on
    the main process only."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    single = DistributedContext(device=device)
    totals: dict[str, float] = {}
    n = 0
    for start in range(0, len(data), cfg.batch_size):
        index = torch.arange(start, min(start + cfg.batch_size, len(data)))
        losses = _step_loss(model, data, index, factors, group, objective, cfg, loss_cfg, null, generator, dtype,
                            single, train=False)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(index)
        n += len(index)
    model.train()
    return {f"val_{k}": v / n for k, v in totals.items()}


def train_ldm(
    config,
    manifest_path: str | Path,
    autoencoder_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    max_steps: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    model_card: str = "",
    init: str | Path | None = None,
    institution: str | None = None,
    init_new_autoencoder: bool = False,
) -> Path | None:
    """Train (or resume) a CCELLA++ diffusion model; returns the model directory ``<out_dir>/model``.

    Args:
        config: a :class:`~CCELLACore.settings.CCELLAConfig` (sections ``text_encoder``, ``ldm``, ``diffusion``,
            ``loss``, ``train_ldm``, ``sequences``).
        manifest_path: a manifest written by ``ccella preprocess --target ldm`` (normalised volumes on one grid).
        autoencoder_dir: a model directory holding an ``autoencoder`` component (``ccella train-autoencoder``).
        out_dir: the run folder: caches, checkpoints, ``metrics.csv`` and the final ``model``.
        max_steps: overrides ``train_ldm.max_steps``, the total length of the run (it sets the LR schedule).
        stop_after: stop (with a checkpoint) once the run has reached this step, as if killed there; the same call
            without it resumes. For time-boxed sessions on small machines.
        init: a CCELLA++ model directory whose adapter + U-Net weights and latent scale factors start the run
            (fine-tuning; the same autoencoder must be given). The U-Net may take more inputs than the initial
            model's (coordinate maps): those start at zero (:func:`~CCELLACore.models.ldm.load_grown_state`).
        init_new_autoencoder: allow ``init`` to have been trained on another autoencoder's latents (one whose
            encoder was fine-tuned from that autoencoder, so its latent space moved but did not change): the scale
            factors are then computed afresh over the training set, so the U-Net again sees unit-scale latents.
        institution: train (and validate) on this institution's studies only (the manifest's ``institution``).

    Returns:
        The model directory, or None when the run stopped early (``stop_after``).
    """
    from tqdm.auto import tqdm

    from ..models.autoencoder import load_autoencoder_dir
    from ..models.encode_cli import EncodingCache, encode_manifest
    from ..models.serialization import ModelMetadata, component_hash, save_model_dir

    cfg: LDMTrainingConfig = config.train_ldm
    if max_steps is not None:
        cfg = replace(cfg, max_steps=max_steps)
    out_dir = Path(out_dir)
    ctx = init_distributed(device)
    dev = ctx.device
    dtype = training_dtype(dev)
    torch.manual_seed(cfg.seed)
    if ctx.is_main:
        logger.info("train-ldm on %s, %s, world size %d", describe_device(dev), str(dtype).replace("torch.", ""),
                    ctx.world_size)

    manifest = read_manifest(manifest_path)
    for problem in manifest.problems:
        logger.warning("manifest: skipped case %s: %s", problem.case_id, problem.reason)
    sequences = tuple(config.sequences)
    train_studies = manifest.select(cfg.train_splits, institution)
    val_studies = manifest.select((cfg.val_split,), institution) if cfg.val_split else []
    if not train_studies:
        raise DataError("<none>", f"{manifest_path}: no exam in splits {list(cfg.train_splits)}"
                        + (f" of institution {institution}" if institution is not None else ""))

    # 1. Reports -> token features (cached; rank 0 writes, the others wait).
    text_dir = out_dir / "cache" / "text"
    if ctx.is_main:
        encode_manifest(manifest_path, config.text_encoder, text_dir, device=dev)
    ctx.barrier()
    cache = EncodingCache(text_dir)
    feature_dim = cache.feature_dim
    if feature_dim != config.ldm.adapter.input_dim:
        raise ConfigError(f"the text encoder gives {feature_dim}-d features but the adapter expects "
                          f"{config.ldm.adapter.input_dim}", key="ldm.adapter.input_dim")
    max_tokens = cache.max_tokens
    null = cache.load_null(max_tokens)

    # 2. Exams -> autoencoder latents (cached, shared over ranks).
    autoencoder_model, ae_meta = load_autoencoder_dir(autoencoder_dir, dev)
    autoencoder = SequenceAutoencoder(autoencoder_model, dev)
    latent_dir = out_dir / "cache" / "latents"
    problems = encode_latents(train_studies + val_studies, autoencoder, latent_dir, ctx, sequences, progress)
    bad = {case for case, _ in problems}
    for case, reason in problems:
        logger.warning("skipped case %s: %s", case, reason)
    train_studies = [s for s in train_studies if s.case_id not in bad]
    val_studies = [s for s in val_studies if s.case_id not in bad]
    train = load_latent_data(train_studies, latent_dir, cache)
    val = load_latent_data(val_studies, latent_dir, cache) if val_studies else None
    channels = train.latent_shape[0]
    group = channels // len(sequences)
    if channels != config.ldm.unet.in_channels:
        raise ConfigError(f"latents have {channels} channels ({len(sequences)} sequences x {group}) "
                          f"but the U-Net takes {config.ldm.unet.in_channels}", key="ldm.unet.in_channels")
    side = config.ldm.unet.downsampling_factor
    if any(s % side for s in train.latent_shape[1:]):
        raise ConfigError(f"latent size {tuple(train.latent_shape[1:])} must be a multiple of {side} on every axis "
                          "(the U-Net halves it per level); change the preprocess grid", key="preprocess.ldm.grid.size")

    # 3. Model, optimiser, schedule, EMA.
    model = CCELLALDM(config.ldm)
    init_hash, init_factors = None, None
    new_autoencoder = {"init_new_autoencoder": True} if init_new_autoencoder else {}  # in the run's hash and record
    if init is not None:
        init_hash, init_factors = _initialise(model, init, autoencoder_dir, sequences, ctx.is_main,
                                              init_new_autoencoder)
    model = model.to(dev)
    objective = TrainingObjective.from_config(config.diffusion)
    steps_per_epoch = max(1, math.ceil(len(train) / (cfg.batch_size * ctx.world_size)))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, decay=cfg.ema_decay, warmup=True)
    # The same state on every rank (see _step_loss): results do not depend on the number of processes.
    noise_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
    state = TrainingState(
        models={"ldm": model}, optimizers={"adamw": optimizer}, emas={"ldm": ema},
        generators={"noise": noise_gen},
        config_hash=config_hash({**_resume_relevant(config, cfg, institution), "init": init_hash,
                                 **new_autoencoder}),
    )

    # 4. Resume, or compute the scale factors over the whole training set.
    ckpt_dir = out_dir / "checkpoints"
    if find_checkpoint(ckpt_dir) is not None:
        load_checkpoint(ckpt_dir, state)
        if ctx.is_main:
            logger.info("resumed from %s at step %d", ckpt_dir, state.step)
    if state.scale_factors is None and init_factors is not None:
        state.scale_factors = init_factors  # the latent space the initial weights learned
    if state.scale_factors is None:
        state.scale_factors = latent_stats(train, sequences, ctx).scale_factors()
    factors = torch.tensor([state.scale_factors[s] for s in sequences])

    ddp_model = DistributedDataParallel(model) if ctx.is_distributed else model
    metrics = MetricsLogger(out_dir, enabled=ctx.is_main, resume_step=state.step if state.step else None)
    bar = tqdm(total=total_steps, initial=state.step, desc="train-ldm", unit="step",
               disable=not (progress and ctx.is_main))
    model.train()
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    while state.step < end:
        lr = polynomial_lr(cfg.lr, state.step, total_steps, cfg.lr_power, cfg.warmup_steps)
        set_lr(optimizer, lr)
        global_index = latent_batch(train, state.step, cfg.batch_size, ctx.world_size, cfg.seed)
        losses = _step_loss(ddp_model, train, global_index, factors, group, objective, cfg, config.loss, null,
                            noise_gen, dtype, ctx, train=True)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            # Stop rather than corrupt the weights; the last checkpoint is intact.
            raise FloatingPointError(f"train-ldm: non-finite gradient at step {state.step + 1} (loss "
                                     f"{float(losses['total']):.4g}); lower train_ldm.lr or use fp32")
        optimizer.step()
        ema.update(model)
        state.step += 1
        state.epoch = state.step // steps_per_epoch
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            reduced = {k: float(ctx.all_reduce_mean(v)) for k, v in losses.items()}
            metrics.log(state.step, **{f"train_{k}": v for k, v in reduced.items()}, lr=lr,
                        grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{reduced['total']:.4f}")
        if val is not None and ctx.is_main and (state.step % cfg.validate_every == 0 or state.step == total_steps):
            metrics.log(state.step, **_validation_loss(model, val, factors, group, objective, cfg, config.loss, null,
                                                       dtype, dev))
        if state.step % cfg.checkpoint_every == 0 or state.step in (end, total_steps):
            if ctx.is_main:
                save_checkpoint(ckpt_dir, state)
            ctx.barrier()
    bar.close()
    metrics.close()
    if state.step < total_steps:
        if ctx.is_main:
            logger.info("stopped at step %d of %d; run the same command again to resume", state.step, total_steps)
        return None

    # 5. The model directory: EMA weights, autoencoder, scale factors, reference intensities, grid, objective.
    model_dir = out_dir / "model"
    if ctx.is_main:
        sampling_model = CCELLALDM(config.ldm)
        ema.copy_to(sampling_model)
        grid = config.preprocess.ldm.grid
        metadata = ModelMetadata(
            objective=config.diffusion.objective,
            sequences=sequences,
            latent_scale_factors=dict(state.scale_factors),
            reference_intensities=reference_intensities(train_studies, sequences),
            grid_size=tuple(grid.size),
            spacing=tuple(float(s) for s in train.spacing.median(0).values.tolist()),
            text_encoder=config.text_encoder.name_or_path,
            extra={"steps": state.step, "train_exams": len(train),
                   "autoencoder_hash": component_hash(autoencoder_dir, "autoencoder"),
                   "max_tokens": max_tokens, "steps_per_epoch": steps_per_epoch, "initialised_from": init_hash,
                   **new_autoencoder,
                   **run_record(ctx, cfg.batch_size, institution)},
        )
        save_model_dir(model_dir, {"ldm": sampling_model, "autoencoder": autoencoder_model}, config, metadata,
                       model_card or _default_card(config, metadata, len(train)))
    ctx.barrier()
    return model_dir


def _initialise(model: CCELLALDM, init: str | Path, autoencoder_dir: str | Path, sequences, verbose: bool,
                new_autoencoder: bool = False):
    """Start ``model`` from the LDM weights of model directory ``init``; returns (its hash, its scale factors), the
    factors None where they must be computed afresh (another autoencoder's latents)."""
    from ..models.ldm import load_grown_state
    from ..models.serialization import component_hash, load_model_dir, model_hash

    _, meta, states = load_model_dir(init)
    if "ldm" not in states:
        raise ConfigError(f"{init}: not a CCELLA++ diffusion model (no 'ldm' component)", key="--init")
    same = meta.get("extra", {}).get("autoencoder_hash") in (None, component_hash(autoencoder_dir, "autoencoder"))
    if not same and not new_autoencoder:
        raise ConfigError(f"{init} was trained on the latents of another autoencoder than {autoencoder_dir} (give "
                          "--init-new-autoencoder if that one's encoder was fine-tuned from it)", key="--init")
    grown = load_grown_state(model, states["ldm"], str(init))
    if verbose:
        logger.info("initialised from %s%s", init, f" (zero-initialised new inputs of {', '.join(grown)})"
                    if grown else "")
    factors = meta.get("latent_scale_factors") if same else None  # other latents: their own scale
    if not same and verbose:
        logger.info("%s was trained on another autoencoder's latents: scale factors computed afresh", init)
    # load_model_dir has checked the files against the recorded hash; hash them only where none is recorded.
    return meta.get("model_hash") or model_hash(init), ({s: float(factors[s]) for s in sequences} if factors else None)


def _resume_relevant(config, cfg: LDMTrainingConfig, institution: str | None = None):
    """The config parts a resumed run must share with the run it continues (not max_steps: a run may be extended,
    which re-spreads the LR schedule over the new total)."""
    relevant = {"ldm": config.ldm, "diffusion": config.diffusion, "loss": config.loss,
                "train": replace(cfg, max_steps=0, log_every=1, validate_every=1, checkpoint_every=1)}
    return relevant if institution is None else {**relevant, "institution": str(institution)}


def _default_card(config, metadata, n_train: int) -> str:
    return (
        "# CCELLA++ latent diffusion model\n\n"
        f"- Sequences: {', '.join(metadata.sequences)}; objective: {metadata.objective}.\n"
        f"- Output grid: {metadata.grid_size} voxels at {metadata.spacing} mm.\n"
        f"- Text encoder: {metadata.text_encoder}.\n"
        f"- Trained on {n_train} exams for {metadata.extra['steps']} steps.\n"
        "- Outputs are synthetic and must not be used for diagnosis.\n"
    )
