"""Training objectives, samplers and classifier-free guidance of the CCELLA++ latent diffusion model."""

from __future__ import annotations

from .guidance import DEFAULT_PAD_KEYS, GuidedPrediction, concat_conditions, guided_prediction
from .objectives import OBJECTIVES, EpsilonObjective, NoiseScheduleConfig, TrainingObjective, VelocityObjective
from .samplers import (
    SUPPORTED_SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlusSampler,
    RectifiedFlowSampler,
    Sampler,
    make_sampler,
    sample,
)

__all__ = [
    "OBJECTIVES",
    "NoiseScheduleConfig",
    "TrainingObjective",
    "EpsilonObjective",
    "VelocityObjective",
    "SUPPORTED_SAMPLERS",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "DPMSolverPlusPlusSampler",
    "RectifiedFlowSampler",
    "make_sampler",
    "sample",
    "GuidedPrediction",
    "guided_prediction",
    "concat_conditions",
    "DEFAULT_PAD_KEYS",
]
