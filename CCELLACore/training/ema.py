"""Exponential moving average of a network's weights (the reference trains without one; CCELLA++ samples from it).

After every optimiser step: ``shadow = decay * shadow + (1 - decay) * param`` (fp32 shadows; buffers such as
normalisation statistics are copied as they are). Sampling and validation use the shadows via :meth:`EMA.copy_to`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CCELLAError

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of ``model``'s trainable floating-point parameters.

    Args:
        model: the network being trained; shadows start as copies of its current weights.
        decay: weight of the old average per update, in [0, 1).
        warmup: if True, use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so early averages are not dominated
            by the random initialisation.

    Example:
        >>> ema = EMA(model, decay=0.999)            # doctest: +SKIP
        >>> optimizer.step(); ema.update(model)      # every step   # doctest: +SKIP
        >>> ema.copy_to(sampling_model)              # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise CCELLAError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32 if p.is_floating_point() else p.dtype).clone()
            for name, p in model.state_dict().items()
        }
        # Frozen parameters (``requires_grad`` False when the EMA is made, e.g. an encoder kept while its decoder is
        # fine-tuned) follow the model like buffers: averaging a constant drifts it by rounding, ~1e-6 in 1000 steps.
        self._param_names = {name for name, p in model.named_parameters()
                             if p.is_floating_point() and p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadows towards ``model``'s current weights (call after each optimiser step)."""
        d = self.current_decay()
        state = model.state_dict()
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise CCELLAError(f"EMA and model have different weights, e.g. {sorted(missing)[:3]}")
        for name, value in state.items():
            shadow = self.shadow[name]
            if name in self._param_names:
                shadow.mul_(d).add_(value.detach().to(shadow.device, torch.float32), alpha=1.0 - d)
            else:  # buffers (running statistics, counters) and frozen parameters: follow the model
                shadow.copy_(value.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to its dtypes)."""
        state = model.state_dict()
        for name, value in state.items():
            if name not in self.shadow:
                raise CCELLAError(f"EMA has no weight '{name}' of the model it is copied to")
            value.copy_(self.shadow[name].to(value.device, value.dtype))

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """``{"decay", "warmup", "num_updates", "shadow": {name: tensor}}``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            diff = sorted(set(shadow) ^ set(self.shadow))
            raise CCELLAError(f"EMA state does not match the model: differing weights {diff[:5]}")
        for k, v in shadow.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise CCELLAError(f"EMA state weight '{k}' has shape {tuple(v.shape)}, model "
                                  f"{tuple(self.shadow[k].shape)}")
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.to(self.shadow[k].device, self.shadow[k].dtype).clone() for k, v in shadow.items()}
