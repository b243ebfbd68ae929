"""A model's generation defaults (the ``sampling:`` section of its config), next to the samplers they choose."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingConfig", "DEFAULT_SAMPLER"]

#: Sampler per objective when neither the call nor the model's ``sampling`` config names one.
DEFAULT_SAMPLER = {"epsilon": "dpm-solver++", "velocity": "rflow"}


@dataclass(frozen=True)
class SamplingConfig:
    """A model's default generation settings (``sampling:`` in its config; each can be overridden per call).

    Attributes:
        sampler: ``None`` = DPM-Solver++ for noise-trained models, rectified flow for velocity-trained ones.
        steps: model evaluations.
        guidance: classifier-free guidance scale (1 = none).
    """

    sampler: str | None = None
    steps: int = 20
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise ValueError(f"sampling.steps must be >= 1 and guidance >= 0, got {self.steps}, {self.guidance}")
