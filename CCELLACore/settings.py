"""Project-level settings: one frozen dataclass per component section, loaded from a YAML config.

``load_config("paper")`` reads ``CCELLACore/configs/paper.yaml``; a section or key missing from the YAML takes the
dataclass default (= the paper's value); an unknown key or a wrong type is a :class:`~CCELLACore.errors.ConfigError`
naming the dotted key and the file.

Adding a section = one line in :class:`CCELLAConfig` (``name: SectionClass = field(default_factory=SectionClass)``),
where ``SectionClass`` is the component's own frozen config dataclass (defaults = the paper's values).

Example:
    >>> cfg = load_config("paper")
    >>> cfg.preprocess.ldm.grid.size
    (256, 256, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import builtin_config_path, from_dict, load_yaml
from .errors import ConfigError
from .data.phantoms_cli import PhantomGridConfig
from .data.preprocess import GridConfig, PreprocessConfig
from .data.study import SEQUENCES
from .models.autoencoder import AutoencoderConfig
from .models.ldm import LDMConfig
from .models.losses import LossConfig
from .models.text_encoder import TextEncoderConfig
from .sampling.config import SamplingConfig
from .sampling.objectives import NoiseScheduleConfig
from .training.configs import AutoencoderTrainingConfig, LDMTrainingConfig

__all__ = ["CCELLAConfig", "PreprocessSection", "load_config", "PREPROCESS_TARGETS"]


def _classifier_preprocess() -> PreprocessConfig:
    # Reference classifier grid (tfproxy*.py): 0.5 x 0.5 x 3.0 mm, padded/cropped to 256 x 256 x 32; it clips and
    # z-scores itself, so no [0, 1] normalisation here.
    return PreprocessConfig(grid=GridConfig((256, 256, 32), (0.5, 0.5, 3.0)), normalize=False)


@dataclass(frozen=True)
class PreprocessSection:
    """Preprocessing per consumer: the latent diffusion model and the csPCa classifier."""

    ldm: PreprocessConfig = field(default_factory=PreprocessConfig)
    classifier: PreprocessConfig = field(default_factory=_classifier_preprocess)


#: ``ccella preprocess --target`` choices.
PREPROCESS_TARGETS: tuple[str, ...] = ("ldm", "classifier")


@dataclass(frozen=True)
class CCELLAConfig:
    """The root of a config file; one field per section (add yours here, one line).

    ``sequences`` are the generated sequences in latent channel order: CCELLA++ = AxT2, HighB, ADC; CCELLA = AxT2
    only (then ``ldm.unet.in_channels`` = 4).
    """

    sequences: tuple[str, ...] = SEQUENCES
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    diffusion: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_ldm: LDMTrainingConfig = field(default_factory=LDMTrainingConfig)
    train_autoencoder: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    phantoms: PhantomGridConfig = field(default_factory=PhantomGridConfig)

    def __post_init__(self) -> None:
        if not self.sequences or any(s not in SEQUENCES for s in self.sequences):
            raise ValueError(f"sequences must be a non-empty subset of {list(SEQUENCES)}, got {list(self.sequences)}")
        if self.autoencoder.joint and self.autoencoder.in_channels != len(self.sequences):
            raise ValueError(f"autoencoder.in_channels must be 1 (each sequence on its own) or {len(self.sequences)} "
                             f"(the {len(self.sequences)} sequences in one pass), got {self.autoencoder.in_channels}")
        channels = self.autoencoder.latent_channels * len(self.sequences)
        for key, value in (("ldm.unet.in_channels", self.ldm.unet.in_channels),
                           ("ldm.unet.out_channels", self.ldm.unet.out_channels)):
            if value != channels:
                raise ValueError(f"{key} must be {channels} ({len(self.sequences)} sequences x "
                                 f"{self.autoencoder.latent_channels} latent channels), got {value}")


def load_config(name_or_path: str | Path = "paper", overrides: Sequence[str] = ()) -> CCELLAConfig:
    """Load a shipped config (``"paper"``, ``"tiny"``, ``"demo"``) or a YAML file into :class:`CCELLAConfig`.

    Args:
        overrides: ``"dotted.key=value"`` items (``--set`` on the command line) applied before validation; the value
            is read as YAML (``3``, ``2.0e-4``, ``[1, 2]``, ``true``).

    Raises:
        ConfigError: file not found, invalid YAML, unknown key or wrong type (names the dotted key and the file),
            an override without ``=``.
    """
    path = builtin_config_path(name_or_path)
    data = load_yaml(path)
    for item in overrides:
        apply_override(data, item, path)
    return from_dict(CCELLAConfig, data, file=path)


def apply_override(data: dict[str, Any], item: str, path: str | Path | None = None) -> None:
    """Set ``data[a][b][c] = value`` for ``item = "a.b.c=value"`` (value parsed as YAML), creating sections."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value", file=path)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML", key=key, file=path) from None
    *sections, leaf = key.split(".")
    node = data
    for i, part in enumerate(sections):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(sections[:i + 1])} is not a section", key=key, file=path)
        node = child
    node[leaf] = value
