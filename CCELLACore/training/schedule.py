"""Learning-rate schedule shared by the training jobs."""

from __future__ import annotations

import torch

__all__ = ["polynomial_lr", "set_lr"]


def polynomial_lr(base_lr: float, step: int, total_steps: int, power: float, warmup_steps: int = 0) -> float:
    """The paper's second-order polynomial decay over the REAL number of optimiser steps, in closed form:
    ``base_lr * (1 - step / total_steps) ** power`` for the step about to be taken (0 at the end).

    ``warmup_steps > 0`` multiplies the first steps by a linear ramp ``(step + 1) / warmup_steps`` (the paper has
    none; it lets a small model take a higher learning rate from the first step).

    Closed form rather than ``torch.optim.lr_scheduler.PolynomialLR``: no scheduler state to save, so a resumed or
    extended run (a larger ``max_steps``) re-spreads the schedule over its new total instead of the old one.
    """
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return ramp * base_lr * max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
