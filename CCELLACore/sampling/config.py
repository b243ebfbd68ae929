"""A model's generation defaults (the ``sampling:`` section of its config), next to the samplers they choose."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingConfig", "DEFAULT_SAMPLER", "check_guidance_interval"]

#: Sampler per objective when neither the call nor the model's ``sampling`` config names one.
DEFAULT_SAMPLER = {"epsilon": "dpm-solver++", "velocity": "rflow"}


@dataclass(frozen=True)
class SamplingConfig:
    """A model's default generation settings (``sampling:`` in its config; each can be overridden per call).

    Attributes:
        sampler: ``None`` = DPM-Solver++ for noise-trained models, rectified flow for velocity-trained ones.
        steps: model evaluations.
        guidance: classifier-free guidance scale (1 = none).
        guidance_interval: ``[low, high]`` noise levels t / T (1 = pure noise) at which guidance applies; outside
            it each step uses the conditional prediction alone (and costs one pass instead of two). Measured on the
            demo: guidance matters at high noise, where the lesion is laid out (docs/design.md, "Guidance and side
            contrast").
        side_contrast: for models with a side map (``ldm.unet.side_map``): the null half of guidance gets the
            report's side mirrored (left <-> right) instead of the null report's, so guidance also pushes the lesion
            away from the other side (docs/design.md, "Guidance and side contrast"). No extra model pass.
    """

    sampler: str | None = None
    steps: int = 20
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    side_contrast: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise ValueError(f"sampling.steps must be >= 1 and guidance >= 0, got {self.steps}, {self.guidance}")
        low, high = check_guidance_interval(self.guidance_interval)
        object.__setattr__(self, "guidance_interval", (low, high))


def check_guidance_interval(interval) -> tuple[float, float]:
    """``(low, high)`` with 0 <= low < high <= 1, else ValueError naming the values."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two noise levels [low, high] in 0..1, got {interval!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low < high <= 1, got [{low}, {high}]")
    return low, high
