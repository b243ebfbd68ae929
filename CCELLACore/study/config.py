"""The domain-adaptation study's YAML (``CCELLACore/configs/study_<name>.yaml``), validated strictly into frozen
dataclasses (an unknown key or a wrong type is a :class:`~CCELLACore.errors.ConfigError` naming the key and file).

Example (``study_tiny.yaml`` shortened)::

    classifier: tiny                 # classifier config: network, intensities, augmentation, recipe
    data:
      phantoms: {size: [32, 32, 24], spacing: [4, 4, 4], institution1: {n: 12}, institution2: {n: 16}}
    synthetic: {generator: demo, steps: 1}
    fractions: [1.0, 0.5]
    trials: 1

Manifest paths (``data.institution1``, ``data.institution2``, ``synthetic.manifest``) are relative to the YAML's
folder. Defaults are the paper's study (5 fractions, 3 strategies, 3 trials, AxT2-only and bpMRI).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import CONFIG_DIR, builtin_config_path, from_dict, load_yaml, to_dict
from ..data.study import SEQUENCES
from ..errors import ConfigError

__all__ = ["STRATEGIES", "PhantomInstitution", "PhantomData", "DataConfig", "SyntheticConfig", "EpochsConfig",
           "StatisticsConfig", "StudyConfig", "load_study_config", "study_config_path"]

#: scratch: Institution 2 only; real / synthetic: fine-tuned from the model pretrained on Institution 1's real /
#: synthetic exams (their zero-shot result is the 0 % point).
STRATEGIES = ("scratch", "real", "synthetic")


@dataclass(frozen=True)
class PhantomInstitution:
    """One phantom institution (``ccella phantoms``): ``n`` studies, world ``seed``, patient ``splits``
    (train, val, test)."""

    n: int = 60
    seed: int = 0
    splits: tuple[float, float, float] = (0.6, 0.15, 0.25)

    def __post_init__(self) -> None:
        if self.n < 4:
            raise ValueError(f"n must be >= 4, got {self.n}")
        if any(f < 0 for f in self.splits) or sum(self.splits) <= 0:
            raise ValueError(f"splits must be non-negative with a positive sum, got {list(self.splits)}")


@dataclass(frozen=True)
class PhantomData:
    """Phantom Institutions 1 and 2 written into ``<out>/data`` (AxT2 grid ``size`` voxels at ``spacing`` mm;
    null = each institution's default)."""

    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    institution1: PhantomInstitution = field(default_factory=PhantomInstitution)
    institution2: PhantomInstitution = field(default_factory=PhantomInstitution)


@dataclass(frozen=True)
class DataConfig:
    """Either ``phantoms`` or both manifests: ``institution1`` (train/val rows pretrain), ``institution2``
    (train rows are the fractions' pool, val rows validate every Institution-2 run, test rows are the test set).
    ``institution_ids`` are the manifests' ``institution`` values of the two (rows of others are ignored)."""

    institution1: Path | None = None
    institution2: Path | None = None
    phantoms: PhantomData | None = None
    institution_ids: tuple[str, str] = ("1", "2")

    def __post_init__(self) -> None:
        manifests = (self.institution1 is not None, self.institution2 is not None)
        if self.phantoms is not None and any(manifests):
            raise ValueError("give either data.phantoms or data.institution1/institution2, not both")
        if self.phantoms is None and not all(manifests):
            raise ValueError("give data.phantoms, or both data.institution1 and data.institution2 manifests")


@dataclass(frozen=True)
class SyntheticConfig:
    """Institution 1's synthetic twins: a ready ``manifest`` (from ``ccella synthesize``), or made by the study with
    ``ccella synthesize`` from ``generator`` (a model directory; ``demo`` = the embedded demo model) with these
    sampling settings, for the rows of ``splits``. Labels are the generator's predicted class."""

    manifest: Path | None = None
    generator: str = "demo"
    steps: int = 20
    sampler: str | None = None
    guidance: float = 1.0
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class EpochsConfig:
    """Epochs per kind of run; null = the classifier config's (``epochs`` from scratch, ``finetune_epochs``).
    The reference: pretraining 155, Institution 2 from scratch 385, fine-tuning 385."""

    pretrain: int | None = None
    scratch: int | None = None
    finetune: int | None = None

    def __post_init__(self) -> None:
        for name in ("pretrain", "scratch", "finetune"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class StatisticsConfig:
    """Paired comparisons (``a`` minus ``b``) on Institution 2's test set: DeLong for AUC, a paired bootstrap with
    ``bootstrap`` replicates (seeded) for AP."""

    pairs: tuple[tuple[str, str], ...] = (("real", "scratch"), ("synthetic", "scratch"), ("synthetic", "real"))
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for a, b in self.pairs:
            if a not in STRATEGIES or b not in STRATEGIES or a == b:
                raise ValueError(f"pairs must be two different strategies of {list(STRATEGIES)}, got [{a}, {b}]")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap must be >= 100, got {self.bootstrap}")


@dataclass(frozen=True)
class StudyConfig:
    """The root of a study YAML.

    Attributes:
        classifier: classifier config (``paper``, ``demo``, ``tiny`` or a YAML path).
        train: overrides of that config's ``train`` section (e.g. ``{batch_size: 8}``), validated the same way.
        fractions: Institution 2 training fractions in (0, 1], stratified by label, nested, per trial.
        strategies: a subset of ``scratch``, ``real``, ``synthetic``.
        variants: name -> input sequences (``axt2: [AxT2]``, ``bpmri: [AxT2, HighB, ADC]``).
        trials: repetitions with seeds ``seed + trial`` (weights, augmentation, order and the fractions' subsets).
        pretrain_per_trial: pretrain on Institution 1 once per trial (as the reference, whose fine-tuning run c
            starts from pretraining run c) or once (seed ``seed``) for all trials.
        keep_models: keep the model folders of the Institution-2 runs (pretrained models are always kept); their
            checkpoints are removed once a run's result is written.
    """

    data: DataConfig
    classifier: str = "paper"
    train: dict[str, Any] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)
    strategies: tuple[str, ...] = STRATEGIES
    variants: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"axt2": ("AxT2",), "bpmri": ("AxT2", "HighB", "ADC")})
    trials: int = 3
    seed: int = 0
    pretrain_per_trial: bool = True
    epochs: EpochsConfig = field(default_factory=EpochsConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    keep_models: bool = False

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) \
                or len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions must be distinct values in (0, 1], got {list(self.fractions)}")
        if not self.strategies or any(s not in STRATEGIES for s in self.strategies) \
                or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct names of {list(STRATEGIES)}, got {list(self.strategies)}")
        if not self.variants:
            raise ValueError("variants must name at least one input set")
        for name, seqs in self.variants.items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"variant names must be letters, digits or _, got {name!r}")
            if not seqs or seqs[0] != "AxT2" or any(s not in SEQUENCES for s in seqs) or len(set(seqs)) != len(seqs):
                raise ValueError(f"variants.{name}: distinct sequences of {list(SEQUENCES)} starting with AxT2, "
                                 f"got {list(seqs)}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        for a, b in self.statistics.pairs:
            if a not in self.strategies or b not in self.strategies:
                raise ValueError(f"statistics.pairs: [{a}, {b}] names a strategy not in strategies")

    def classifier_config(self, file: str | Path | None = None):
        """The classifier config with ``train`` overrides applied (errors name ``train.<key>`` and the file)."""
        from ..classifier.config import ClassifierTrainingConfig, load_classifier_config

        base = load_classifier_config(self.classifier)
        merged = {**to_dict(base.train), **self.train}
        return replace(base, train=from_dict(ClassifierTrainingConfig, merged, file=file, prefix="train"))


def study_config_path(name_or_path: str | Path) -> Path:
    """``"tiny"`` -> ``configs/study_tiny.yaml``, or an existing YAML path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).exists():
        return builtin_config_path(name_or_path)
    candidate = CONFIG_DIR / f"study_{text.removeprefix('study_')}.yaml"
    if candidate.is_file():
        return candidate
    shipped = sorted(p.stem.removeprefix("study_") for p in CONFIG_DIR.glob("study_*.yaml"))
    raise ConfigError(f"no study config named '{text}'; shipped: {shipped}, or give a .yaml path")


def load_study_config(name_or_path: str | Path) -> StudyConfig:
    """Load and check a study config; manifest paths become absolute (relative to the YAML's folder).

    Raises:
        ConfigError: file not found, invalid YAML, unknown key, wrong type, a bad ``train`` override or a
            classifier config that cannot be loaded (named).
    """
    path = study_config_path(name_or_path)
    config = from_dict(StudyConfig, load_yaml(path), file=path)
    root = path.resolve().parent

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else root / p)

    data = replace(config.data, institution1=absolute(config.data.institution1),
                   institution2=absolute(config.data.institution2))
    config = replace(config, data=data, synthetic=replace(config.synthetic,
                                                         manifest=absolute(config.synthetic.manifest)))
    try:
        config.classifier_config(file=path)
    except ConfigError as exc:
        if exc.key and exc.key.startswith("train"):
            raise
        raise ConfigError(f"classifier: {exc}", file=path, key="classifier") from None
    return config
