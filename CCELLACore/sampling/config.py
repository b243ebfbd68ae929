"""A model's generation defaults (the ``sampling:`` section of its config), next to the samplers they choose."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingConfig", "SUPPORTED_SAMPLERS", "DEFAULT_SAMPLER", "check_guidance_interval", "check_side_scale"]

#: Samplers each training objective supports (docs/design.md, "Training objective and samplers"). Here, not in
#: :mod:`.samplers`, so that reading a model folder's samplers (the Slicer job, the model-info reader) needs no MONAI.
SUPPORTED_SAMPLERS: dict[str, tuple[str, ...]] = {
    "epsilon": ("ddpm", "ddim", "dpm-solver++"),
    "velocity": ("rflow",),
}

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
            demo: guidance at the very highest noise levels lays out spurious structures (the demo samples with
            ``[0, 0.85]``), while guidance just below them decides where the lesion goes (docs/design.md, "Guidance
            interval").
        side_contrast: for models with a side map (``ldm.unet.side_map``): the null half of guidance gets the
            report's side mirrored (left <-> right) instead of the null report's, so guidance also pushes the lesion
            away from the other side (docs/design.md, "Guidance and side contrast"). No extra model pass.
        side_scale: for models with a side map: the map's amplitude at sampling, a multiple of what the side head
            reads (1 = as trained). The map is linear in the side head's ``p_left - p_right``, so a larger scale
            tells the U-Net more firmly where the lesion goes; reports without a side (the head reads "none", the
            map is ~0) are unchanged. Measured on the demo (docs/design.md, "Side scale"). No extra model pass.
    """

    sampler: str | None = None
    steps: int = 20
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    side_contrast: bool = False
    side_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise ValueError(f"sampling.steps must be >= 1 and guidance >= 0, got {self.steps}, {self.guidance}")
        check_side_scale(self.side_scale)
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


def check_side_scale(scale) -> float:
    """``scale`` as a float in [0, 10], else ValueError naming it (beyond ~10 the map is far outside training)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"side_scale must be a number in 0..10, got {scale!r}") from None
    if not 0.0 <= value <= 10.0:
        raise ValueError(f"side_scale must be in 0..10, got {value}")
    return value
