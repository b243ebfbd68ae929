"""Training-side noising and regression targets for the two objectives a CCELLA++ model can be trained with.

- ``"epsilon"`` (the paper): DDPM forward process on the paper's scaled-linear schedule,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, t ~ U{0..T-1}; the model predicts the noise.
- ``"velocity"`` (rectified flow, MONAI ``RFlowScheduler``): ``x_t = (1 - t/T) x0 + (t/T) noise``; the model predicts
  the velocity ``x0 - noise`` (MONAI's sign: its sampler steps ``x += v * (t - t_next) / T`` from noise to data).

Noising uses MONAI's schedulers; timestep sampling is ours because MONAI's ``sample_timesteps`` draws from the global
RNG, and every random draw here goes through the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

__all__ = ["NoiseScheduleConfig", "TrainingObjective", "EpsilonObjective", "VelocityObjective", "OBJECTIVES"]

#: The two prediction targets a model can record.
OBJECTIVES = ("epsilon", "velocity")

# MONAI NoiseSchedules that take beta_start/beta_end; "cosine" takes neither.
_BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """Noise schedule and training objective of a diffusion model (defaults = the paper's DDPM).

    Args:
        objective: ``"epsilon"`` (noise prediction, the paper) or ``"velocity"`` (rectified flow).
        num_train_timesteps: T, number of training timesteps (paper 1000).
        schedule: MONAI ``NoiseSchedules`` name for the epsilon objective (paper ``"scaled_linear_beta"``:
            betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2).
        beta_start: first beta (paper 0.0015).
        beta_end: last beta (paper 0.0195); alphas_cumprod then runs 0.9985 -> 1.42e-4 (not zero terminal SNR).
        use_discrete_timesteps: rectified flow only: integer timesteps (MONAI ``RFlowScheduler`` option).
        sample_method: rectified flow only: training-time distribution of t, ``"uniform"`` or ``"logit-normal"``.
        loc: rectified flow, logit-normal location.
        scale: rectified flow, logit-normal scale.
        use_timestep_transform: rectified flow only: shift timesteps towards the noisy end for volumes larger than
            ``base_img_size_numel`` (MAISI's resolution-dependent shift); needs the latent size at sampling.
        base_img_size_numel: reference latent voxel count of the shift (MONAI default 32*32*32).
        spatial_dim: spatial dimensions of the latent (3).

    MONAI 1.6.1's ``RFlowScheduler`` ignores its own ``transform_scale`` (neither ``sample_timesteps`` nor
    ``set_timesteps`` passes it on), so it is not offered here: training and sampling use the same shift.

    Rectified-flow defaults follow MAISI's rectified-flow model (continuous timesteps, uniform t, timestep
    transform on); the paper itself trains epsilon only.
    """

    objective: Literal["epsilon", "velocity"] = "epsilon"
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    use_discrete_timesteps: bool = False
    sample_method: Literal["uniform", "logit-normal"] = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    use_timestep_transform: bool = True
    base_img_size_numel: int = 32 * 32 * 32
    spatial_dim: int = 3

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.schedule not in (*_BETA_SCHEDULES, "cosine"):
            raise ValueError(f"schedule must be one of {[*_BETA_SCHEDULES, 'cosine']}, got {self.schedule!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"sample_method must be 'uniform' or 'logit-normal', got {self.sample_method!r}")
        if self.scale <= 0 or self.base_img_size_numel < 1:
            raise ValueError("scale and base_img_size_numel must be positive")
        if self.spatial_dim not in (2, 3):
            raise ValueError(f"spatial_dim must be 2 or 3, got {self.spatial_dim}")

    def schedule_kwargs(self) -> dict:
        """Keyword arguments shared by MONAI's ``DDPMScheduler`` and ``DDIMScheduler``."""
        kwargs: dict = {"num_train_timesteps": self.num_train_timesteps, "schedule": self.schedule}
        if self.schedule in _BETA_SCHEDULES:
            kwargs.update(beta_start=self.beta_start, beta_end=self.beta_end)
        return kwargs

    def ddpm_scheduler(self) -> DDPMScheduler:
        """MONAI DDPM scheduler as the reference trains and samples it (fixed_small variance, no x0 clipping)."""
        return DDPMScheduler(
            variance_type="fixed_small", clip_sample=False, prediction_type="epsilon", **self.schedule_kwargs()
        )

    def ddim_scheduler(self) -> DDIMScheduler:
        """MONAI DDIM scheduler on the same schedule (final step to alpha_cumprod = 1, no x0 clipping)."""
        return DDIMScheduler(
            clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon", **self.schedule_kwargs()
        )

    def rflow_scheduler(self) -> RFlowScheduler:
        """MONAI rectified-flow scheduler with this config's options."""
        return RFlowScheduler(
            num_train_timesteps=self.num_train_timesteps,
            use_discrete_timesteps=self.use_discrete_timesteps,
            sample_method=self.sample_method,
            loc=self.loc,
            scale=self.scale,
            use_timestep_transform=self.use_timestep_transform,
            base_img_size_numel=self.base_img_size_numel,
            spatial_dim=self.spatial_dim,
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1, (T,) float32, exactly as MONAI computes them."""
        return self.ddpm_scheduler().alphas_cumprod.clone()


def _broadcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with x's number of dimensions."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class TrainingObjective:
    """What a diffusion model regresses: noising ``x0 -> x_t`` and its target, shared by training and tests.

    Build with :meth:`from_config`. All tensors are batch-first, any number of further dimensions,
    e.g. x0: (B, C, X, Y, Z).
    """

    #: ``"epsilon"`` or ``"velocity"``.
    prediction: str = ""

    def __init__(self, cfg: NoiseScheduleConfig):
        self.cfg = cfg
        self.num_train_timesteps = cfg.num_train_timesteps

    @staticmethod
    def from_config(cfg: NoiseScheduleConfig) -> TrainingObjective:
        """The objective ``cfg.objective`` names."""
        return EpsilonObjective(cfg) if cfg.objective == "epsilon" else VelocityObjective(cfg)

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        spatial_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Training timesteps, (batch,), drawn with ``generator`` (on the generator's device, then moved)."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from clean x0 (B, ...) and noise (B, ...) at timesteps t (B,)."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the model at (x_t, t), same shape as x0."""
        raise NotImplementedError

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate from x_t and a model output (exact when the output equals :meth:`target`)."""
        raise NotImplementedError


class EpsilonObjective(TrainingObjective):
    """DDPM noise prediction (Ho et al. 2020) on MONAI's ``DDPMScheduler`` (the paper's objective)."""

    prediction = "epsilon"

    def __init__(self, cfg: NoiseScheduleConfig):
        super().__init__(cfg)
        self.scheduler = cfg.ddpm_scheduler()
        self._abar = self.scheduler.alphas_cumprod.clone()

    def sample_timesteps(self, batch, generator=None, *, device=None, spatial_shape=None):
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def add_noise(self, x0, noise, t):
        # MONAI casts its alphas_cumprod to the input dtype and keeps them: feed float32 so that one bf16/fp16 call
        # cannot lower the precision of every later one.
        x_t = self.scheduler.add_noise(x0.float(), noise.float(), t.long())
        return x_t.to(x0.dtype)

    def target(self, x0, noise, t):
        return noise

    def predict_x0(self, x_t, model_output, t):
        abar = _broadcast(self._abar.to(x_t.device)[t.long()], x_t).to(x_t.dtype)
        return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()


class VelocityObjective(TrainingObjective):
    """Rectified flow (Liu et al. 2022) on MONAI's ``RFlowScheduler``: x_t = (1 - t/T) x0 + (t/T) noise, v = x0 - noise."""

    prediction = "velocity"

    def __init__(self, cfg: NoiseScheduleConfig):
        super().__init__(cfg)
        self.scheduler = cfg.rflow_scheduler()

    def sample_timesteps(self, batch, generator=None, *, device=None, spatial_shape=None):
        cfg = self.cfg
        gen_device = generator.device if generator is not None else device
        if cfg.sample_method == "uniform":
            u = torch.rand((batch,), generator=generator, device=gen_device)
        else:
            # MONAI's LogisticNormal(loc, scale) on one dimension, first component = sigmoid(N(loc, scale^2)).
            u = torch.sigmoid(cfg.loc + cfg.scale * torch.randn((batch,), generator=generator, device=gen_device))
        t = u * self.num_train_timesteps
        if cfg.use_discrete_timesteps:
            t = t.long()
        if cfg.use_timestep_transform:
            if spatial_shape is None:
                raise ValueError("use_timestep_transform needs spatial_shape (the latent's spatial size)")
            t = timestep_transform(
                t,
                input_img_size_numel=torch.tensor(float(math.prod(spatial_shape))),
                base_img_size_numel=cfg.base_img_size_numel,
                num_train_timesteps=self.num_train_timesteps,
                spatial_dim=len(spatial_shape),
            )
        return t.to(device) if device is not None else t

    def add_noise(self, x0, noise, t):
        # MONAI's RFlow add_noise accepts only 4D/5D tensors: view any (B, ...) as (B, N, 1, 1).
        shape = x0.shape
        flat = (shape[0], -1, 1, 1)
        x_t = self.scheduler.add_noise(x0.float().reshape(flat), noise.float().reshape(flat), t)
        return x_t.reshape(shape).to(x0.dtype)

    def target(self, x0, noise, t):
        return x0 - noise

    def predict_x0(self, x_t, model_output, t):
        # x_t = x0 - (t/T) v  =>  x0 = x_t + (t/T) v  (MONAI's pred_original_sample)
        tau = _broadcast(t.to(x_t.device, torch.float32) / self.num_train_timesteps, x_t).to(x_t.dtype)
        return x_t + tau * model_output
