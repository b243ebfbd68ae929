"""Training objectives, samplers and classifier-free guidance of the CCELLA++ latent diffusion model.

The names below load on first use (PEP 562): importing :mod:`.config` alone, as the Slicer job's device check and
the model-info reader do, must not pull in MONAI (~5 s), so that a refusal ("no CUDA") comes back at once.
"""

from __future__ import annotations

import importlib

_SUBMODULE = {
    "DEFAULT_PAD_KEYS": "guidance",
    "GuidedPrediction": "guidance",
    "concat_conditions": "guidance",
    "guided_prediction": "guidance",
    "OBJECTIVES": "objectives",
    "EpsilonObjective": "objectives",
    "NoiseScheduleConfig": "objectives",
    "TrainingObjective": "objectives",
    "VelocityObjective": "objectives",
    "SUPPORTED_SAMPLERS": "config",
    "DDIMSampler": "samplers",
    "DDPMSampler": "samplers",
    "DPMSolverPlusPlusSampler": "samplers",
    "RectifiedFlowSampler": "samplers",
    "Sampler": "samplers",
    "make_sampler": "samplers",
    "sample": "samplers",
}

__all__ = list(_SUBMODULE)


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
