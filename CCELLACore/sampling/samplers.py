"""One sampler interface over DDPM, DDIM, DPM-Solver++(2M) and rectified flow.

Every sampler exposes the same three things, so that a sampling loop never branches on the sampler's type::

    sampler = make_sampler("dpm-solver++", schedule_cfg, num_steps=20)
    x = sampler.prepare_latents((B, C, X, Y, Z), generator)
    for t in sampler.timesteps:
        out = model(x, t.expand(B))  # noise or velocity, whichever the model was trained for
        x = sampler.step(out, t, x, generator)

(:func:`sample` is that loop.) Which samplers a model offers depends on its training objective
(:data:`SUPPORTED_SAMPLERS`); asking for another one is an error that lists the supported ones.

Timestep spacings (model timesteps are integers 0..T-1 for noise-trained models):

- ``ddpm``: with ``num_steps == T`` (the paper: 1000) MONAI's ``DDPMScheduler`` as the reference samples, t = T-1..0.
  With fewer steps MONAI's ``DDPMScheduler.step`` is wrong (it always steps from t to t-1 whatever the stride), so
  the strided ancestral sampler is MONAI's ``DDIMScheduler`` with eta = 1, whose noise sigma_t(eta=1) makes each
  step exactly the DDPM posterior q(x_s | x_t, x0) (Song et al. 2021, eq. (16)).
- ``ddim`` (and strided ``ddpm``): "leading" spacing t_k = k * (T // n), k = n-1..0, the only spacing consistent
  with MONAI's ``DDIMScheduler.step``, which takes the previous timestep as t - T // n. (MONAI 1.6.1's own
  ``set_timesteps`` uses linspace(T-1, 0, n), which disagrees with its step rule for n not dividing T - e.g.
  at n = 10 its last step evaluates the model at t = 0 on a sample still at noise level t = 11.)
- ``dpm-solver++``: timesteps uniform in lambda = log(alpha/sigma) (DPM-Solver's "logSNR" spacing) from T-1 to 0,
  rounded to training timesteps, then a final first-order step to the clean sample (alpha = 1, sigma = 0, as
  diffusers' ``final_sigmas_type="zero"``). Measured with the exact noise oracle of N(1.5, 0.5^2) data (4000
  samples), sample std at 10 / 20 steps: logSNR spacing 0.494 / 0.501; diffusers' "linspace" spacing
  (999, 949, ..., 50, then a jump to the clean sample) 0.350 / 0.426; time-uniform spacing ending at t = 0
  0.371 / 0.574 (one tiny r = h_{i-1}/h_i at the end makes the 2M extrapolation overshoot). The scaled-linear
  schedule's lambda changes fastest near t = 0, where time-uniform grids put too few steps.
- ``rflow``: MONAI ``RFlowScheduler.set_timesteps`` (t = T (1 - k/n), optionally shifted for large latents), then
  Euler steps to 0.

All randomness comes from the ``torch.Generator`` the caller passes (on the tensors' device); a sampler keeps no RNG
state. The multistep DPM-Solver++ keeps the previous step's data prediction between calls; it restarts whenever
``step`` is called with the first timestep and refuses steps taken out of order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import CCELLAError, ConfigError
from .config import SUPPORTED_SAMPLERS
from .objectives import NoiseScheduleConfig

__all__ = [
    "SUPPORTED_SAMPLERS",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "DPMSolverPlusPlusSampler",
    "RectifiedFlowSampler",
    "make_sampler",
    "sample",
]



def _scalar(t: int | float | torch.Tensor) -> float:
    """A step's timestep as a number: int, float, 0-d tensor or a (B,) tensor of equal values."""
    if isinstance(t, torch.Tensor):
        flat = t.reshape(-1)
        if flat.numel() == 0:
            raise ValueError("empty timestep tensor")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError("all samples of a batch must be at the same timestep")
        return float(flat[0].item())
    return float(t)


class Sampler:
    """Common interface of all samplers.

    Attributes:
        name: the sampler's name in :data:`SUPPORTED_SAMPLERS`.
        objective: ``"epsilon"`` or ``"velocity"``: what the model output given to :meth:`step` must be.
        num_steps: number of model evaluations.
        timesteps: (num_steps,) model timesteps, noisiest first (int64, or float32 for continuous rectified flow).
        init_noise_sigma: standard deviation of the initial latent (1.0 for all samplers here).
    """

    name: str = ""
    objective: str = ""
    init_noise_sigma: float = 1.0

    def __init__(self, cfg: NoiseScheduleConfig, num_steps: int):
        self.cfg = cfg
        self.num_steps = int(num_steps)
        self.num_train_timesteps = cfg.num_train_timesteps
        self.timesteps: torch.Tensor = torch.empty(0)
        self._last_index: int | None = None

    def prepare_latents(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Initial latent x_T ~ N(0, init_noise_sigma^2), shape e.g. (B, C, X, Y, Z).

        Drawn on the generator's device unless ``device`` is given (then the generator must live there).
        """
        if device is None and generator is not None:
            device = generator.device
        x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return x * self.init_noise_sigma

    def _index(self, t: int | float | torch.Tensor) -> int:
        """Position of ``t`` in :attr:`timesteps`; checks that steps come in order (restart at the first one)."""
        value = _scalar(t)
        hits = torch.nonzero(torch.isclose(self.timesteps.double(), torch.tensor(value, dtype=torch.float64)))
        if hits.numel() == 0:
            raise CCELLAError(f"{self.name}: timestep {value:g} is not one of this sampler's {self.num_steps} timesteps")
        i = int(hits[0, 0])
        if i != 0 and self._last_index != i - 1:
            raise CCELLAError(
                f"{self.name}: step at timestep {value:g} (step {i}) taken out of order; iterate sampler.timesteps"
            )
        self._last_index = i
        return i

    def step(
        self,
        model_output: torch.Tensor,
        t: int | float | torch.Tensor,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One reverse step.

        Args:
            model_output: the model's noise (epsilon samplers) or velocity (rflow) prediction, (B, ...).
            t: the current timestep, an element of :attr:`timesteps` (int, 0-d tensor or (B,) equal values).
            x: current sample x_t, (B, ...).
            generator: source of the noise stochastic samplers add (DDPM, DDIM with eta > 0).

        Returns:
            the sample at the next (less noisy) timestep, (B, ...); after the last timestep, the clean sample.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_steps={self.num_steps})"


def _leading_timesteps(num_train: int, num_steps: int) -> torch.Tensor:
    """t_k = k * (T // n), k = n-1..0: the spacing MONAI's ``DDIMScheduler.step`` assumes (previous = t - T // n)."""
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * (num_train // num_steps)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) on MONAI's ``DDIMScheduler``; eta = 0 is the deterministic probability-flow sampler."""

    name = "ddim"
    objective = "epsilon"

    def __init__(self, cfg: NoiseScheduleConfig, num_steps: int, eta: float = 0.0):
        super().__init__(cfg, num_steps)
        if eta < 0:
            raise ConfigError(f"DDIM eta must be >= 0, got {eta}", key="eta")
        self.eta = float(eta)
        self.scheduler = cfg.ddim_scheduler()
        self.scheduler.set_timesteps(self.num_steps)  # sets num_inference_steps, which step() uses for the stride
        self.scheduler.timesteps = _leading_timesteps(self.num_train_timesteps, self.num_steps)
        self.timesteps = self.scheduler.timesteps.clone()

    def step(self, model_output, t, x, generator=None):
        self._index(t)
        x_prev, _ = self.scheduler.step(model_output, int(_scalar(t)), x, eta=self.eta, generator=generator)
        return x_prev


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020), fixed_small variance, as the reference samples with T steps.

    ``num_steps == T``: MONAI's ``DDPMScheduler`` itself. Fewer steps: the same posterior on a strided chain
    (MONAI ``DDIMScheduler`` with eta = 1, leading spacing; see the module docstring).
    """

    name = "ddpm"
    objective = "epsilon"

    def __init__(self, cfg: NoiseScheduleConfig, num_steps: int):
        super().__init__(cfg, num_steps)
        self.strided = self.num_steps != self.num_train_timesteps
        if self.strided:
            self._ddim = DDIMSampler(cfg, self.num_steps, eta=1.0)
            self.scheduler = self._ddim.scheduler
        else:
            self.scheduler = cfg.ddpm_scheduler()
            self.scheduler.set_timesteps(self.num_steps)
        self.timesteps = self.scheduler.timesteps.clone()

    def step(self, model_output, t, x, generator=None):
        self._index(t)
        if self.strided:
            x_prev, _ = self.scheduler.step(model_output, int(_scalar(t)), x, eta=1.0, generator=generator)
        else:
            x_prev, _ = self.scheduler.step(model_output, int(_scalar(t)), x, generator=generator)
        return x_prev


def _logsnr_timesteps(lam: torch.Tensor, num_steps: int) -> torch.Tensor:
    """n integer timesteps from T-1 down to 0 whose lambda = log(alpha/sigma) is as evenly spaced as possible.

    DPM-Solver's "logSNR" time steps (Lu et al. 2022a, Sec. 3.3/App. C): uniform h makes r = h_{i-1}/h_i ~ 1 in
    the 2M extrapolation. Each lambda grid point is mapped to the nearest training timestep; where rounding
    makes neighbours collide near t = 0 they are pushed apart so that all n timesteps stay distinct.
    """
    grid = torch.linspace(float(lam[-1]), float(lam[0]), num_steps, dtype=torch.float64)
    t = torch.argmin((lam[None, :] - grid[:, None]).abs(), dim=1)  # lambda decreases with t
    t[0], t[-1] = lam.numel() - 1, 0
    for k in range(num_steps - 2, -1, -1):
        t[k] = max(int(t[k]), int(t[k + 1]) + 1)
    return t.long()


class DPMSolverPlusPlusSampler(Sampler):
    """DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data-prediction form.

    Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
    (arXiv:2211.01095), Algorithm 2; the same update as diffusers' ``DPMSolverMultistepScheduler`` with its defaults
    ``solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    final_sigmas_type="zero"``. MONAI has no DPM-Solver; this runs on the same alphas_cumprod as MONAI's DDPM.

    Notation (discrete VP schedule, abar_t = alphas_cumprod[t]):
        alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), so that x_t = alpha_t x0 + sigma_t eps;
        lambda_t = log(alpha_t / sigma_t) (half the log-SNR), increasing as t decreases;
        x0_t = (x_t - sigma_t eps_theta(x_t, t)) / alpha_t, the data prediction (Lu et al. 2022b, Sec. 3.2);
        h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0 for a step from t_{i-1} to the less noisy t_i.
    The exact solution of the data-prediction ODE (Sec. 3.2 / 4.1) is
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} + sigma_{t_i} * int_{lambda_{t_{i-1}}}^{lambda_{t_i}}
                  e^{lambda} x0_{lambda} d lambda;
    holding x0 constant gives the first-order step (= DDIM, eta 0)
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) x0_{t_{i-1}},
    and the linear extrapolation through the previous data prediction gives the 2M step (Algorithm 2)
        r_i = h_{i-1} / h_i,  D_i = (1 + 1 / (2 r_i)) x0_{t_{i-1}} - 1 / (2 r_i) x0_{t_{i-2}},
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.
    The first step (no history), the step to the clean sample (sigma = 0, h = inf: the update is x0 itself) and,
    below 15 steps, the second-to-last step are first order (diffusers' ``lower_order_final``, for stability).
    """

    name = "dpm-solver++"
    objective = "epsilon"

    def __init__(self, cfg: NoiseScheduleConfig, num_steps: int):
        super().__init__(cfg, num_steps)
        abar = cfg.alphas_cumprod().double()
        self._alpha = abar.sqrt()
        self._sigma = (1.0 - abar).sqrt()
        self._lambda = self._alpha.log() - self._sigma.log()
        self.timesteps = _logsnr_timesteps(self._lambda, self.num_steps)
        self._x0_prev: torch.Tensor | None = None
        self._h_prev: float | None = None

    def step(self, model_output, t, x, generator=None):
        i = self._index(t)
        if i == 0:
            self._x0_prev, self._h_prev = None, None
        t_cur = int(self.timesteps[i])
        alpha_t, sigma_t = float(self._alpha[t_cur]), float(self._sigma[t_cur])
        # data prediction x0_t = (x_t - sigma_t eps) / alpha_t
        x0 = (x - sigma_t * model_output) / alpha_t
        if i == self.num_steps - 1:
            # to the clean sample: alpha = 1, sigma = 0, h = inf  =>  x = x0 (first order)
            self._x0_prev, self._h_prev = None, None
            return x0
        t_next = int(self.timesteps[i + 1])
        alpha_s, sigma_s = float(self._alpha[t_next]), float(self._sigma[t_next])
        h = float(self._lambda[t_next] - self._lambda[t_cur])
        lower_order = self._x0_prev is None or (self.num_steps < 15 and i == self.num_steps - 2)
        if lower_order:
            d = x0
        else:
            r = self._h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self._x0_prev
        # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D ;  expm1 keeps precision for small h
        x_next = (sigma_s / sigma_t) * x - (alpha_s * math.expm1(-h)) * d
        self._x0_prev, self._h_prev = x0, h
        return x_next


class RectifiedFlowSampler(Sampler):
    """Rectified-flow Euler sampler on MONAI's ``RFlowScheduler`` (x_T = noise at t = T, data at t = 0).

    Args:
        cfg: the model's schedule config (objective ``"velocity"``).
        num_steps: number of Euler steps (e.g. 30).
        input_img_size_numel: voxel count of the latent's spatial grid, required when the config shifts timesteps
            (``use_timestep_transform``).
    """

    name = "rflow"
    objective = "velocity"

    def __init__(self, cfg: NoiseScheduleConfig, num_steps: int, input_img_size_numel: int | None = None):
        super().__init__(cfg, num_steps)
        if cfg.use_timestep_transform and input_img_size_numel is None:
            raise CCELLAError(
                "rflow: this schedule shifts timesteps by latent size (use_timestep_transform); "
                "give input_img_size_numel = X*Y*Z of the latent"
            )
        self.scheduler = cfg.rflow_scheduler()
        self.scheduler.set_timesteps(self.num_steps, input_img_size_numel=input_img_size_numel)
        ts = self.scheduler.timesteps
        # MONAI stores continuous timesteps as float16 values; float32 holds them exactly.
        self.timesteps = ts.long() if cfg.use_discrete_timesteps else ts.float()
        self._next = torch.cat([self.timesteps[1:], torch.zeros(1, dtype=self.timesteps.dtype)])

    def step(self, model_output, t, x, generator=None):
        i = self._index(t)
        t_cur, t_next = float(self.timesteps[i]), float(self._next[i])
        if t_cur.is_integer() and t_next.is_integer():
            x_next, _ = self.scheduler.step(model_output, t_cur, x, t_next)
            return x_next
        # MONAI's step truncates a fractional next timestep with int(); the same Euler step without truncation:
        # x_{t_next} = x_t + v (t - t_next) / T
        return x + model_output * ((t_cur - t_next) / self.num_train_timesteps)


def make_sampler(
    name: str,
    schedule_cfg: NoiseScheduleConfig,
    num_steps: int,
    *,
    eta: float = 0.0,
    input_img_size_numel: int | None = None,
) -> Sampler:
    """The sampler ``name`` for a model trained with ``schedule_cfg``.

    Args:
        name: ``"ddpm"``, ``"ddim"``, ``"dpm-solver++"`` (noise-trained models) or ``"rflow"`` (velocity-trained).
        schedule_cfg: the model's :class:`NoiseScheduleConfig`.
        num_steps: model evaluations, 1..T (paper: DDPM with 1000).
        eta: DDIM only: 0 deterministic, 1 ancestral.
        input_img_size_numel: rflow only: latent voxel count for the resolution-dependent timestep shift.

    Raises:
        ConfigError (a CCELLAError): unknown sampler, a sampler the model's objective does not support (the message
            lists the supported ones), or a step count outside 1..T.
    """
    key = str(name).strip().lower()
    supported = SUPPORTED_SAMPLERS[schedule_cfg.objective]
    if key not in supported:
        known = sorted({s for names in SUPPORTED_SAMPLERS.values() for s in names})
        what = "is not supported by" if key in known else "is unknown for"
        raise ConfigError(
            f"sampler '{name}' {what} a model trained with the {schedule_cfg.objective} objective; "
            f"supported samplers: {', '.join(supported)}",
            key="sampler",
        )
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= schedule_cfg.num_train_timesteps:
        raise ConfigError(
            f"number of sampling steps must be an integer in 1..{schedule_cfg.num_train_timesteps}, got {num_steps!r}",
            key="num_steps",
        )
    if key == "ddpm":
        return DDPMSampler(schedule_cfg, num_steps)
    if key == "ddim":
        return DDIMSampler(schedule_cfg, num_steps, eta=eta)
    if key == "dpm-solver++":
        return DPMSolverPlusPlusSampler(schedule_cfg, num_steps)
    return RectifiedFlowSampler(schedule_cfg, num_steps, input_img_size_numel=input_img_size_numel)


def sample(
    sampler: Sampler,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    x: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run the whole reverse process.

    Args:
        sampler: from :func:`make_sampler`.
        model_fn: ``model_fn(x (B, ...), t (B,)) -> prediction (B, ...)`` (wrap guidance and conditioning into it).
        shape: latent shape, e.g. (B, C, X, Y, Z), when ``x`` is not given.
        generator: the only source of randomness (initial noise and stochastic steps).
        x: initial latent instead of drawing one.

    Returns:
        the clean sample, (B, ...).
    """
    if x is None:
        if shape is None:
            raise ValueError("give shape or x")
        x = sampler.prepare_latents(shape, generator, device=device, dtype=dtype)
    for t in sampler.timesteps:
        t_batch = torch.full((x.shape[0],), t.item(), dtype=sampler.timesteps.dtype, device=x.device)
        x = sampler.step(model_fn(x, t_batch), t, x, generator)
    return x
