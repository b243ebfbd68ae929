"""Classifier-free guidance (Ho & Salimans 2022) with the conditional and unconditional passes in ONE forward.

The null condition (docs/design.md, "Reports, the null condition and privacy") is the empty-report encoding; spacing is always given. Both halves are
concatenated along the batch, so a guided step costs one U-Net call of batch 2B instead of two calls of batch B;
with ``scale == 1`` only the conditional pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..errors import CCELLAError
from ..models.text_encoder import pad_tokens

__all__ = ["GuidedPrediction", "guided_prediction", "concat_conditions", "DEFAULT_PAD_KEYS"]

#: Sequence features that may differ in length between cond and uncond -> their boolean token mask.
DEFAULT_PAD_KEYS: dict[str, str] = {"text": "text_mask"}


class GuidedPrediction(NamedTuple):
    """prediction: guided model output (B, ...); aux: the conditional half's auxiliary outputs (or None)."""

    prediction: torch.Tensor
    aux: Any


def _expand_batch(value: torch.Tensor, batch: int, key: str) -> torch.Tensor:
    # a single null encoding (batch 1) serves the whole batch
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise CCELLAError(f"guidance: condition '{key}' has batch {value.shape[0]}, expected {batch} or 1")


def concat_conditions(
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    batch: int,
    pad_keys: Mapping[str, str] = DEFAULT_PAD_KEYS,
) -> dict[str, torch.Tensor]:
    """[cond; uncond] along dim 0 for every key (result batch 2B).

    Args:
        cond: conditional inputs, each (B, ...) (or (1, ...), broadcast), e.g. text (B, L1, D), text_mask (B, L1),
            spacing (B, 3).
        uncond: the null condition with the same keys, e.g. the empty-report encoding text (1, L2, D).
        batch: B.
        pad_keys: sequence feature key -> mask key. When the two sequence lengths differ the shorter side is padded
            with zero tokens whose mask is False; a missing mask is created (True on real tokens).
    """
    if set(cond) != set(uncond):
        raise CCELLAError(f"guidance: cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    cond = {k: _expand_batch(v, batch, k) for k, v in cond.items()}
    uncond = {k: _expand_batch(v, batch, k) for k, v in uncond.items()}
    for feat_key, mask_key in pad_keys.items():
        if feat_key not in cond:
            continue
        len_c, len_u = cond[feat_key].shape[1], uncond[feat_key].shape[1]
        if len_c == len_u:
            continue
        length = max(len_c, len_u)
        for side in (cond, uncond):
            feats = side[feat_key]
            mask = side.get(mask_key)
            if mask is None:
                mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            side[feat_key], side[mask_key] = pad_tokens(feats, mask.bool(), length)
    return {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}


def _first_half(value: Any, batch: int) -> Any:
    """The conditional half (first B rows) of an auxiliary output: tensor, tuple/list or dict of tensors."""
    if isinstance(value, torch.Tensor):
        return value[:batch] if value.ndim > 0 and value.shape[0] == 2 * batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_half(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _first_half(v, batch) for k, v in value.items()}
    return value


def _split_output(output: Any) -> tuple[torch.Tensor, Any]:
    """model_fn returns a prediction tensor, or (prediction, aux) / (prediction, aux1, aux2, ...)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        rest = tuple(output[1:])
        return output[0], (rest[0] if len(rest) == 1 else rest) if rest else None
    raise CCELLAError(f"guidance: model_fn must return a tensor or (prediction, aux...), got {type(output).__name__}")


def guided_prediction(
    model_fn: Callable[..., Any],
    x: torch.Tensor,
    t: torch.Tensor | int | float,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    scale: float,
    *,
    pad_keys: Mapping[str, str] = DEFAULT_PAD_KEYS,
) -> GuidedPrediction:
    """Classifier-free guided model output: ``uncond + scale * (cond - uncond)``.

    Args:
        model_fn: ``model_fn(x, t, cond_dict) -> prediction`` or ``-> (prediction, aux...)``, e.g. the U-Net with
            the adapter, returning (noise, class probabilities).
        x: latents, (B, C, X, Y, Z).
        t: timestep, scalar or (B,).
        cond: conditional inputs (see :func:`concat_conditions`).
        uncond: the null condition, same keys.
        scale: guidance scale w; 1.0 runs the conditional pass only (batch B), otherwise one pass of batch 2B.

    Returns:
        GuidedPrediction(prediction (B, C, X, Y, Z), aux of the conditional half, or None).
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(batch) if t.ndim == 0 else t
    if float(scale) == 1.0:
        cond_only = {k: _expand_batch(v, batch, k) for k, v in cond.items()}
        prediction, aux = _split_output(model_fn(x, t, cond_only))
        return GuidedPrediction(prediction, aux)
    both = concat_conditions(cond, uncond, batch, pad_keys)
    prediction, aux = _split_output(model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), both))
    pred_cond, pred_uncond = prediction[:batch], prediction[batch:]
    guided = pred_uncond + scale * (pred_cond - pred_uncond)
    return GuidedPrediction(guided, _first_half(aux, batch))
