"""Optimisation settings of the two training jobs (``train_autoencoder:`` and ``train_ldm:`` in a config), validated
into frozen dataclasses; :mod:`CCELLACore.settings` reads them from YAML with errors naming the key and file."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AutoencoderTrainingConfig", "LDMTrainingConfig"]


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    """Optimisation settings of the autoencoder; defaults follow MAISI's VAE training (NV-Generate-CTMR) where it has
    a value, and say so where they differ.

    Attributes:
        batch_size: samples (single-sequence volumes or patches) per process and step (MAISI: 1 per GPU).
        max_steps: optimiser steps; the learning rate schedule spreads over exactly this many.
        lr: AdamW learning rate (MAISI: 1e-4).
        weight_decay: AdamW weight decay (MAISI uses Adam, i.e. 0).
        lr_power: polynomial decay ``lr * (1 - step / max_steps) ** lr_power`` over the real step count.
        grad_clip: max gradient norm of the autoencoder (and of the discriminator).
        patch_size: random crop (X, Y, Z) per sample, each a multiple of the autoencoder's downsampling factor and at
            most the grid; None trains on whole volumes. MAISI: 64^3 patches; validation always uses whole volumes.
        l1_weight: weight of the L1 reconstruction loss (MAISI's "recon_loss: l1", weight 1).
        gland_weight: 0 = plain L1; > 0 = voxels inside the exam's gland mask weigh ``1 + gland_weight`` in the L1
            (a weighted mean). The gland is a fifth of a gland-centred grid and all a report describes; with plain
            L1 the error there is the same as in fat and muscle. Needs gland masks in the manifest.
        lesion_weight: likewise for voxels inside the exam's lesion mask (added to the gland's): lesions are well
            under 1% of a volume and what the report describes first. Exams without a lesion mask count none.
        ssim_weight: weight of MONAI's ``SSIMLoss(spatial_dims=3)`` (``1 - SSIM``, Gaussian window). It replaces
            MAISI's perceptual loss (weight 0.3; its pretrained network cannot be downloaded) at the same weight.
            SSIM rather than MS-SSIM: 5-scale MS-SSIM with an 11-voxel window needs >= 161 voxels per side, more
            than a 64^3 patch or the demo's 32 slices, and MONAI has MS-SSIM only as a metric, not a loss.
        ssim_win_size: SSIM window side in voxels (Wang et al. and MONAI: 11); every trained side must be >= it.
        kl_weight: weight of the KL divergence to N(0, I) (MAISI: 1e-7; keeps latents near unit scale without
            costing detail).
        adversarial_weight: 0 = no discriminator (default: a GAN doubles the cost and needs care on small data);
            > 0 adds MONAI's ``PatchDiscriminator`` (MAISI's: 3 layers, 32 channels, instance norm) with a
            least-squares ``PatchAdversarialLoss`` and its own AdamW optimiser (MAISI: weight 0.1).
        adversarial_start: steps of reconstruction-only training before the discriminator starts (so it does not
            train against random reconstructions).
        disc_channels / disc_layers: discriminator width and depth (MAISI: 32 / 3).
        ema_decay: EMA of the weights saved as the model; 0 = no EMA (the final weights are saved).
        train_splits / val_split: manifest splits trained on, and the split validated on ("" = no validation).
        log_every / validate_every / checkpoint_every: in optimiser steps (the last step always does all three).
        seed: base seed (weights, sample order, crops, flips, the latent noise).
        random_flip: flip each sample left-right (axis 0, the patient's L-R axis on the LPS-oriented grid) with
            probability 0.5; the anatomy is roughly symmetric, and the other axes are not.
        train_encoder: False = the encoder (and its latent heads) stays as loaded and only the decoder learns:
            the latent space, and so any diffusion model trained on it, stays valid (fine-tuning a decoder with
            ``autoencoder.weights_path``).
    """

    batch_size: int = 1
    max_steps: int = 100_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_power: float = 2.0
    grad_clip: float = 1.0
    patch_size: tuple[int, int, int] | None = (64, 64, 64)
    l1_weight: float = 1.0
    gland_weight: float = 0.0
    lesion_weight: float = 0.0
    ssim_weight: float = 0.3
    ssim_win_size: int = 11
    kl_weight: float = 1e-7
    adversarial_weight: float = 0.0
    adversarial_start: int = 10_000
    disc_channels: int = 32
    disc_layers: int = 3
    ema_decay: float = 0.999
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    log_every: int = 10
    validate_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    random_flip: bool = True
    train_encoder: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every", "validate_every", "checkpoint_every", "disc_channels",
                     "disc_layers", "ssim_win_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.lr_power < 0 or not self.grad_clip > 0:
            raise ValueError("lr and grad_clip must be > 0, weight_decay and lr_power >= 0")
        for name in ("l1_weight", "gland_weight", "lesion_weight", "ssim_weight", "kl_weight", "adversarial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight == 0 and self.ssim_weight == 0:
            raise ValueError("l1_weight and ssim_weight are both 0: nothing would teach reconstruction")
        if self.adversarial_start < 0:
            raise ValueError(f"adversarial_start must be >= 0, got {self.adversarial_start}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 3 positive sizes or null, got {self.patch_size}")
        if not self.train_splits:
            raise ValueError("train_splits must name at least one split")
        if self.val_split and self.val_split in self.train_splits:
            raise ValueError(f"val_split '{self.val_split}' is also a training split")


@dataclass(frozen=True)
class LDMTrainingConfig:
    """Optimisation settings of the diffusion model; defaults are the paper's.

    Attributes:
        batch_size: exams per process and step (paper: 8 per GPU; the global batch is 8 x world size).
        epochs: passes over the training exams (paper: 800 for CCELLA++); the step count is
            ``epochs * ceil(N / global batch)``, used by the LR schedule.
        max_steps: when > 0, train exactly this many optimiser steps instead (demo and tests).
        lr / weight_decay: AdamW (paper 1e-4, torch default 0.01).
        lr_power: polynomial decay power over the real step count (paper 2).
        warmup_steps: linear learning-rate warm-up over the first steps (paper 0).
        grad_clip: max gradient norm (paper 1.0).
        ema_decay: EMA of the weights used for sampling (the reference has none).
        condition_dropout: probability of training an exam with the null report, which classifier-free guidance
            needs (paper: 0, the reference has none, so its models cannot use guidance; the demo uses 0.1).
        train_splits: manifest splits trained on (paper: train + val, "trained to completion").
        val_split: split for the validation loss ("" = none, as in the paper).
        log_every / validate_every / checkpoint_every: in optimiser steps.
        seed: seed of the initial weights, the data order and the noise (the same on every rank).
    """

    batch_size: int = 8
    epochs: int = 800
    max_steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_power: float = 2.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    condition_dropout: float = 0.0
    train_splits: tuple[str, ...] = ("train", "val")
    val_split: str = ""
    log_every: int = 10
    validate_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "log_every", "validate_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("max_steps and warmup_steps must be >= 0 and lr > 0")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.val_split and self.val_split in self.train_splits:
            raise ValueError(f"val_split '{self.val_split}' is also a training split")
