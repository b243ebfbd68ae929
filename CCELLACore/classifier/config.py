"""The classifier's config: one YAML file (``CCELLACore/configs/classifier_<name>.yaml``) with the sections below,
validated strictly (an unknown key or a wrong type is a :class:`~CCELLACore.errors.ConfigError` naming the dotted key
and the file). Defaults are the reference's values (``tfproxy*.py`` of the CCELLA++ code) and say where we differ.

Example (``classifier_demo.yaml``)::

    preprocess: demo            # the project config whose preprocess.classifier grid is used
    network:
      sequences: [AxT2, HighB, ADC]
    train:
      epochs: 60

The grid is not repeated here: ``preprocess`` names the project config (``paper``, ``demo``, a YAML path) whose
``preprocess.classifier`` section (size, spacing, interpolation) brings every exam, real or synthetic, to the
classifier's grid. ``grid`` overrides only its size and spacing (tests: MONAI's EfficientNet-B0 needs at least 32
voxels per side, more than the ``tiny`` project config's 32 x 32 x 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import CONFIG_DIR, builtin_config_path, from_dict, load_yaml
from ..data.preprocess import GridConfig, PreprocessConfig
from ..data.study import SEQUENCES
from ..errors import ConfigError

__all__ = [
    "NetworkConfig",
    "IntensityConfig",
    "AugmentationConfig",
    "ClassifierTrainingConfig",
    "ClassifierConfig",
    "load_classifier_config",
    "classifier_config_path",
    "resolve_preprocess",
    "MIN_GRID_SIDE",
]

#: MONAI's EfficientNetBN pads for 224-pixel inputs; below 32 voxels per side a kernel outgrows the feature map.
MIN_GRID_SIDE = 32

_VARIANTS = tuple(f"efficientnet-b{i}" for i in range(8))


@dataclass(frozen=True)
class NetworkConfig:
    """The network: MONAI ``EfficientNetBN(variant, spatial_dims=3, in_channels=len(sequences), num_classes=2,
    pretrained=False)`` (its ImageNet weights are 2D only).

    Attributes:
        variant: ``efficientnet-b0`` (reference; 4.69 M parameters with 1 channel) to ``-b7``.
        sequences: input channels in this order: ``[AxT2]`` (CCELLA, reference ``-m`` off) or ``[AxT2, HighB, ADC]``
            (bpMRI; reference ``ConcatItemsd([axt2, highb, adc])``).
        batch_norm_momentum: PyTorch-convention momentum of the running statistics (MONAI's default 0.01 =
            its ``batch_norm_momentum=0.99``). Short runs (tests, demo) need a larger value (e.g. 0.1): evaluation
            uses the running statistics, which after n steps still hold (1 - momentum)^n of their initial values.
            The weights file is the same either way.
    """

    variant: str = "efficientnet-b0"
    sequences: tuple[str, ...] = ("AxT2",)
    batch_norm_momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {list(_VARIANTS)}, got {self.variant!r}")
        if not self.sequences or any(s not in SEQUENCES for s in self.sequences) \
                or len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"sequences must be distinct names from {list(SEQUENCES)}, got {list(self.sequences)}")
        if self.sequences[0] != "AxT2":
            raise ValueError(f"sequences must start with AxT2 (the grid and the saliency map follow it), "
                             f"got {list(self.sequences)}")
        if not 0.0 < self.batch_norm_momentum <= 1.0:
            raise ValueError(f"batch_norm_momentum must be in (0, 1], got {self.batch_norm_momentum}")


@dataclass(frozen=True)
class IntensityConfig:
    """Per-volume intensities, as the reference (``ClipIntensityPercentilesd`` then ``NormalizeIntensityd``):
    soft clipping ``f(x) = x + softplus(-k (x - p_lo)) / k - softplus(k (x - p_hi)) / k`` at the volume's
    ``lower``/``upper`` percentiles with sharpness ``k``, then a z-score over the whole volume; each sequence alone.

    Attributes:
        per_sequence: ``{sequence: [lower, upper]}`` percentiles replacing the common ones for that sequence; an
            upper of 100 means no upper clipping. The reference clips every sequence at 2-98; on a gland-sized field
            of view a HighB lesion is brighter than the 98th percentile and is clipped flat (measured on the phantoms:
            lesion means 76-149 against 98th percentiles of 45-93), so the demo config keeps HighB's top end.
    """

    lower_percentile: float = 2.0
    upper_percentile: float = 98.0
    sharpness: float = 10.0
    per_sequence: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pairs = {"": (self.lower_percentile, self.upper_percentile), **self.per_sequence}
        for seq, (low, high) in pairs.items():
            if seq and seq not in SEQUENCES:
                raise ValueError(f"per_sequence: unknown sequence {seq!r}; expected one of {list(SEQUENCES)}")
            if not 0.0 <= low < high <= 100.0:
                raise ValueError(f"need 0 <= lower < upper <= 100 percentiles{' for ' + seq if seq else ''}, "
                                 f"got {low}, {high}")
        if not self.sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness}")

    def percentiles(self, sequence: str) -> tuple[float, float]:
        return tuple(self.per_sequence.get(sequence, (self.lower_percentile, self.upper_percentile)))  # type: ignore


@dataclass(frozen=True)
class AugmentationConfig:
    """Training augmentation (MONAI array transforms, the same spatial transform for every channel), each applied
    with ``probability`` (reference: 0.5 each).

    Attributes:
        flip: ``RandFlip(spatial_axis=0)``: left-right (axis 0 of the LPS-oriented grid).
        rotate_deg: ``RandRotate(range_z=...)``: in-plane rotation up to +-15 degrees (bilinear, border padding).
        translate_mm: ``RandAffine(translate_range=...)`` in mm per axis, converted to voxels of the grid; the
            reference's (25, 25, 2) voxels at 0.5 x 0.5 x 3.0 mm = (12.5, 12.5, 6.0) mm (zero padding).
        zoom: ``RandZoom(min_zoom, max_zoom)`` (bilinear, zero padding, same size).
    """

    probability: float = 0.5
    flip: bool = True
    rotate_deg: float = 15.0
    translate_mm: tuple[float, float, float] = (12.5, 12.5, 6.0)
    zoom: tuple[float, float] = (0.9, 1.1)
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.rotate_deg < 0 or any(t < 0 for t in self.translate_mm):
            raise ValueError("rotate_deg and translate_mm must be >= 0")
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be (min, max) with 0 < min <= max, got {self.zoom}")


@dataclass(frozen=True)
class ClassifierTrainingConfig:
    """Optimisation (reference values unless said otherwise).

    Attributes:
        batch_size: exams per process and step (reference 32, one GPU); the global batch is batch_size x world size.
            Every batch is full (an epoch's last batch wraps around its shuffled order), so batch norm never sees
            a batch of one.
        epochs: from-scratch epochs (reference: Institution 1 pretraining 155; Institution 2 from scratch 385).
        finetune_epochs: epochs with ``--init`` (reference 385).
        lr / finetune_lr: AdamW learning rate from scratch (1e-4) and when fine-tuning (1e-5).
        weight_decay: AdamW weight decay (torch's default 0.01, as the reference).
        lr_power: polynomial decay ``lr (1 - step / total) ** lr_power`` over the real number of optimiser steps,
            stepped per iteration (the paper's schedule; the reference's README commands leave it off).
        focal_gamma: MONAI ``FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2)`` (no class weights).
        validate_every: epochs between validations (reference ``ValidationHandler(interval=5)``); the last epoch
            always validates. The model kept is the best validation AP (ties: the later epoch, as the reference's
            ``greater_or_equal=True``); without a validation split, the last weights.
        checkpoint_every: epochs between resumable checkpoints (the last epoch always writes one).
        train_splits / val_split: manifest splits trained on and validated on.
        seed: weights, sample order, augmentation and dropout (reference ``set_determinism(12345 + trial)``).
        num_workers: data-loader processes preparing augmented batches (0 = in the training process); the result
            does not depend on it.
        grad_clip: max gradient norm; 0 = none (the reference does not clip).
    """

    batch_size: int = 32
    epochs: int = 155
    finetune_epochs: int = 385
    lr: float = 1e-4
    finetune_lr: float = 1e-5
    weight_decay: float = 0.01
    lr_power: float = 2.0
    focal_gamma: float = 2.0
    validate_every: int = 5
    checkpoint_every: int = 1
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    seed: int = 0
    num_workers: int = 0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "finetune_epochs", "validate_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch norm needs more than one exam per batch)")
        if not (self.lr > 0 and self.finetune_lr > 0) or self.weight_decay < 0 or self.lr_power < 0:
            raise ValueError("lr and finetune_lr must be > 0, weight_decay and lr_power >= 0")
        if self.focal_gamma < 0 or self.num_workers < 0 or self.grad_clip < 0:
            raise ValueError("focal_gamma, num_workers and grad_clip must be >= 0")
        if not self.train_splits:
            raise ValueError("train_splits must name at least one split")
        if self.val_split and self.val_split in self.train_splits:
            raise ValueError(f"val_split '{self.val_split}' is also a training split")


@dataclass(frozen=True)
class ClassifierConfig:
    """The root of a classifier YAML.

    Attributes:
        preprocess: project config (``paper``, ``demo``, ``tiny`` or a YAML path) whose ``preprocess.classifier``
            section gives the grid and interpolation.
        grid: overrides that section's size and spacing (null = keep).
        network, intensity, augmentation, train: see their classes.
    """

    preprocess: str = "paper"
    grid: GridConfig | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    train: ClassifierTrainingConfig = field(default_factory=ClassifierTrainingConfig)

    def __post_init__(self) -> None:
        if self.grid is not None and min(self.grid.size) < MIN_GRID_SIDE:
            raise ValueError(f"grid.size must be >= {MIN_GRID_SIDE} voxels per side for EfficientNet, "
                             f"got {list(self.grid.size)}")

    def with_sequences(self, sequences: tuple[str, ...] | list[str] | None) -> "ClassifierConfig":
        if not sequences:
            return self
        return replace(self, network=replace(self.network, sequences=tuple(sequences)))


def classifier_config_path(name_or_path: str | Path) -> Path:
    """``"demo"`` -> ``configs/classifier_demo.yaml`` (also ``"classifier_demo"``), or an existing YAML path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).exists():
        return builtin_config_path(name_or_path)
    for candidate in (CONFIG_DIR / f"classifier_{text}.yaml", CONFIG_DIR / f"{text}.yaml"):
        if candidate.is_file() and candidate.stem.startswith("classifier_"):
            return candidate
    shipped = sorted(p.stem.removeprefix("classifier_") for p in CONFIG_DIR.glob("classifier_*.yaml"))
    raise ConfigError(f"no classifier config named '{text}'; shipped: {shipped}, or give a .yaml path")


def load_classifier_config(name_or_path: str | Path = "paper") -> ClassifierConfig:
    """Load a shipped classifier config (``paper``, ``demo``, ``tiny``) or a YAML file.

    Raises:
        ConfigError: file not found, invalid YAML, unknown key, wrong type, or a ``preprocess`` project config that
            cannot be loaded (named).
    """
    path = classifier_config_path(name_or_path)
    config = from_dict(ClassifierConfig, load_yaml(path), file=path)
    try:
        resolve_preprocess(config)
    except ConfigError as exc:
        raise ConfigError(f"preprocess: {exc}", file=path, key="preprocess") from None
    return config


def resolve_preprocess(config: ClassifierConfig) -> PreprocessConfig:
    """The classifier's :class:`~CCELLACore.data.preprocess.PreprocessConfig`: the named project config's
    ``preprocess.classifier``, with ``grid`` overriding size and spacing, and ``normalize`` off (the classifier
    clips and z-scores itself)."""
    from ..settings import load_config

    section = load_config(config.preprocess).preprocess.classifier
    if config.grid is not None:
        section = replace(section, grid=config.grid)
    if min(section.grid.size) < MIN_GRID_SIDE:
        raise ConfigError(f"the classifier grid {list(section.grid.size)} of project config '{config.preprocess}' "
                          f"is smaller than {MIN_GRID_SIDE} voxels on a side, too small for EfficientNet; set "
                          "`grid:` in the classifier config", key="grid")
    return replace(section, normalize=False)
