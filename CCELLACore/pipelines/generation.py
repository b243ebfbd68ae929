"""``CCELLAPipeline``: a report in, a synthetic AxT2 / HighB / ADC exam out (diffusers-style pipeline object).

Example:
    >>> pipe = CCELLAPipeline.from_pretrained("CCELLACore/demo_model")          # doctest: +SKIP
    >>> out = pipe("PI-RADS 5 lesion in the left peripheral zone ...", seed=0)  # doctest: +SKIP
    >>> out.exam.volumes["ADC"], out.class_probability                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import from_dict
from ..data.normalization import denormalize_array
from ..data.study import Exam
from ..data.volume import SYNTHETIC_KEY, make_grid
from ..errors import CCELLAError, ConfigError
from ..models.autoencoder import build_autoencoder
from ..models.ldm import CCELLALDM
from ..models.light_decoder import DecodeTiling, SequenceCodec, choose_decoder, load_light_decoder
from ..models.serialization import load_model_dir, read_model_config
from ..models.text_encoder import TextEncoder
from ..precision import autocast_context, choose_dtype, describe_device, unet_memory_format
from ..reports import ReportError, check_report, is_empty_report
from ..sampling.config import DEFAULT_SAMPLER, check_guidance_interval, check_side_scale
from ..sampling.guidance import guided_prediction
from ..sampling.samplers import SUPPORTED_SAMPLERS, make_sampler
from ..settings import CCELLAConfig

__all__ = ["CCELLAPipeline", "GenerationOutput", "MODEL_HASH_KEY"]

logger = logging.getLogger("CCELLACore")

#: Metadata key carrying the generating model's hash in every synthetic volume (Slicer shows it on the node).
MODEL_HASH_KEY = "CCELLA_model_sha256"
@dataclass
class GenerationOutput:
    """A generated exam.

    Attributes:
        exam: AxT2 / HighB / ADC volumes (ADC in 10^-6 mm^2/s; AxT2 and HighB in the model's arbitrary units) on one
            grid with a proper LPS geometry, every volume marked synthetic.
        class_probability: P(clinically significant cancer) the adapter predicts from the report.
        settings: everything needed to reproduce the exam (seed, sampler, steps, guidance, spacing, model hash).
    """

    exam: Exam
    class_probability: float
    settings: dict[str, Any] = field(default_factory=dict)


class CCELLAPipeline:
    """Report-conditioned bpMRI generation with a trained CCELLA++ model directory.

    Args:
        ldm: the adapter + U-Net (:class:`~CCELLACore.models.ldm.CCELLALDM`), EMA weights.
        autoencoder: the sequences' autoencoder.
        text_encoder: the report encoder the model was trained with.
        config: the model's :class:`~CCELLACore.settings.CCELLAConfig`.
        metadata: the model directory's ``model.json``.
        device: where to compute.
        dtype: compute precision; None = from the device (bf16 only where the hardware has it natively).
        light_decoder: decode with this distilled decoder instead of the autoencoder's full one (None = full).
        decode_tiling: decode in tiles (:class:`~CCELLACore.models.light_decoder.DecodeTiling`; None = whole).
    """

    def __init__(self, ldm, autoencoder, text_encoder, config, metadata: dict[str, Any], device: torch.device,
                 dtype: torch.dtype | None = None, *, light_decoder=None, decode_tiling: DecodeTiling | None = None):
        self.dtype = choose_dtype(device) if dtype is None else dtype
        self.memory_format = unet_memory_format(device, self.dtype)
        self.ldm = ldm.to(device, memory_format=self.memory_format).eval()
        self.autoencoder = SequenceCodec(autoencoder, device, self.dtype, light_decoder=light_decoder,
                                         tiling=decode_tiling)
        self.text_encoder = text_encoder
        self.config = config
        self.metadata = metadata
        self.device = device
        self.sequences: tuple[str, ...] = tuple(metadata["sequences"])
        self.objective: str = metadata["objective"]
        self.model_hash: str = metadata.get("model_hash", "")

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto",
                        dtype: torch.dtype | None = None, *, decoder: str = "auto",
                        decode_tiling: DecodeTiling | None = None) -> "CCELLAPipeline":
        """Load a model directory (``ccella train-ldm`` output); never runs code from it (safetensors only).

        ``decoder``: ``"full"`` (the autoencoder's), ``"light"`` (the distilled one ``ccella distill-decoder``
        added; error if there is none) or ``"auto"``: light only where its recorded quality met the bar
        (:data:`~CCELLACore.models.light_decoder.QUALITY_BAR`), else full. ``decode_tiling``: decode in tiles.

        Raises:
            CCELLAError: missing directory or files, a config that does not match the weights (names the component
                and key), or a text encoder that cannot be found locally.
        """

        directory = Path(directory)
        raw = read_model_config(directory)
        try:
            if isinstance(raw.get("autoencoder"), dict):
                raw["autoencoder"] = {k: v for k, v in raw["autoencoder"].items() if k != "weights_path"}
            config = from_dict(CCELLAConfig, raw, file=directory / "config.yaml")
        except ConfigError as exc:
            raise CCELLAError(str(exc)) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        ldm = CCELLALDM(config.ldm)
        autoencoder = build_autoencoder(config.autoencoder, "cpu")
        _, metadata, state_dicts = load_model_dir(directory, {"ldm": ldm, "autoencoder": autoencoder})
        light = None
        if choose_decoder(decoder, metadata, directory) == "light":
            light = load_light_decoder(directory, metadata, state_dicts)
        text_encoder = TextEncoder.from_config(config.text_encoder, device=device)
        if text_encoder.feature_dim != config.ldm.adapter.input_dim:
            raise CCELLAError(f"{directory}: text encoder {config.text_encoder.name_or_path} gives "
                              f"{text_encoder.feature_dim}-d features, the model expects {config.ldm.adapter.input_dim}")
        return cls(ldm, autoencoder, text_encoder, config, metadata, device, dtype, light_decoder=light,
                   decode_tiling=decode_tiling)

    # ------------------------------------------------------------------------------------------------- steps
    @property
    def supported_samplers(self) -> tuple[str, ...]:
        return SUPPORTED_SAMPLERS[self.objective]

    def check_inputs(self, report: str | None, unconditional: bool, steps: int, guidance: float,
                     spacing: tuple[float, float, float] | None) -> str:
        if unconditional:
            if not is_empty_report(report):
                raise ReportError("give either a report or unconditional=True (--unconditional), not both")
            return ""
        if is_empty_report(report):
            raise ReportError("the report is empty; to generate without a report use --unconditional "
                              "(unconditional=True)")
        if guidance < 0:
            raise CCELLAError(f"guidance must be >= 0, got {guidance}")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise CCELLAError(f"spacing must be 3 positive values in mm, got {spacing}")
        return check_report(report)

    def encode_prompt(self, report: str):
        """(conditional, unconditional) token features; the null condition is the empty-report encoding."""
        null = self.text_encoder.null_encoding()
        cond = self.text_encoder.encode([report], names=["report"]) if report else null
        def as_dict(encoding):
            return {"text": encoding.features.to(self.device), "text_mask": encoding.mask.to(self.device)}
        return as_dict(cond), as_dict(null)

    def latent_shape(self) -> tuple[int, ...]:
        grid = tuple(self.metadata["grid_size"])
        factor = self.config.autoencoder.downsample_factor
        channels = self.config.autoencoder.latent_channels * len(self.sequences)
        return (1, channels, *(s // factor for s in grid))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(1, 4S, x, y, z) scaled latents -> (S, X, Y, Z) normalised volumes in [0, 1]."""
        group = self.config.autoencoder.latent_channels
        factors = torch.tensor([self.metadata["latent_scale_factors"][s] for s in self.sequences])
        per_channel = factors.repeat_interleave(group).view(1, -1, 1, 1, 1).to(latents)
        images = self.autoencoder.decode_sequences(latents / per_channel)[0]
        return images.clamp(0.0, 1.0).cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Encode and decode normalised volumes with the model's autoencoder: (S', X, Y, Z) -> (S', X, Y, Z) in
        [0, 1], any number S' of sequences when each is encoded on its own (a joint autoencoder takes exactly its own
        S). Shows what the latent space can hold."""
        x = torch.as_tensor(np.asarray(images, np.float32))[None]
        z = self.autoencoder.encode_sequences(x)
        return self.autoencoder.decode_sequences(z)[0].clamp(0.0, 1.0).cpu().numpy()

    def to_exam(self, images: np.ndarray, spacing: tuple[float, float, float], extra: dict[str, str]) -> Exam:
        """Normalised images -> physical units on a grid centred at the LPS origin, marked synthetic."""
        grid = make_grid(images.shape[1:], spacing, center_lps=(0.0, 0.0, 0.0))
        refs = self.metadata["reference_intensities"]
        adc_window = tuple(self.config.preprocess.ldm.adc_window)  # the window the training latents were made with
        volumes = {}
        for s, name in enumerate(self.sequences):
            array = denormalize_array(images[s], name, reference_intensity=refs[name],
                                      adc_window=adc_window).astype(np.float32)
            volumes[name] = grid.with_array(array, **{SYNTHETIC_KEY: "true", MODEL_HASH_KEY: self.model_hash,
                                                      "CCELLA_sequence": name, **extra})
        return Exam(volumes=volumes, case_id="synthetic")

    # ------------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        report: str | None = None,
        *,
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        spacing: tuple[float, float, float] | None = None,
        unconditional: bool = False,
        progress: bool = False,
        guidance_interval: tuple[float, float] | None = None,
        side_scale: float | None = None,
    ) -> GenerationOutput:
        """Generate one exam.

        Args:
            report: the free-text report (up to 20 000 characters; longer token sequences keep their end).
            seed: the only source of randomness: same seed and settings on one machine, same volumes.
            steps: model evaluations (DDPM: up to 1000, the paper's setting); default: the model's ``sampling``.
            sampler: one of :attr:`supported_samplers`; default: the model's ``sampling`` config, else DPM-Solver++
                (noise models) or rectified flow (velocity models).
            guidance: classifier-free guidance scale (1 = none; needs a model trained with condition dropout).
            spacing: output voxel spacing in mm (default: the training set's median).
            unconditional: generate without a report (the null condition).
            guidance_interval: noise levels ``(low, high)`` (t / T, 1 = pure noise) where guidance applies; default:
                the model's ``sampling`` config.
            side_scale: amplitude of the U-Net's side map as a multiple of the side head's reading (models with
                ``ldm.unet.side_map``); default: the model's ``sampling`` config.
        """
        from tqdm.auto import tqdm

        # 1. Check inputs; fill in the model's default sampling settings
        defaults = self.config.sampling
        steps = defaults.steps if steps is None else steps
        guidance = defaults.guidance if guidance is None else guidance
        try:
            low, high = check_guidance_interval(defaults.guidance_interval if guidance_interval is None
                                                else guidance_interval)
        except ValueError as exc:
            raise ConfigError(str(exc), key="guidance_interval") from None
        try:
            side_scale = check_side_scale(defaults.side_scale if side_scale is None else side_scale)
        except ValueError as exc:
            raise ConfigError(str(exc), key="side_scale") from None
        sampler_name = sampler or defaults.sampler or DEFAULT_SAMPLER[self.objective]
        report = self.check_inputs(report, unconditional, steps, guidance, spacing)
        spacing = tuple(float(s) for s in (spacing or self.metadata["spacing"]))
        # 2. Encode the report and the null condition
        cond, uncond = self.encode_prompt(report)
        spacing_t = torch.tensor([spacing], dtype=torch.float32, device=self.device)
        cond["spacing"], uncond["spacing"] = spacing_t, spacing_t
        # 3. Prepare timesteps and the initial latent
        shape = self.latent_shape()
        scheduler = make_sampler(sampler_name, self.config.diffusion, steps,
                                 input_img_size_numel=int(np.prod(shape[2:])))
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        x = scheduler.prepare_latents(shape, generator, device=self.device)

        # Side contrast and side scale (a side-map model and a report): the report's side-head reading, scaled, feeds
        # the U-Net; in a guided pass [report; null] the null half gets it mirrored (contrast) or keeps its own.
        sided = bool(self.config.ldm.unet.side_map and not unconditional)
        side_contrast = bool(defaults.side_contrast and sided)
        side_scale = side_scale if sided else 1.0
        # the map is linear in p_left - p_right, so scaling those two entries scales the map
        amplitude = torch.tensor([1.0, side_scale, side_scale], device=self.device)
        batch = shape[0]

        def side_transform(own: torch.Tensor) -> torch.Tensor:
            report = own[:batch] * amplitude.to(own.dtype)
            if own.shape[0] == batch:  # conditional pass only
                return report
            return torch.cat([report, report[:, [0, 2, 1]] if side_contrast else own[batch:]])

        adjust = side_transform if side_contrast or side_scale != 1.0 else None

        def model_fn(x_in, t_in, c):
            x_in = x_in.contiguous(memory_format=self.memory_format)
            with autocast_context(self.device, self.dtype):
                out = self.ldm(x_in, t_in, c["spacing"], c["text"], c["text_mask"], side_transform=adjust)
            return out.prediction.float(), out.class_probs.float()

        # 4. Denoising loop
        probs = None
        for t in tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not progress):
            level = float(t) / self.config.diffusion.num_train_timesteps
            guided = guided_prediction(model_fn, x, t, cond, uncond, guidance if low <= level <= high else 1.0)
            probs = guided.aux
            x = scheduler.step(guided.prediction, t, x, generator)
        # 5. Decode each sequence and restore physical units
        images = self.decode_latents(x)
        class_probability = float(probs[0, 1]) if probs is not None else float("nan")
        settings = {
            "seed": int(seed), "sampler": sampler_name, "steps": int(steps), "guidance": float(guidance),
            "guidance_interval": [low, high], "side_contrast": side_contrast, "side_scale": side_scale,
            "spacing": list(spacing), "unconditional": bool(unconditional), "model_hash": self.model_hash,
            "device": describe_device(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "unet_memory_format": str(self.memory_format).replace("torch.", ""),
            "decoder": self.autoencoder.decoder_name,
            "decode_tile": list(self.autoencoder.tiling.roi) if self.autoencoder.tiling is not None else None,
        }
        exam = self.to_exam(images, spacing, {"CCELLA_seed": str(seed), "CCELLA_sampler": sampler_name})
        return GenerationOutput(exam=exam, class_probability=class_probability, settings=settings)
