"""CCELLA latent diffusion model: the CCELLA adapter and the U-Net, trained end to end.

The adapter reads the report's token features and predicts the exam class; the U-Net is conditioned on the adapter's
context (cross-attention) and on its class probabilities (embedding), never on the true label, so the denoising loss
also trains the class head (as in the authors' code; docs/paper.md).

For classifier-free guidance, :func:`condition_dropout` replaces a random part of a batch with the null condition
(the empty-report encoding, docs/design.md "Reports, the null condition and privacy"); those items, like exams without a report, are masked out of the
class loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .adapter import AdapterConfig, CCELLAAdapter, ClassHead
from .text_encoder import pad_tokens
from .unet import SIDES, CCELLAUNet, UNetConfig

__all__ = ["LDMConfig", "LDMOutput", "CCELLALDM", "ConditionDropout", "condition_dropout", "load_grown_state"]

#: The U-Net input convolution: the one tensor allowed to grow when a model starts from a smaller one.
_INPUT_CONV = "unet.conv_in.conv.weight"
#: Heads a grown model may add (they start from their initialisation).
_NEW_HEADS = ("side_head.",)


@dataclass(frozen=True)
class LDMConfig:
    """Adapter + U-Net; the adapter's width is the U-Net's context size and both agree on the number of classes."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        if self.adapter.width != self.unet.cross_attention_dim:
            raise ValueError(
                f"adapter.width ({self.adapter.width}) must equal unet.cross_attention_dim "
                f"({self.unet.cross_attention_dim})"
            )
        if self.adapter.num_classes != self.unet.num_classes:
            raise ValueError(
                f"adapter.num_classes ({self.adapter.num_classes}) must equal unet.num_classes "
                f"({self.unet.num_classes})"
            )

    @classmethod
    def tiny(cls) -> LDMConfig:
        return cls(adapter=AdapterConfig.tiny(), unet=UNetConfig.tiny())


class LDMOutput(NamedTuple):
    """prediction: (B, C, X, Y, Z); class_logits: (B, num_classes); class_probs: softmax of the logits;
    side_logits: (B, 3) logits of the report's lesion side (:data:`~CCELLACore.models.unet.SIDES`), None without
    ``unet.side_map``."""

    prediction: torch.Tensor
    class_logits: torch.Tensor
    class_probs: torch.Tensor
    side_logits: torch.Tensor | None = None


class CCELLALDM(nn.Module):
    """Report-conditioned denoiser: ``adapter(text) -> (context, class logits)``, ``unet(x | t, context, softmax,
    spacing)``.

    Args:
        config: see :class:`LDMConfig`.
    """

    def __init__(self, config: LDMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LDMConfig()
        self.adapter = CCELLAAdapter(config.adapter)
        self.unet = CCELLAUNet(config.unet)
        if config.unet.side_map:
            # Reads the adapter's context as the class heads read their latents; trained by the side loss
            # (LossConfig.side_loss_weight) and, through the U-Net's side map, by the denoising loss.
            self.side_head = ClassHead(config.adapter.width, config.adapter.class_hidden, len(SIDES))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        spacing: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        side_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LDMOutput:
        """
        Args:
            x: (B, C, X, Y, Z) noisy latents.
            timesteps: (B,) diffusion steps, or a scalar for the whole batch.
            spacing: (B, 3) voxel spacing of the generated volume in mm.
            text_features: (B, L, input_dim) report token features (the null encoding for unconditional items).
            text_mask: (B, L) bool, True for real tokens.
            side_transform: maps the side head's (B, 3) probabilities to those the U-Net's side map is made of, in
                the same pass (sampling: side scale, and side contrast, which gives the null half of a guided batch
                the report's mirrored side); ignored without ``unet.side_map``.

        Returns:
            :class:`LDMOutput` with the U-Net prediction (B, C, X, Y, Z) and the adapter's class logits and
            probabilities (B, num_classes).
        """
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        context, logits = self.adapter(text_features, text_mask, timesteps)
        # softmax in float32: the probabilities are scaled by 100 before the U-Net's class layer
        probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        side_logits = side_probs = None
        if self.config.unet.side_map:
            side_logits = self.side_head(context)
            side_probs = torch.softmax(side_logits.float(), dim=-1).to(side_logits.dtype)
            if side_transform is not None:
                side_probs = side_transform(side_probs)
        prediction = self.unet(x, timesteps, context, probs, spacing, side_probs)  # the U-Net ignores it without a map
        return LDMOutput(prediction, logits, probs, side_logits)


class ConditionDropout(NamedTuple):
    """features: (B, L', D); mask: (B, L') bool; dropped: (B,) bool, True where the null condition was put in."""

    features: torch.Tensor
    mask: torch.Tensor
    dropped: torch.Tensor


def condition_dropout(
    text_features: torch.Tensor,
    text_mask: torch.Tensor,
    null_features: torch.Tensor,
    null_mask: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    dropped: torch.Tensor | None = None,
) -> ConditionDropout:
    """Replace each batch item's report encoding by the null (empty-report) encoding with probability ``p``.

    Args:
        text_features: (B, L, D) report token features.
        text_mask: (B, L) bool, True for real tokens.
        null_features: (L0, D) or (1, L0, D) encoding of the empty report (L0 may differ from L; the shorter one is
            padded with masked tokens).
        null_mask: (L0,) or (1, L0) bool.
        p: drop probability in [0, 1].
        generator: optional seeded generator (on the CPU or on the features' device) for reproducible draws.
        dropped: (B,) bool decisions drawn by the caller instead (DDP ranks draw the global batch's decisions from
            one shared generator and keep their slice, so results do not depend on the number of processes).

    Returns:
        :class:`ConditionDropout`; mask the class loss with ``has_report & ~dropped``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout probability must be in [0, 1], got {p}")
    if null_features.ndim == 2:
        null_features, null_mask = null_features[None], null_mask[None]
    if null_features.ndim != 3 or null_features.shape[0] != 1 or null_features.shape[2] != text_features.shape[2]:
        raise ValueError(
            f"null_features must be (L0, {text_features.shape[2]}) or (1, L0, {text_features.shape[2]}), "
            f"got {tuple(null_features.shape)}"
        )
    if null_mask.shape != null_features.shape[:2]:
        raise ValueError(f"null_mask must be {tuple(null_features.shape[:2])}, got {tuple(null_mask.shape)}")
    batch = text_features.shape[0]
    draw_device = generator.device if generator is not None else text_features.device
    if dropped is None:
        dropped = torch.rand(batch, generator=generator, device=draw_device) < p
    dropped = dropped.to(text_features.device)

    length = max(text_features.shape[1], null_features.shape[1])
    features, mask = pad_tokens(text_features, text_mask, length)
    null_f, null_m = pad_tokens(null_features.to(features), null_mask.to(mask.device), length)
    features = torch.where(dropped[:, None, None], null_f.expand(batch, -1, -1), features)
    mask = torch.where(dropped[:, None], null_m.expand(batch, -1), mask)
    return ConditionDropout(features, mask, dropped)


def load_grown_state(model: CCELLALDM, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` (another CCELLA LDM's weights) into ``model``, which may take MORE input channels (coordinate
    maps, the side map: :class:`~CCELLACore.models.unet.UNetConfig` ``coordinate_channels``, ``side_map``): the
    input convolution's new channels start at zero, so the grown model computes exactly what ``state``'s model
    computed and training learns to use the new inputs; a side head ``state`` lacks keeps its initial weights.
    Every other tensor must match. Returns the names of the grown or added tensors.

    Raises:
        CCELLAError: any other missing, unexpected or mismatched key (names ``source`` and the keys).
    """
    from .weights import check_state_dict

    expected = model.state_dict()
    state = dict(state)
    grown = []
    old, new = state.get(_INPUT_CONV), expected.get(_INPUT_CONV)
    if old is not None and new is not None and old.shape != new.shape:
        if old.shape[0] == new.shape[0] and old.shape[2:] == new.shape[2:] and old.shape[1] < new.shape[1]:
            padded = torch.zeros_like(new)
            padded[:, : old.shape[1]] = old
            state[_INPUT_CONV] = padded
            grown.append(_INPUT_CONV)
    for key, value in expected.items():
        if key.startswith(_NEW_HEADS) and key not in state:
            state[key] = value
            grown.append(key)
    check_state_dict(state, model, source=source, component="ldm")
    model.load_state_dict(state)
    return grown
