"""The MAISI autoencoder (MONAI ``AutoencoderKlMaisi``) that maps each MRI sequence to a 4-channel latent.

CCELLA++ encodes AxT2, HighB and ADC separately with NVIDIA's MAISI autoencoder (4x downsampling per axis) and
concatenates the three 4-channel latents into the 12-channel latent the diffusion U-Net works on. Two fixes against
the authors' code:

- latents are the posterior **mean** ``mu``, not one stochastic sample ``mu + sigma * eps`` fixed once;
- the latent scale factors (``1/std`` per sequence) come from the whole training set (:class:`LatentStats`,
  streaming, exact over DDP ranks), not from one random batch.

Weights: NVIDIA's ``model_maisi_autoencoder_epoch273_alternative.pt`` (a plain state dict) or the newer MAISI files
are NVIDIA-licensed; they are loaded from a path the user gives (``weights_path``), never bundled or downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CCELLAError
from ..precision import autocast_context, choose_dtype
from .weights import check_state_dict, load_state_dict_file

__all__ = [
    "AutoencoderConfig",
    "build_autoencoder",
    "load_autoencoder_weights",
    "SequenceAutoencoder",
    "LatentStats",
    "load_autoencoder_dir",
    "ENCODER_PARTS",
]

#: Parameter-name prefixes of the parts that make the latents (encoder and latent heads): frozen by
#: ``train_autoencoder.train_encoder: false`` and checked by ``ccella replace-decoder``.
ENCODER_PARTS = ("encoder.", "quant_conv_mu.", "quant_conv_log_sigma.")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the MAISI autoencoder; defaults = the paper's (NVIDIA MAISI, 20.94 M parameters).

    Args:
        spatial_dims: 3 (volumes).
        in_channels / out_channels: 1: each sequence is encoded on its own (CCELLA++); or the number of sequences
            (demo): the sequences of an exam are encoded together, as the channels of one volume, so each
            sequence's latent can draw on the others (a lesion's ADC dip on its HighB brightness) and one training
            step sees every sequence of its crops for the cost of one.
        latent_channels: 4 latent channels per sequence (a joint autoencoder has ``4 x in_channels``).
        num_channels: feature channels per level; len(num_channels) - 1 halvings, so 4x downsampling per axis for 3
            levels. Each must be divisible by ``norm_num_groups``.
        num_res_blocks: residual blocks per level.
        attention_levels: attention per level (MAISI: none).
        norm_num_groups / norm_eps: GroupNorm settings (32 / 1e-6).
        with_encoder_nonlocal_attn / with_decoder_nonlocal_attn: MAISI: False.
        use_checkpointing: activation checkpointing (saves memory when training).
        use_convtranspose: transposed convolutions to upsample (MAISI: False, nearest + conv).
        norm_float16: cast GroupNorm outputs to fp16 (the reference's ``true``). ``None`` = choose from the device:
            True only on a CUDA device computing in reduced precision; True fails on CPU ("Input type Half and bias
            type float"), so it is refused there.
        num_splits / dim_split: MAISI splits each convolution's input into ``num_splits`` pieces along spatial axis
            ``dim_split`` to save memory (reference: 2 / 1). MONAI's default 16 fails on small volumes ("Kernel
            size can't be greater than actual input size"): use 1 there.
        weights_path: optional local weights file (NVIDIA's MAISI ``.pt`` or a ``.safetensors``), loaded by
            :func:`build_autoencoder`.

    The tiny test config: ``num_channels=(8, 8, 8)``, ``num_res_blocks=(1, 1, 1)``, ``norm_num_groups=4``,
    ``num_splits=1``.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 4
    num_channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    use_checkpointing: bool = False
    use_convtranspose: bool = False
    norm_float16: bool | None = None
    num_splits: int = 2
    dim_split: int = 1
    weights_path: Path | None = None

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        levels = len(self.num_channels)
        if levels == 0 or len(self.num_res_blocks) != levels or len(self.attention_levels) != levels:
            raise ValueError(
                f"num_channels {self.num_channels}, num_res_blocks {self.num_res_blocks} and attention_levels "
                f"{self.attention_levels} must have the same non-zero length"
            )
        bad = [c for c in self.num_channels if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"num_channels {self.num_channels} must be divisible by norm_num_groups "
                             f"{self.norm_num_groups}")
        if min(self.in_channels, self.out_channels, self.latent_channels) <= 0:
            raise ValueError("in_channels, out_channels and latent_channels must be positive")
        if self.in_channels != self.out_channels:
            raise ValueError(f"in_channels {self.in_channels} and out_channels {self.out_channels} must be equal "
                             "(1: each sequence on its own; the number of sequences: all in one pass)")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
        if not 0 <= self.dim_split < self.spatial_dims:
            raise ValueError(f"dim_split must be a spatial axis 0..{self.spatial_dims - 1}, got {self.dim_split}")

    @property
    def joint(self) -> bool:
        """All sequences of an exam in one pass (``in_channels`` > 1) rather than each on its own."""
        return self.in_channels > 1

    @property
    def total_latent_channels(self) -> int:
        """The network's latent channels: ``latent_channels`` per sequence it encodes at once."""
        return self.latent_channels * self.in_channels

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (4 for the paper's 3 levels)."""
        return 2 ** (len(self.num_channels) - 1)


def _resolve_norm_float16(cfg: AutoencoderConfig, device: torch.device) -> bool:
    if cfg.norm_float16 is None:
        # fp16 GroupNorm outputs only work where autocast turns them back into the conv's dtype, i.e. CUDA autocast.
        return device.type == "cuda" and choose_dtype(device) != torch.float32
    if cfg.norm_float16 and device.type != "cuda":
        raise CCELLAError(
            f"autoencoder config norm_float16: true only works on CUDA (on {device.type} it fails with 'Input type "
            f"Half and bias type float'); set it to false or leave it unset to choose from the device"
        )
    return cfg.norm_float16


def build_autoencoder(cfg: AutoencoderConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build MONAI's ``AutoencoderKlMaisi`` from ``cfg`` on ``device``, with ``cfg.weights_path`` loaded if set.

    Returns:
        The network (``encode(x) -> (mu, sigma)``, ``decode(z) -> x``), in train mode.
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    device = torch.device(device)
    model = AutoencoderKlMaisi(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_res_blocks=list(cfg.num_res_blocks),
        num_channels=list(cfg.num_channels),
        attention_levels=list(cfg.attention_levels),
        latent_channels=cfg.total_latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        with_encoder_nonlocal_attn=cfg.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_decoder_nonlocal_attn,
        include_fc=False,
        use_combined_linear=False,
        use_flash_attention=False,  # no attention in MAISI's AE; flash attention would also need CUDA
        use_checkpointing=cfg.use_checkpointing,
        use_convtranspose=cfg.use_convtranspose,
        num_splits=cfg.num_splits,
        dim_split=cfg.dim_split,
        norm_float16=_resolve_norm_float16(cfg, device),
        print_info=False,
        save_mem=device.type == "cuda",  # empties the CUDA cache between blocks; meaningless elsewhere
    )
    if cfg.weights_path is not None:
        load_autoencoder_weights(model, cfg.weights_path)
    return model.to(device)


def load_autoencoder_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load autoencoder weights from a local file into ``model`` (strict: every key, every shape).

    Accepts NVIDIA's MAISI files (a plain state dict such as ``model_maisi_autoencoder_epoch273_alternative.pt``,
    or one nested under ``"unet_state_dict"`` / ``"autoencoder"`` / ``"state_dict"`` ..., with or without a DDP
    ``module.`` prefix) and ``.safetensors``. ``.pt``/``.pth`` files are read only with
    ``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises:
        CCELLAError: naming the file when it is missing, is a pickle that needs code execution (refused, not run),
            holds no state dict, or does not fit ``model`` (listing a few missing / unexpected / mismatched keys).
    """
    path = Path(path)
    state = load_state_dict_file(path)
    check_state_dict(state, model, source=path, component="autoencoder")
    model.load_state_dict(state)
    return model


class SequenceAutoencoder:
    """Encode and decode single MRI sequences with a MAISI autoencoder, for inference (no gradients).

    Args:
        model: the autoencoder (from :func:`build_autoencoder`); put in eval mode.
        device: where to compute; inputs are moved there.
        dtype: compute dtype; None = :func:`~CCELLACore.precision.choose_dtype` (bf16 autocast only
            where the hardware has native bf16, else fp32). Outputs are always float32.

    Example:
        >>> ae = SequenceAutoencoder(build_autoencoder(cfg), "cpu")   # doctest: +SKIP
        >>> z = ae.encode(x)        # (B, 1, 32, 32, 16) -> (B, 4, 8, 8, 4)   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = choose_dtype(self.device) if dtype is None else dtype
        self.factor = 2 ** self._levels()

    def _levels(self) -> int:
        # Number of downsamplings = number of MaisiDownsample blocks in the encoder.
        return sum(type(b).__name__ == "MaisiDownsample" for b in self.model.encoder.blocks)

    @property
    def latent_channels(self) -> int:
        return int(self.model.latent_channels)

    @property
    def in_channels(self) -> int:
        # The encoder's first convolution (MaisiConvolution wraps a MONAI Convolution).
        first = next(m for m in self.model.encoder.modules() if isinstance(m, nn.Conv3d | nn.Conv2d))
        return int(first.in_channels)

    def _check(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise CCELLAError(f"{what} must have shape (B, {channels}, X, Y, Z), got {tuple(x.shape)}")
        if multiple > 1 and any(s % multiple for s in x.shape[2:]):
            raise CCELLAError(f"{what} spatial size {tuple(x.shape[2:])} must be divisible by {multiple}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean latent of single-sequence volumes (or of whole exams, for a joint autoencoder).

        Args:
            x: (B, C, X, Y, Z) intensities normalised to [0, 1], C = ``in_channels`` (1; S for a joint autoencoder);
                X, Y, Z divisible by the downsampling factor.

        Returns:
            z: (B, 4C, X/4, Y/4, Z/4) float32 (the paper's 3 levels).
        """
        self._check(x, self.in_channels, "image", self.factor)
        with autocast_context(self.device, self.dtype):
            z_mu, _ = self.model.encode(x.to(self.device, torch.float32))
        return z_mu.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Volumes from (unscaled) latents.

        Args:
            z: (B, 4C, x, y, z) latents (divide scaled diffusion latents by their scale factor first).

        Returns:
            x: (B, C, 4x, 4y, 4z) float32, C = ``in_channels``.
        """
        self._check(z, self.latent_channels, "latent", 1)
        with autocast_context(self.device, self.dtype):
            x = self.model.decode(z.to(self.device, torch.float32))
        return x.float()

    @property
    def joint(self) -> bool:
        """The autoencoder takes all sequences of an exam in one pass (``AutoencoderConfig.in_channels`` > 1)."""
        return self.in_channels > 1

    def encode_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """Encode each sequence separately and concatenate: (B, S, X, Y, Z) -> (B, 4S, X/4, Y/4, Z/4), channel group
        ``4s..4s+3`` = sequence ``s`` (the reference's 12-channel [AxT2, HighB, ADC] latent). A joint autoencoder
        encodes the S sequences together into the same shape (its channel groups are not one sequence's each)."""
        if self.joint:
            return self.encode(x)
        b, s = x.shape[:2]
        z = self.encode(x.reshape(b * s, 1, *x.shape[2:]))
        return z.reshape(b, s * z.shape[1], *z.shape[2:])

    def decode_sequences(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_sequences`: (B, 4S, x, y, z) -> (B, S, 4x, 4y, 4z)."""
        if self.joint:
            return self.decode(z)
        b, c = z.shape[:2]
        lc = self.latent_channels
        if c % lc:
            raise CCELLAError(f"latent channels {c} are not a multiple of {lc} (one group per sequence)")
        x = self.decode(z.reshape(b * (c // lc), lc, *z.shape[2:]))
        return x.reshape(b, c // lc, *x.shape[2:])


class LatentStats:
    """Streaming per-sequence mean and standard deviation of latents over a whole data set.

    Chunks are merged with Chan et al.'s parallel update in float64 (count, mean, M2), so the result does not depend
    on how the data set is split into batches, and :meth:`all_reduce` combines DDP ranks exactly.
    The scale factor of a sequence is ``1/std`` (unbiased std, as MAISI's ``1/torch.std(z)``), computed over every
    latent value of that sequence's 4 channels.

    Args:
        sequences: names in latent channel order (4 channels each).
        latent_channels: channels per sequence.

    Example:
        >>> stats = LatentStats(("AxT2", "HighB", "ADC"))
        >>> for z in loader: stats.update(z)              # z: (B, 12, x, y, z)   # doctest: +SKIP
        >>> stats.all_reduce(); stats.scale_factors()      # {"AxT2": 1.3, ...}     # doctest: +SKIP
    """

    def __init__(self, sequences: Sequence[str] = ("AxT2", "HighB", "ADC"), latent_channels: int = 4):
        self.sequences = tuple(sequences)
        self.latent_channels = latent_channels
        n = len(self.sequences)
        self.count = torch.zeros(n, dtype=torch.float64)
        self.mean = torch.zeros(n, dtype=torch.float64)
        self.m2 = torch.zeros(n, dtype=torch.float64)

    def _merge(self, i: int, count: float, mean: float, m2: float) -> None:
        n_a = self.count[i].item()
        n = n_a + count
        if count == 0:
            return
        delta = mean - self.mean[i].item()
        self.mean[i] = self.mean[i] + delta * count / n
        self.m2[i] = self.m2[i] + m2 + delta * delta * n_a * count / n
        self.count[i] = n

    def update_sequence(self, sequence: str, z: torch.Tensor) -> None:
        """Add latents of one sequence: z (B, 4, x, y, z)."""
        if sequence not in self.sequences:
            raise CCELLAError(f"unknown sequence '{sequence}'; expected one of {list(self.sequences)}")
        if z.ndim < 2 or z.shape[1] != self.latent_channels:
            raise CCELLAError(f"latent of {sequence} must have shape (B, {self.latent_channels}, ...), got "
                              f"{tuple(z.shape)}")
        values = z.detach().to("cpu", torch.float64).reshape(-1)
        if not torch.isfinite(values).all():
            raise CCELLAError(f"latent of {sequence} contains NaN or Inf values")
        mean = values.mean().item()
        self._merge(self.sequences.index(sequence), values.numel(), mean, ((values - mean) ** 2).sum().item())

    def update(self, z: torch.Tensor) -> None:
        """Add multi-sequence latents: z (B, 4S, x, y, z), channel group ``4s..4s+3`` = sequence ``s``."""
        expected = self.latent_channels * len(self.sequences)
        if z.ndim < 2 or z.shape[1] != expected:
            raise CCELLAError(f"latent must have shape (B, {expected}, ...) for sequences {list(self.sequences)}, "
                              f"got {tuple(z.shape)}")
        lc = self.latent_channels
        for i, seq in enumerate(self.sequences):
            self.update_sequence(seq, z[:, i * lc:(i + 1) * lc])

    def all_reduce(self) -> None:
        """Combine the statistics of all DDP ranks (no-op unless torch.distributed is initialised).

        Two sum-reductions: counts and sums give the global mean; then each rank's M2 about that global mean
        (``M2_r + n_r (mean_r - mean)^2``) is summed. Exact, and every rank ends with the same numbers.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        sums = torch.stack([self.count, self.count * self.mean]).to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        count, total = sums.cpu()
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        m2 = (self.m2 + self.count * (self.mean - mean) ** 2).to(device)
        dist.all_reduce(m2, op=dist.ReduceOp.SUM)
        self.count, self.mean, self.m2 = count, mean, m2.cpu()

    def std(self) -> dict[str, float]:
        """Unbiased standard deviation per sequence (needs at least 2 values each)."""
        out = {}
        for i, seq in enumerate(self.sequences):
            n = self.count[i].item()
            if n < 2:
                raise CCELLAError(f"latent statistics of {seq} need at least 2 values, got {int(n)}")
            out[seq] = math.sqrt(self.m2[i].item() / (n - 1))
        return out

    def means(self) -> dict[str, float]:
        return {seq: self.mean[i].item() for i, seq in enumerate(self.sequences)}

    def scale_factors(self) -> dict[str, float]:
        """``{sequence: 1/std}``; a constant latent (std 0) is an error naming the sequence."""
        out = {}
        for seq, s in self.std().items():
            if not s > 0:
                raise CCELLAError(f"latents of {seq} have zero standard deviation; cannot compute a scale factor")
            out[seq] = 1.0 / s
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.count, self.mean, self.m2 = (state[k].to(torch.float64).clone() for k in ("count", "mean", "m2"))


def load_autoencoder_dir(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The ``autoencoder`` component of a model directory (``ccella train-autoencoder`` output, or a CCELLA++ model
    that embeds its autoencoder), built from the directory's own config; returns ``(model, model.json metadata)``.

    Raises:
        CCELLAError: no such directory, no ``autoencoder`` section/component, or weights not matching the config.
    """
    from ..config import from_dict
    from ..errors import ConfigError
    from .serialization import load_model_dir, read_model_config

    directory = Path(directory)
    config = read_model_config(directory)
    section = config.get("autoencoder")
    if not isinstance(section, dict):
        raise CCELLAError(f"{directory / 'config.yaml'}: no 'autoencoder' section; is this an autoencoder model?")
    try:
        cfg = from_dict(AutoencoderConfig, {k: v for k, v in section.items() if k != "weights_path"},
                        file=directory / "config.yaml", prefix="autoencoder")
    except ConfigError as exc:
        raise CCELLAError(str(exc)) from None
    model = build_autoencoder(cfg, "cpu")
    _, metadata, _ = load_model_dir(directory, {"autoencoder": model})
    return model.to(device).eval(), metadata
