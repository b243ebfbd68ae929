"""Cheaper decoding: a light decoder distilled from the full MAISI decoder, and sliding-window (tiled) decoding.

At the paper's size decoding dominates a few-step exam (docs/speed.md): the full decoder ([64, 128, 256] channels)
needs ~27 TFLOP and, untiled, more memory than a laptop has for one 256 x 256 x 128 volume. Two levers, each behind
a setting:

- **light decoder**: MONAI's ``MaisiDecoder`` with 4x fewer channels (16x fewer FLOPs), trained by ``ccella
  distill-decoder`` to reproduce the full decoder's output from the same latents. It ships inside the model folder
  as the ``light_decoder`` component; ``model.json["light_decoder"]`` records its architecture and its quality
  against the full decoder on held-out latents (PSNR, SSIM), and whether that meets :data:`QUALITY_BAR`.
- **tiled decoding**: MONAI's ``SlidingWindowInferer`` over the latent (gaussian blending); peak memory is set by
  the tile, not the volume. A tile covering the whole latent is exactly the untiled decode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..errors import CCELLAError, ConfigError
from ..precision import autocast_context
from .autoencoder import AutoencoderConfig, SequenceAutoencoder
from .weights import check_state_dict

__all__ = ["LightDecoderConfig", "LightDecoder", "DecodeTiling", "QUALITY_BAR", "DECODER_CHOICES", "LIGHT_COMPONENT",
           "tiled_decode", "meets_quality_bar", "SequenceCodec", "load_light_decoder", "choose_decoder"]

#: model.json component name (and key of its record) of the distilled decoder.
LIGHT_COMPONENT = "light_decoder"

#: ``decoder`` settings of generation: auto = light where the model folder's light decoder met the bar, else full.
DECODER_CHOICES = ("auto", "full", "light")

#: The light decoder is chosen automatically only when, on held-out latents, its volumes match the full decoder's at
#: least this well (PSNR in dB with data range 1, SSIM 3D, both averaged over volumes). About the difference between
#: two reconstructions of one volume that a reader does not tell apart (docs/speed.md).
QUALITY_BAR = {"psnr_db": 35.0, "ssim": 0.97}


@dataclass(frozen=True)
class LightDecoderConfig:
    """Architecture of a light decoder (MONAI ``MaisiDecoder``, no attention).

    Args:
        num_channels: channels per level, finest first; as many levels as the full decoder (same upsampling).
        num_res_blocks: residual blocks per level.
        latent_channels: the full autoencoder's latent channels (4 per sequence; 12 for a joint autoencoder).
        out_channels: the full autoencoder's (1; the number of sequences for a joint autoencoder).
        norm_num_groups / norm_eps: GroupNorm settings; every channel count must be divisible by the groups.
        num_splits / dim_split: MAISI's split convolutions (1 = none, the fastest; more saves memory).
    """

    num_channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    latent_channels: int = 4
    out_channels: int = 1
    norm_num_groups: int = 8
    norm_eps: float = 1e-6
    num_splits: int = 1
    dim_split: int = 1

    def __post_init__(self) -> None:
        if not self.num_channels or len(self.num_res_blocks) != len(self.num_channels):
            raise ValueError(f"num_channels {self.num_channels} and num_res_blocks {self.num_res_blocks} must have "
                             "the same non-zero length")
        if any(c <= 0 or c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"num_channels {self.num_channels} must be divisible by norm_num_groups "
                             f"{self.norm_num_groups}")
        if min(self.latent_channels, self.out_channels, self.num_splits) < 1:
            raise ValueError("latent_channels, out_channels and num_splits must be >= 1")

    @classmethod
    def from_teacher(cls, teacher: AutoencoderConfig, divisor: int = 4,
                     num_channels: Sequence[int] | None = None) -> "LightDecoderConfig":
        """``teacher``'s decoder with ``divisor``-times fewer channels per level (or ``num_channels``)."""
        channels = tuple(num_channels or (max(4, c // divisor) for c in teacher.num_channels))
        if len(channels) != len(teacher.num_channels):
            raise ConfigError(f"light decoder channels {list(channels)} need {len(teacher.num_channels)} levels, as "
                              f"the full decoder {list(teacher.num_channels)} (same upsampling)", key="num_channels")
        return cls(num_channels=channels, num_res_blocks=tuple(teacher.num_res_blocks),
                   latent_channels=teacher.total_latent_channels, out_channels=teacher.out_channels,
                   norm_num_groups=min(8, math.gcd(*channels)),
                   norm_eps=teacher.norm_eps)


class LightDecoder(nn.Module):
    """A narrow MAISI decoder: ``decode(z)`` (B, 4C, x, y, z) unscaled latents -> (B, C, 4x, 4y, 4z) volumes
    (C = 1, or the sequences of a joint autoencoder)."""

    def __init__(self, config: LightDecoderConfig):
        super().__init__()
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiDecoder

        self.config = config
        levels = len(config.num_channels)
        self.decoder = MaisiDecoder(
            spatial_dims=3, num_channels=list(config.num_channels), in_channels=config.latent_channels,
            out_channels=config.out_channels, num_res_blocks=list(config.num_res_blocks),
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps, attention_levels=[False] * levels, num_splits=config.num_splits,
            dim_split=config.dim_split, norm_float16=False, print_info=False, save_mem=False,
            with_nonlocal_attn=False,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    decode = forward


@dataclass(frozen=True)
class DecodeTiling:
    """Sliding-window decoding over the latent.

    Args:
        roi: tile size in latent voxels (x, y, z); clipped to the latent, so a tile at least the latent's size is
            exactly the untiled decode. 32 x 32 x 32 latent voxels = 128^3 output voxels.
        overlap: fraction of a tile shared with its neighbour (MONAI ``overlap``); ``roi * overlap * 4`` should be
            an integer.
        mode: blending of overlapping tiles (``gaussian`` or ``constant``).
    """

    roi: tuple[int, int, int] = (32, 32, 32)
    overlap: float = 0.25
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise CCELLAError(f"decode tile must be 3 positive latent sizes, got {self.roi}")
        if not 0.0 <= self.overlap < 1.0:
            raise CCELLAError(f"decode tile overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("gaussian", "constant"):
            raise CCELLAError(f"decode tile mode must be gaussian or constant, got {self.mode!r}")


def tiled_decode(network, z: torch.Tensor, tiling: DecodeTiling) -> torch.Tensor:
    """Decode ``z`` (B, C, x, y, z) tile by tile with MONAI's ``SlidingWindowInferer``; float32 output."""
    from monai.inferers import SlidingWindowInferer

    roi = tuple(min(r, s) for r, s in zip(tiling.roi, z.shape[2:]))
    if roi == tuple(z.shape[2:]):
        return network(z).float()  # one tile: skip blending weights (exact, and cheaper)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=tiling.overlap, mode=tiling.mode,
                                   progress=False)
    return inferer(z, lambda tile: network(tile).float())


def meets_quality_bar(quality: Mapping[str, float], bar: Mapping[str, float] = QUALITY_BAR) -> bool:
    """Whether measured ``{"psnr_db", "ssim"}`` reach every figure of ``bar``."""
    return all(float(quality.get(key, -math.inf)) >= value for key, value in bar.items())


class SequenceCodec(SequenceAutoencoder):
    """:class:`SequenceAutoencoder` whose decoding can use the light decoder and/or tiles.

    Args:
        model: the full autoencoder (it always encodes).
        device / dtype: as :class:`SequenceAutoencoder`.
        light_decoder: decode with this network instead of the full decoder (None = full).
        tiling: decode in tiles (None = the whole latent at once).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
                 light_decoder: nn.Module | None = None, tiling: DecodeTiling | None = None):
        super().__init__(model, device, dtype)
        self.light_decoder = light_decoder.to(self.device).eval() if light_decoder is not None else None
        self.tiling = tiling

    @property
    def decoder_name(self) -> str:
        return "full" if self.light_decoder is None else "light"

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 4C, x, y, z) unscaled latents -> (B, C, 4x, 4y, 4z) float32 volumes (C = ``in_channels``)."""
        self._check(z, self.latent_channels, "latent", 1)
        network = self.light_decoder if self.light_decoder is not None else self.model.decode
        z = z.to(self.device, torch.float32)
        with autocast_context(self.device, self.dtype):
            x = tiled_decode(network, z, self.tiling) if self.tiling is not None else network(z)
        return x.float()


def load_light_decoder(directory, metadata: Mapping[str, Any], state_dicts: Mapping[str, dict]) -> LightDecoder:
    """The light decoder of a model folder read with ``load_model_dir`` (architecture from ``model.json``)."""
    record = metadata.get(LIGHT_COMPONENT)
    if LIGHT_COMPONENT not in state_dicts or not isinstance(record, Mapping):
        raise CCELLAError(f"{directory}: the model has no light decoder; make one with `ccella distill-decoder "
                          f"--model {directory} --manifest <preprocessed manifest>`")
    try:
        config = from_dict(LightDecoderConfig, dict(record.get("config", {})), file=f"{directory}/model.json")
    except ConfigError as exc:
        raise CCELLAError(str(exc)) from None
    network = LightDecoder(config)
    check_state_dict(state_dicts[LIGHT_COMPONENT], network, source=f"{directory}/{LIGHT_COMPONENT}.safetensors",
                     component=LIGHT_COMPONENT)
    network.load_state_dict(state_dicts[LIGHT_COMPONENT])
    return network.eval()


def choose_decoder(choice: str, metadata: Mapping[str, Any], directory) -> str:
    """``"full"`` or ``"light"`` for the ``decoder`` setting ``choice`` (see :data:`DECODER_CHOICES`)."""
    if choice not in DECODER_CHOICES:
        raise CCELLAError(f"decoder must be one of {list(DECODER_CHOICES)}, got {choice!r}")
    record = metadata.get(LIGHT_COMPONENT)
    if choice == "auto":
        ok = isinstance(record, Mapping) and bool(record.get("meets_quality_bar"))
        return "light" if ok and LIGHT_COMPONENT in metadata.get("components", {}) else "full"
    return choice


def light_record(config: LightDecoderConfig, quality: Mapping[str, Any]) -> dict[str, Any]:
    """``model.json["light_decoder"]``: architecture, measured quality, the bar and whether it was met."""
    return {"config": to_dict(config), "quality": dict(quality), "quality_bar": dict(QUALITY_BAR),
            "meets_quality_bar": meets_quality_bar(quality)}
