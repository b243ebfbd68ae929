"""CCELLA U-Net: MONAI's MAISI diffusion U-Net with an exam-class input in place of MAISI's body-region inputs.

Conditioning, as in the reference (`diffusion_model_unet_maisi_prostate.py`): three embeddings of size
``4 * num_channels[0]`` (256 at the paper's size) are **concatenated** (not summed) into one
``12 * num_channels[0]`` vector (768) that every ResBlock adds after its first convolution:

- the sinusoidal timestep through ``Linear(C0, 4 C0) - SiLU - Linear`` (MONAI's ``time_embed``);
- the adapter's class probabilities through ``class_layer`` ``Linear(num_classes, 4 C0) - SiLU - Linear``
  (the reference's ``pirads_layer``);
- the voxel spacing in mm through ``spacing_layer`` ``Linear(3, 4 C0) - SiLU - Linear`` (MAISI's).

Cross-attention (levels with ``attention_levels`` True and the middle block) attends to the adapter's context.

Example:
    >>> import torch
    >>> unet = CCELLAUNet(UNetConfig.tiny())
    >>> x = torch.randn(1, 12, 16, 16, 8)
    >>> out = unet(x, torch.tensor([10]), torch.randn(1, 8, 32), torch.tensor([[0.3, 0.7]]),
    ...            torch.tensor([[2.0, 2.0, 2.0]]))
    >>> tuple(out.shape)
    (1, 12, 16, 16, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock

__all__ = ["UNetConfig", "CCELLAUNet", "SIDES", "coordinate_maps", "side_map", "map_reference_unet_keys"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the CCELLA U-Net; defaults are the paper's (`CCELLApp_def.json`).

    Attributes:
        in_channels / out_channels: latent channels, 3 sequences x 4 AE latent channels = 12 (CCELLA AxT2-only: 4).
        num_channels: channels per level; ``num_channels[0]`` sets the embedding sizes (4x each).
        attention_levels: levels with a spatial transformer (cross-attention to the adapter's context).
        num_head_channels: channels per attention head at each level (ignored where there is no attention).
        num_res_blocks: ResBlocks per level on the way down (MONAI adds one on the way up).
        transformer_num_layers: transformer blocks per spatial transformer.
        cross_attention_dim: context size = the adapter's width.
        norm_num_groups / norm_eps: GroupNorm settings; every entry of ``num_channels`` must divide by the groups.
        upcast_attention: attention logits in float32 under mixed precision.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention``. MONAI's constructor refuses it
            without CUDA, but the PyTorch kernel runs on every device, so it is switched on after construction
            (same numbers as the explicit softmax path, less memory).
        include_fc / use_combined_linear / resblock_updown: MONAI options, the reference's values.
        num_classes: size of the class-probability input (the adapter's ``num_classes``).
        class_input_scale: the class probabilities are multiplied by this before ``class_layer``. The reference feeds
            ``softmax * 100`` (a side effect of its x100 conditioning transform); 100 keeps the authors' input
            range (and their weights usable) and puts it on the same scale as the spacing input (~50-300).
        spacing_input_scale: spacing in mm is multiplied by this before ``spacing_layer`` (reference and MAISI: 100).
        coordinate_channels: 0 (paper) or 3: fixed x, y, z coordinate maps in [-1, 1] appended to the input
            ("CoordConv"). Convolutions and MONAI's attention carry no position: at high noise, where the layout
            of the exam is decided, the input holds no anatomy, so without them the U-Net can place the report's
            left-sided lesion on the left only through the zero padding at the volume's edge. Measured on the demo
            (docs/design.md, "coordinate maps"): a 3000-step fine-tune with them did not yet improve the side.
        side_map: False (paper) or True: one more input channel, the report's lesion side as a map,
            ``(p_left - p_right) * x`` with x the patient-left coordinate in [-1, 1] (LPS: larger index = patient
            left) and p the side probabilities of the LDM's side head (:func:`side_map`). It is positive on the
            reported side, zero for reports without a lesion. Cross-attention alone did not bind the report's side
            to a position on the demo (docs/design.md, "The report's side"): the map gives the side a place.
    """

    in_channels: int = 12
    out_channels: int = 12
    num_channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)
    num_res_blocks: int = 2
    transformer_num_layers: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    upcast_attention: bool = True
    use_flash_attention: bool = True
    include_fc: bool = False
    use_combined_linear: bool = False
    resblock_updown: bool = False
    num_classes: int = 2
    class_input_scale: float = 100.0
    spacing_input_scale: float = 100.0
    coordinate_channels: int = 0
    side_map: bool = False

    def __post_init__(self) -> None:
        levels = len(self.num_channels)
        if levels < 1:
            raise ValueError("unet num_channels must not be empty")
        if len(self.attention_levels) != levels or len(self.num_head_channels) != levels:
            raise ValueError(
                f"unet attention_levels ({len(self.attention_levels)}) and num_head_channels "
                f"({len(self.num_head_channels)}) need one entry per level of num_channels ({levels})"
            )
        bad = [c for c in self.num_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"unet num_channels {bad} are not multiples of norm_num_groups ({self.norm_num_groups})")
        for c, attn, head in zip(self.num_channels, self.attention_levels, self.num_head_channels):
            if attn and (head < 1 or c % head):
                raise ValueError(f"unet level with {c} channels has attention but num_head_channels={head}")
        for name in ("in_channels", "out_channels", "num_res_blocks", "transformer_num_layers",
                     "cross_attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet {name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"unet num_classes must be >= 2, got {self.num_classes}")
        if self.coordinate_channels not in (0, 3):
            raise ValueError(f"unet coordinate_channels must be 0 or 3, got {self.coordinate_channels}")

    @property
    def downsampling_factor(self) -> int:
        """Latent sides must be multiples of this (one halving per level transition)."""
        return 2 ** (len(self.num_channels) - 1)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """Test-sized U-Net for latents such as (12, 16, 16, 8) and a 32-wide adapter."""
        return cls(num_channels=(8, 8, 16, 16), num_head_channels=(0, 0, 8, 8), num_res_blocks=1,
                   cross_attention_dim=32, norm_num_groups=4)


class CCELLAUNet(DiffusionModelUNetMaisi):
    """MAISI diffusion U-Net conditioned on timestep, exam-class probabilities and voxel spacing (concatenated
    embeddings) and on the adapter's context (cross-attention).

    Args:
        config: architecture, see :class:`UNetConfig`.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        config = config or UNetConfig()
        # The stock class sizes the ResBlocks' embedding input from its optional inputs: asking for the top-region
        # and spacing inputs gives time + 1 extra + spacing = 3 x 4 C0, the reference's concatenated size. The
        # 4-d region layer is then replaced by the class layer, which takes the region's place in the concatenation.
        super().__init__(
            spatial_dims=3,
            in_channels=config.in_channels + config.coordinate_channels + int(config.side_map),
            out_channels=config.out_channels,
            num_res_blocks=config.num_res_blocks,
            num_channels=config.num_channels,
            attention_levels=config.attention_levels,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            resblock_updown=config.resblock_updown,
            num_head_channels=config.num_head_channels,
            with_conditioning=True,
            transformer_num_layers=config.transformer_num_layers,
            cross_attention_dim=config.cross_attention_dim,
            upcast_attention=config.upcast_attention,
            include_fc=config.include_fc,
            use_combined_linear=config.use_combined_linear,
            use_flash_attention=False,  # MONAI refuses True without CUDA; set on the blocks below
            include_top_region_index_input=True,
            include_bottom_region_index_input=False,
            include_spacing_input=True,
        )
        self.config = config
        embed_dim = 4 * config.num_channels[0]
        del self.top_region_index_layer
        self.include_top_region_index_input = False
        self.class_layer = self._create_embedding_module(config.num_classes, embed_dim)
        self.set_flash_attention(config.use_flash_attention)

    def set_flash_attention(self, enabled: bool) -> None:
        """Use PyTorch's fused ``scaled_dot_product_attention`` (True) or MONAI's explicit softmax (False)."""
        for module in self.modules():
            if isinstance(module, (SABlock, CrossAttentionBlock)):
                module.use_flash_attention = bool(enabled)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        class_probs: torch.Tensor,
        spacing: torch.Tensor,
        side_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, in_channels, X, Y, Z) noisy latents; X, Y, Z multiples of ``config.downsampling_factor``.
            timesteps: (B,) diffusion steps.
            context: (B, N, cross_attention_dim) adapter context.
            class_probs: (B, num_classes) class probabilities in [0, 1] (softmax of the adapter's logits).
            spacing: (B, 3) voxel spacing of the generated volume in mm.
            side_probs: (B, 3) probabilities of (no lesion, left, right); required with ``side_map``, else ignored.

        Returns:
            (B, out_channels, X, Y, Z) prediction (noise or velocity, as the model was trained).
        """
        cfg = self.config
        batch = x.shape[0]
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        factor = cfg.downsampling_factor
        if any(side % factor for side in x.shape[2:]):
            raise ValueError(f"latent sides {tuple(x.shape[2:])} must be multiples of {factor} for this U-Net")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (B={batch}, N, {cfg.cross_attention_dim}), got {tuple(context.shape)}")
        if class_probs.shape != (batch, cfg.num_classes):
            raise ValueError(f"class_probs must be ({batch}, {cfg.num_classes}), got {tuple(class_probs.shape)}")
        if spacing.shape != (batch, 3):
            raise ValueError(f"spacing must be ({batch}, 3) in mm, got {tuple(spacing.shape)}")
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be ({batch},), got {tuple(timesteps.shape)}")

        emb = self._get_time_and_class_embedding(x, timesteps, None)
        class_emb = self.class_layer((class_probs * cfg.class_input_scale).to(emb.dtype))
        spacing_emb = self.spacing_layer((spacing * cfg.spacing_input_scale).to(emb.dtype))
        emb = torch.cat((emb, class_emb, spacing_emb), dim=1)  # reference order: time, class, spacing

        if cfg.coordinate_channels:
            x = torch.cat((x, coordinate_maps(x)), dim=1)
        if cfg.side_map:
            if side_probs is None or side_probs.shape != (batch, len(SIDES)):
                raise ValueError(f"side_probs must be ({batch}, {len(SIDES)}) with side_map, got "
                                 f"{None if side_probs is None else tuple(side_probs.shape)}")
            x = torch.cat((x, side_map(side_probs.to(x.dtype), x)), dim=1)
        h = self.conv_in(x)
        h, skips = self._apply_down_blocks(h, emb, context, None)
        h = self.middle_block(h, emb, context)
        h = self._apply_up_blocks(h, emb, context, skips)
        return self.out(h)


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, 3, X, Y, Z): each voxel's x, y and z index scaled to [-1, 1] (voxel centres)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1)


#: Classes of the side head, in order: the report's index lesion is absent, on the patient's left, on the right.
SIDES = ("none", "left", "right")


def side_map(side_probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 3) side probabilities (:data:`SIDES`) and (B, C, X, Y, Z) latents -> (B, 1, X, Y, Z)
    ``(p_left - p_right) * u``, u = the axis-0 coordinate in [-1, 1] (axis 0 = LPS x: larger = patient left)."""
    u = torch.linspace(-1.0, 1.0, x.shape[2], device=x.device, dtype=x.dtype).view(1, 1, -1, 1, 1)
    signed = (side_probs[:, 1] - side_probs[:, 2]).view(-1, 1, 1, 1, 1)
    return (signed * u).expand(-1, 1, -1, x.shape[3], x.shape[4])


def map_reference_unet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt the authors' U-Net state dict (MONAI 1.4) to this class (MONAI 1.6).

    ``pirads_layer.*`` becomes ``class_layer.*``; the self-attention ``attn1.out_proj.*`` weights are dropped: MONAI
    1.4 created them even with ``include_fc=False`` but never applied them (1,904,896 unused parameters at the paper's
    size), MONAI 1.6 does not create them.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".attn1.out_proj." in key:
            continue
        if key.startswith("pirads_layer."):
            key = "class_layer." + key[len("pirads_layer."):]
        mapped[key] = value
    return mapped
