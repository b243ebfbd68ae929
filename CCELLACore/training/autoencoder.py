"""``ccella train-autoencoder``: train (or fine-tune) the MAISI-architecture autoencoder on preprocessed exams.

One process::

    ccella train-autoencoder --config demo --manifest prep/manifest.csv --out runs/ae

Several GPUs (DDP; NCCL on GPUs, gloo on CPUs)::

    torchrun --standalone --nproc_per_node=4 Training/train_autoencoder.py --config paper --manifest ... --out ...

Every sequence (AxT2, HighB, ADC) of every training exam is one single-channel sample, as in CCELLA++, where the one
autoencoder encodes each sequence separately. The objective follows MAISI's VAE training except for the perceptual
term, whose pretrained network nothing here may download (weights come only from local files): L1 + SSIM + KL, plus MONAI's
``PatchDiscriminator`` with a least-squares ``PatchAdversarialLoss`` when ``adversarial_weight > 0``.

The data are read into memory once (:mod:`.autoencoder_data`; a tiny or demo grid: a few MB per exam); the sample
order, crops and flips of step ``s`` derive from ``(seed, s)``, so a killed run started again with the same command
continues bit-identically (weights, optimisers, EMA, RNG states and the step come from ``<out>/checkpoints``).
The result is ``<out>/model``, a model directory with one component ``autoencoder`` (EMA weights when the EMA is on)
that :func:`~CCELLACore.models.autoencoder.load_autoencoder_dir` loads.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.manifest import read_manifest
from ..data.study import SEQUENCES
from ..errors import ConfigError, DataError
from .autoencoder_data import check_geometry, gather_crops, load_sequence_samples, sample_batch
from .autoencoder_losses import kl_loss, metrics_from_totals, reconstruction_metrics, weighted_l1
from .configs import AutoencoderTrainingConfig
from .checkpoint import TrainingState, config_hash, find_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistributedContext, init_distributed, run_record
from .ema import EMA
from .logs import MetricsLogger
from .schedule import polynomial_lr, set_lr
from ..precision import autocast_context, describe_device, training_dtype

__all__ = [
    "AutoencoderTrainingConfig",
    "kl_loss",
    "reconstruction_metrics",
    "train_autoencoder",
]

logger = logging.getLogger("CCELLACore")


# ------------------------------------------------------------------------------------------------------------- job
def _build_discriminator(cfg: AutoencoderTrainingConfig, in_channels: int) -> nn.Module:
    from monai.networks.nets import PatchDiscriminator

    # Instance norm as in MAISI: per-sample statistics, so DDP needs no synchronised batch norm.
    return PatchDiscriminator(spatial_dims=3, num_layers_d=cfg.disc_layers, channels=cfg.disc_channels,
                              in_channels=in_channels, out_channels=1, norm="INSTANCE")


def _resume_relevant(config, cfg: AutoencoderTrainingConfig, institution: str | None = None) -> dict:
    """What a resumed run must share with the run it continues (not max_steps or the logging intervals)."""
    relevant = {"autoencoder": config.autoencoder,
                "train": replace(cfg, max_steps=1, log_every=1, validate_every=1, checkpoint_every=1)}
    return relevant if institution is None else {**relevant, "institution": str(institution)}


def _sum_reduce(ctx: DistributedContext, value: torch.Tensor) -> torch.Tensor:
    if ctx.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def train_autoencoder(
    config,
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    max_steps: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    institution: str | None = None,
) -> Path:
    """Train (or resume) the autoencoder; returns the model directory ``<out_dir>/model``.

    Args:
        config: the root config (:class:`~CCELLACore.settings.CCELLAConfig`) with sections ``autoencoder``
            (:class:`~CCELLACore.models.autoencoder.AutoencoderConfig`; ``weights_path`` set = fine-tune those
            weights, e.g. NVIDIA's MAISI file) and ``train_autoencoder`` (:class:`AutoencoderTrainingConfig`).
        manifest_path: a manifest written by ``ccella preprocess --target ldm`` (volumes in [0, 1] on one grid).
        out_dir: the run folder: ``checkpoints/``, ``metrics.csv`` and the final ``model/``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (under torchrun each rank takes its local GPU).
        max_steps: overrides ``train_autoencoder.max_steps`` (the schedule spreads over it).
        stop_after: stop after this step with a checkpoint and without writing the model, as a kill would (to train
            a long schedule in pieces); running again continues exactly.
        progress: tqdm bar on rank 0.
        institution: train (and validate) on this institution's studies only (the manifest's ``institution``).

    Returns:
        ``<out_dir>/model`` (written only once training reached ``max_steps``).

    Raises:
        DataError: no usable exam in the training splits, or intensities not normalised to [0, 1].
        ConfigError: a grid not divisible by the downsampling factor (``preprocess.ldm.grid.size``), a bad patch.
        CCELLAError: a checkpoint written with another config, or ``weights_path`` not fitting the architecture.
    """
    from monai.losses import PatchAdversarialLoss, SSIMLoss
    from tqdm.auto import tqdm

    from ..models.autoencoder import ENCODER_PARTS, build_autoencoder

    cfg: AutoencoderTrainingConfig = config.train_autoencoder
    if not cfg.train_encoder and config.autoencoder.weights_path is None:
        raise ConfigError("a frozen encoder needs trained weights to keep: set autoencoder.weights_path",
                          key="train_autoencoder.train_encoder")
    if max_steps is not None:
        cfg = replace(cfg, max_steps=max_steps)
    ae_cfg = config.autoencoder
    out_dir = Path(out_dir)
    ctx = init_distributed(device)
    dev = ctx.device
    dtype = training_dtype(dev)
    if ctx.is_main:
        logger.info("train-autoencoder on %s, %s, world size %d", describe_device(dev),
                    str(dtype).replace("torch.", ""), ctx.world_size)

    # 1. Data: every sequence of every usable exam, in memory.
    manifest = read_manifest(manifest_path)
    for problem in manifest.problems:
        logger.warning("manifest: skipped case %s: %s", problem.case_id, problem.reason)
    sequences = tuple(getattr(config, "sequences", SEQUENCES))
    train_studies = manifest.select(cfg.train_splits, institution)
    val_studies = manifest.select((cfg.val_split,), institution) if cfg.val_split else []
    mask_weights = {name: w for name, w in (("gland", cfg.gland_weight), ("lesion", cfg.lesion_weight)) if w > 0}
    for name in mask_weights:
        if train_studies and not any(name in s.masks for s in train_studies):
            raise ConfigError(f"{name}_weight {mask_weights[name]:g} needs {name} masks, and {manifest_path} lists "
                              f"none (column {name}_mask)", key=f"train_autoencoder.{name}_weight")
    joint = ae_cfg.joint  # all sequences as the channels of one sample (the config checked they match)
    train, skipped = load_sequence_samples(train_studies, sequences, source=manifest_path, masks=tuple(mask_weights),
                                           joint=joint)
    val, val_skipped = (load_sequence_samples(val_studies, sequences, grid_size=train.grid_size, source=manifest_path,
                                              joint=joint)
                        if train is not None and val_studies else (None, []))
    if ctx.is_main:
        for case, reason in skipped + val_skipped:
            logger.warning("skipped case %s: %s", case, reason)
    if train is None:
        raise DataError("<none>", f"{manifest_path}: no usable exam in splits {list(cfg.train_splits)} "
                                  f"({len(train_studies)} listed, {len(skipped)} skipped)")
    patch = check_geometry(config, cfg, train.grid_size)
    if ctx.is_main:
        logger.info("%d training samples (%d exams x %s), %d validation samples, grid %s", len(train), train.n_exams,
                    f"{len(sequences)} sequences as channels" if joint else f"{len(sequences)} sequences",
                    0 if val is None else len(val), train.grid_size)

    # 2. Networks, optimisers, EMA (same seed on every rank; DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    model = build_autoencoder(ae_cfg, dev)  # loads ae_cfg.weights_path when set (fine-tuning)
    if ae_cfg.weights_path is not None and ctx.is_main:
        logger.info("fine-tuning from %s", Path(ae_cfg.weights_path).name)
    model.train()
    if not cfg.train_encoder:
        for name, parameter in model.named_parameters():
            if name.startswith(ENCODER_PARTS):
                parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    models: dict[str, nn.Module] = {"autoencoder": model}
    optimizers: dict[str, torch.optim.Optimizer] = {"autoencoder": optimizer}
    use_gan = cfg.adversarial_weight > 0
    if use_gan:
        disc = _build_discriminator(cfg, ae_cfg.out_channels).to(dev).train()
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        models["discriminator"], optimizers["discriminator"] = disc, disc_optimizer
        adv_loss = PatchAdversarialLoss(criterion="least_squares")
    ema = EMA(model, decay=cfg.ema_decay, warmup=True) if cfg.ema_decay > 0 else None
    # Built before the RNG is reseeded or restored from a checkpoint: its random init must not shift the noise.
    eval_model = build_autoencoder(replace(ae_cfg, weights_path=None), dev).eval() if ema else model
    torch.manual_seed(cfg.seed + 1 + ctx.rank)  # the reparameterisation noise differs per rank
    state = TrainingState(models=models, optimizers=optimizers, emas={"autoencoder": ema} if ema else {},
                          config_hash=config_hash(_resume_relevant(config, cfg, institution)))
    ckpt_dir = out_dir / "checkpoints"
    if find_checkpoint(ckpt_dir) is not None:
        load_checkpoint(ckpt_dir, state)
        if ctx.is_main:
            logger.info("resumed from %s at step %d", ckpt_dir, state.step)
    ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=cfg.ssim_win_size)
    ssim_per_volume = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=cfg.ssim_win_size, reduction="none")
    ddp_model = DistributedDataParallel(model) if ctx.is_distributed else model
    ddp_disc = DistributedDataParallel(disc) if use_gan and ctx.is_distributed else (disc if use_gan else None)

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        if ema:
            ema.copy_to(eval_model)
        was_training = model.training
        eval_model.eval()
        mine = val.images[ctx.rank:: ctx.world_size]
        totals = _sum_reduce(ctx, reconstruction_metrics(eval_model, mine, dev, dtype, ssim_per_volume))
        if was_training:
            model.train()
        return metrics_from_totals(totals.cpu())

    # 3. The loop.
    total = cfg.max_steps
    end = total if stop_after is None else min(total, stop_after)
    metrics = MetricsLogger(out_dir, enabled=ctx.is_main, resume_step=state.step if state.step else None)
    bar = tqdm(total=total, initial=state.step, desc="train-autoencoder", unit="step",
               disable=not (progress and ctx.is_main))
    last_val: dict[str, float] = {}
    while state.step < end:
        lr = polynomial_lr(cfg.lr, state.step, cfg.max_steps, cfg.lr_power)
        index, corners, flips = sample_batch(len(train), state.step, cfg.batch_size, ctx, cfg.seed, train.grid_size,
                                             patch, cfg.random_flip)
        x = gather_crops(train.images, index, corners, flips, patch).to(dev)
        error_weight = None
        for name, weight in mask_weights.items():  # 1 + w_gland [gland] + w_lesion [lesion]
            term = weight * gather_crops(train.masks[name], index, corners, flips, patch).to(dev)
            error_weight = 1.0 + term if error_weight is None else error_weight + term
        gan_on = use_gan and state.step >= cfg.adversarial_start

        set_lr(optimizer, lr)
        with autocast_context(dev, dtype):
            recon, z_mu, z_sigma = ddp_model(x)
        recon = recon.float()
        losses = {"l1": weighted_l1(recon, x, error_weight), "kl": kl_loss(z_mu, z_sigma)}
        if cfg.ssim_weight > 0:
            losses["ssim"] = ssim(recon, x)
        total_loss = cfg.l1_weight * losses["l1"] + cfg.kl_weight * losses["kl"] + cfg.ssim_weight * losses.get(
            "ssim", torch.zeros((), device=dev))
        if gan_on:
            disc.requires_grad_(False)  # the generator loss trains the autoencoder only
            with autocast_context(dev, dtype):
                logits_fake = disc(recon)[-1]
            losses["gen_adv"] = adv_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
            total_loss = total_loss + cfg.adversarial_weight * losses["gen_adv"]
            disc.requires_grad_(True)
        losses["total"] = total_loss
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()

        if gan_on:
            set_lr(disc_optimizer, lr)
            with autocast_context(dev, dtype):
                # Real and fake in one pass (instance norm: per sample), so DDP sees one forward per backward.
                logits = ddp_disc(torch.cat([x, recon.detach()]))[-1].float()
            real, fake = logits[: x.shape[0]], logits[x.shape[0]:]
            losses["disc"] = 0.5 * (adv_loss(real, target_is_real=True, for_discriminator=True)
                                    + adv_loss(fake, target_is_real=False, for_discriminator=True))
            disc_optimizer.zero_grad(set_to_none=True)
            losses["disc"].backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            disc_optimizer.step()
        if ema:
            ema.update(model)
        state.step += 1
        state.epoch = state.step * cfg.batch_size * ctx.world_size // len(train)
        bar.update(1)

        final = state.step == total
        if state.step % cfg.log_every == 0 or final:
            reduced = {k: float(ctx.all_reduce_mean(v)) for k, v in losses.items()}
            metrics.log(state.step, **{f"train_{k}": v for k, v in reduced.items()}, lr=lr,
                        grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{reduced['total']:.4f}")
        if val is not None and (state.step % cfg.validate_every == 0 or final):
            last_val = validate()
            metrics.log(state.step, **last_val)
        if state.step % cfg.checkpoint_every == 0 or final or state.step == end:
            if ctx.is_main:
                save_checkpoint(ckpt_dir, state)
            ctx.barrier()
    bar.close()
    metrics.close()
    model_dir = out_dir / "model"
    if state.step < total:
        if ctx.is_main:
            logger.info("stopped after step %d of %d; run the same command to continue", state.step, total)
        return model_dir
    if val is not None and not last_val:  # resumed at the end: the figures for the card
        last_val = validate()

    # 4. The model directory (rank 0): EMA weights, configs, grid, validation figures, machine.
    if ctx.is_main:
        from ..models.serialization import ModelMetadata, save_model_dir

        final_model = eval_model if ema else model
        if ema:
            ema.copy_to(final_model)
        saved_cfg = replace(ae_cfg, weights_path=None)  # the weights live in the directory now
        extra = {"steps": state.step, "train_exams": train.n_exams, "train_samples": len(train),
                 "val_exams": 0 if val is None else val.n_exams, "ema": bool(ema),
                 **run_record(ctx, cfg.batch_size, institution), **last_val}
        if ae_cfg.weights_path is not None:
            extra["initialised_from"] = Path(ae_cfg.weights_path).name
        metadata = ModelMetadata(sequences=sequences, grid_size=train.grid_size, spacing=train.spacing,
                                 text_encoder="", extra=extra)
        save_model_dir(model_dir, {"autoencoder": final_model}, {"autoencoder": saved_cfg, "train_autoencoder": cfg},
                       metadata, _model_card(ae_cfg, cfg, metadata, last_val, describe_device(dev), dtype))
        logger.info("wrote %s%s", model_dir, "".join(f", {k} {v:.4g}" for k, v in last_val.items()))
    ctx.barrier()
    return model_dir


def _model_card(ae_cfg, cfg: AutoencoderTrainingConfig, metadata, val: dict[str, float], machine: str,
                dtype: torch.dtype) -> str:
    extra = metadata.extra
    figures = (
        f"- Validation ({extra['val_exams']} exams, every sequence, whole volumes, posterior mean): "
        f"L1 {val['val_l1']:.4f}, PSNR {val['val_psnr']:.2f} dB, SSIM {val['val_ssim']:.4f}.\n"
        if val else "- No validation split: no reconstruction figures.\n"
    )
    start = f" starting from {extra['initialised_from']}" if "initialised_from" in extra else ""
    return (
        "# CCELLA++ sequence autoencoder (MAISI architecture)\n\n"
        + (f"- Encodes {', '.join(metadata.sequences)} together (one volume, a channel per sequence) to "
           f"{ae_cfg.total_latent_channels} latent channels, " if ae_cfg.joint else
           f"- Encodes each of {', '.join(metadata.sequences)} separately to {ae_cfg.latent_channels} latent "
           "channels, ")
        + f"{ae_cfg.downsample_factor}x smaller per axis; channels {list(ae_cfg.num_channels)}, residual blocks "
        f"{list(ae_cfg.num_res_blocks)}.\n"
        f"- Data grid: {metadata.grid_size} voxels at {metadata.spacing} mm, intensities normalised to [0, 1].\n"
        f"- Trained{start} for {extra['steps']} steps on {extra['train_samples']} volumes ({extra['train_exams']} "
        f"exams), batch {cfg.batch_size}, patch {cfg.patch_size or 'whole volume'}; loss {cfg.l1_weight} L1"
        + (f" (gland voxels x {1 + cfg.gland_weight:g})" if cfg.gland_weight else "")
        + (f" (lesion voxels + {cfg.lesion_weight:g})" if cfg.lesion_weight else "") + " + "
        f"{cfg.ssim_weight} SSIM + {cfg.kl_weight:g} KL"
        + (f" + {cfg.adversarial_weight} adversarial (from step {cfg.adversarial_start})" if cfg.adversarial_weight
           else "")
        + f"; {'EMA weights, decay ' + str(cfg.ema_decay) if extra['ema'] else 'final weights'}.\n"
        + figures
        + f"- Machine: {machine}; compute dtype {str(dtype).replace('torch.', '')}.\n"
        "- Reconstructions are not diagnostic images.\n"
    )
