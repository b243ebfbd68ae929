"""CCELLA adapter: ELLA's timestep-aware perceiver resampler with CCELLA's exam-class heads.

The adapter turns text-encoder token features of a report into a fixed number of context tokens for the U-Net's
cross-attention and predicts the exam class (csPCa negative / positive) from the same latents. Its class
probabilities condition the U-Net, so the class head learns from the denoising loss as well as from the class loss.

Differences from the authors' code (`text_ldm.py`):

- the text padding mask is honoured (the reference attends to up to 511 padding tokens);
- each class head works on mean-pooled latents, ``Linear(width, class_hidden)-ReLU-Linear(class_hidden,
  num_classes)`` with ``class_hidden`` = the config's ``num_class_hidden`` (the reference ignores it and flattens the
  latents: 302 M of its 577 M parameters are six linear heads).

Example:
    >>> import torch
    >>> adapter = CCELLAAdapter(AdapterConfig.tiny())
    >>> context, logits = adapter(torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool), torch.tensor([1, 500]))
    >>> tuple(context.shape), tuple(logits.shape)
    ((2, 8, 32), (2, 2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AdapterConfig", "CCELLAAdapter", "AdaLayerNorm", "sinusoidal_timestep_embedding"]


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of the CCELLA adapter; defaults are the paper's (Flan-T5-XXL features, ELLA-sized perceiver).

    Attributes:
        input_dim: feature size of the text encoder (Flan-T5-XXL 4096; MiniLM 384).
        width: perceiver width = context size seen by the U-Net's cross-attention.
        layers: number of perceiver blocks (one class head each).
        heads: attention heads per block.
        num_latents: number of learned latents = context tokens.
        time_channel: size of the sinusoidal timestep encoding.
        time_embed_dim: size of the timestep embedding after its MLP.
        num_classes: exam classes (csPCa negative, positive).
        class_hidden: hidden size of each class head (the reference config's ``num_class_hidden``).
    """

    input_dim: int = 4096
    width: int = 768
    layers: int = 6
    heads: int = 8
    num_latents: int = 256
    time_channel: int = 320
    time_embed_dim: int = 768
    num_classes: int = 2
    class_hidden: int = 32

    def __post_init__(self) -> None:
        for name in ("input_dim", "width", "layers", "heads", "num_latents", "time_channel", "time_embed_dim",
                     "class_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"adapter {name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"adapter num_classes must be >= 2, got {self.num_classes}")
        if self.width % self.heads != 0:
            raise ValueError(f"adapter width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.time_channel % 2 != 0:
            raise ValueError(f"adapter time_channel must be even (sin and cos halves), got {self.time_channel}")

    @classmethod
    def tiny(cls) -> AdapterConfig:
        """Test-sized adapter (random 24-d text features)."""
        return cls(input_dim=24, width=32, layers=2, heads=4, num_latents=8, time_channel=16, time_embed_dim=32,
                   num_classes=2, class_hidden=8)


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding as diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    Args:
        timesteps: (B,) integer or float diffusion steps.
        dim: even encoding size.

    Returns:
        (B, dim) float32, ``[cos(t*f), sin(t*f)]`` with ``f_i = max_period^(-i/(dim/2))``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``Linear(time_channel, D) - SiLU - Linear(D, D)`` on the sinusoidal encoding (diffusers' layer names)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class AdaLayerNorm(nn.Module):
    """Timestep-adaptive LayerNorm: ``LN(x) * (1 + scale) + shift`` with (shift, scale) from a zero-initialised
    ``Linear(time_embed_dim, 2 * width)`` of ``SiLU(t_emb)``, so at initialisation it is a plain non-affine LN."""

    def __init__(self, width: int, time_embed_dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(time_embed_dim, 2 * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x: (B, N, width); t_emb: (B, time_embed_dim) -> (B, N, width)."""
        shift, scale = self.linear(self.silu(t_emb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class PerceiverAttentionBlock(nn.Module):
    """``lat += MHA(q=AdaLN1(lat), kv=[AdaLN1(lat); AdaLN2(text)])``; ``lat += MLP(AdaLN_ff(lat))``."""

    def __init__(self, width: int, heads: int, time_embed_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("sq_relu", SquaredReLU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)

    def forward(
        self, text: torch.Tensor, key_padding_mask: torch.Tensor, latents: torch.Tensor, t_emb: torch.Tensor
    ) -> torch.Tensor:
        """text: (B, L, W); key_padding_mask: (B, N + L) bool, True = ignore; latents: (B, N, W) -> (B, N, W)."""
        normed = self.ln_1(latents, t_emb)
        kv = torch.cat([normed, self.ln_2(text, t_emb)], dim=1)
        attended, _ = self.attn(normed, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        latents = latents + attended
        return latents + self.mlp(self.ln_ff(latents, t_emb))


class ClassHead(nn.Module):
    """Exam-class logits from mean-pooled latents: ``Linear(W, hidden) - ReLU - Linear(hidden, num_classes)``."""

    def __init__(self, width: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, N, W) -> (B, num_classes)."""
        return self.net(latents.mean(dim=1))


class CCELLAAdapter(nn.Module):
    """Timestep-aware perceiver resampler with one class head per block (cascade head) and a final classifier.

    Args:
        config: sizes, see :class:`AdapterConfig`.
    """

    def __init__(self, config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AdapterConfig()
        self.time_embedding = TimestepEmbedding(config.time_channel, config.time_embed_dim)
        self.latents = nn.Parameter(config.width**-0.5 * torch.randn(config.num_latents, config.width))
        self.time_aware_linear = nn.Linear(config.time_embed_dim, config.width)
        self.proj_in = nn.Linear(config.input_dim, config.width)
        self.blocks = nn.ModuleList(
            PerceiverAttentionBlock(config.width, config.heads, config.time_embed_dim) for _ in range(config.layers)
        )
        self.class_heads = nn.ModuleList(
            ClassHead(config.width, config.class_hidden, config.num_classes) for _ in range(config.layers)
        )
        self.classifier = nn.Linear(config.layers * config.num_classes, config.num_classes)

    def forward(
        self, text_features: torch.Tensor, text_mask: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            text_features: (B, L, input_dim) token features of the reports (L may be 0).
            text_mask: (B, L) bool, True for real tokens, False for padding. A row without any real token (the empty
                report) is valid: latents always attend to themselves.
            timesteps: (B,) diffusion steps, or a scalar used for the whole batch.

        Returns:
            context: (B, num_latents, width) cross-attention context for the U-Net.
            logits: (B, num_classes) exam-class logits.
        """
        cfg = self.config
        if text_features.ndim != 3 or text_features.shape[-1] != cfg.input_dim:
            raise ValueError(
                f"text_features must be (B, L, {cfg.input_dim}), got {tuple(text_features.shape)}; the adapter's "
                f"input_dim must match the text encoder"
            )
        batch, length = text_features.shape[:2]
        if text_mask.shape != (batch, length) or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be a bool tensor of shape {(batch, length)}, got {text_mask.dtype} "
                f"{tuple(text_mask.shape)}"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be (B,) = ({batch},) or a scalar, got {tuple(timesteps.shape)}")

        t_emb = self.time_embedding(sinusoidal_timestep_embedding(timesteps, cfg.time_channel).to(self.latents.dtype))
        latents = self.latents[None].expand(batch, -1, -1) + self.time_aware_linear(nn.functional.silu(t_emb))[:, None]
        text = self.proj_in(text_features)
        # key_padding_mask: True = not attended. Latent keys are always valid, so no softmax row is empty.
        key_padding_mask = torch.cat(
            [torch.zeros(batch, cfg.num_latents, dtype=torch.bool, device=text_mask.device), ~text_mask], dim=1
        )
        block_logits = []
        for block, head in zip(self.blocks, self.class_heads):
            latents = block(text, key_padding_mask, latents, t_emb)
            block_logits.append(head(latents))
        logits = self.classifier(torch.cat(block_logits, dim=1))
        return latents, logits
