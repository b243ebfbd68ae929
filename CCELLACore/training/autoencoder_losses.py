"""The autoencoder's KL term and its validation metrics (L1, PSNR, SSIM), for :mod:`.autoencoder`."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import autocast_context

__all__ = ["kl_loss", "weighted_l1", "reconstruction_metrics", "metrics_from_totals"]


def weighted_l1(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error, weighted per voxel where ``weight`` is given (sum(w |e|) / sum(w)).

    Args:
        recon, target: (B, 1, x, y, z).
        weight: None or positive weights broadcastable to them (the gland-weighted L1: 1 outside, 1 + w inside).
    """
    error = (recon - target).abs()
    if weight is None:
        return error.mean()
    weight = weight.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum()


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, sigma^2) from N(0, I), summed over latent voxels and averaged over the batch (MAISI).

    Args:
        z_mu, z_sigma: (B, C, x, y, z).
    """
    var = z_sigma.float().pow(2)
    kl = 0.5 * (z_mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.sum(dim=tuple(range(1, kl.ndim))).mean()


@torch.no_grad()
def reconstruction_metrics(model: nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                           ssim: nn.Module) -> torch.Tensor:
    """Sums over whole volumes of L1, PSNR (dB, data range 1) and SSIM, and their count, reconstructing from the
    posterior mean (no sampling, so validation draws no random numbers).

    Args:
        images: (N, 1, X, Y, Z) in [0, 1].

    Returns:
        (4,) float64 tensor ``[sum L1, sum PSNR, sum SSIM, N]`` on ``device`` (ready for a DDP sum-reduce).
    """
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for i in range(images.shape[0]):
        x = images[i:i + 1].to(device)
        with autocast_context(device, dtype):
            z_mu, _ = model.encode(x)
            recon = model.decode(z_mu)
        recon = recon.float().clamp(0.0, 1.0)
        mse = (recon - x).pow(2).mean().clamp_min(1e-10)
        totals[0] += (recon - x).abs().mean().double()
        totals[1] += (10.0 * torch.log10(1.0 / mse)).double()
        totals[2] += (1.0 - ssim(recon, x)).double().sum()
        totals[3] += 1
    return totals


def metrics_from_totals(totals: torch.Tensor) -> dict[str, float]:
    n = max(float(totals[3]), 1.0)
    return {"val_l1": float(totals[0]) / n, "val_psnr": float(totals[1]) / n, "val_ssim": float(totals[2]) / n}
