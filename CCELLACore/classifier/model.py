"""The classifier network and its model directory.

A classifier model directory (written by ``ccella train-classifier``, read by ``ccella classify``)::

    model/
        classifier.safetensors   the EfficientNet weights (best validation AP)
        config.yaml              classifier: the ClassifierConfig; preprocess: the resolved grid (PreprocessConfig)
        model.json               kind "cspca-classifier", sequences, grid, training data summary, validation
                                 metrics, model_hash (SHA-256 of the weights)
        README.md                the model card
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import from_dict
from ..data.preprocess import PreprocessConfig
from ..errors import CCELLAError, ConfigError
from .config import ClassifierConfig, NetworkConfig

__all__ = ["build_classifier", "set_batch_norm_momentum", "LoadedClassifier", "load_classifier_dir", "MODEL_KIND",
           "COMPONENT", "export_half"]

#: ``model.json`` ``extra.kind`` of a classifier model directory.
MODEL_KIND = "cspca-classifier"
#: The weights file's component name.
COMPONENT = "classifier"


def set_batch_norm_momentum(net: nn.Module, momentum: float) -> None:
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def build_classifier(cfg: NetworkConfig) -> nn.Module:
    """MONAI ``EfficientNetBN(cfg.variant, spatial_dims=3, in_channels=len(cfg.sequences), num_classes=2,
    pretrained=False)``; input (B, C, X, Y, Z), output logits (B, 2) (class 1 = csPCa)."""
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN(cfg.variant, pretrained=False, progress=False, spatial_dims=3,
                         in_channels=len(cfg.sequences), num_classes=2)
    set_batch_norm_momentum(net, cfg.batch_norm_momentum)
    return net


@dataclass
class LoadedClassifier:
    """A classifier read from its model directory, in eval mode."""

    network: nn.Module
    config: ClassifierConfig
    preprocess: PreprocessConfig
    metadata: dict[str, Any]
    directory: Path

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(self.config.network.sequences)

    @property
    def name(self) -> str:
        return str(self.metadata.get("extra", {}).get("name") or self.directory.name)

    @property
    def model_hash(self) -> str:
        return str(self.metadata.get("model_hash", ""))


def load_classifier_dir(directory: str | Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Read a classifier model directory (weights checked against its hash and against the network its config
    builds).

    Raises:
        CCELLAError: not a classifier model directory, or files missing, changed or not fitting (named).
    """
    from ..models.serialization import load_model_dir, read_model_config

    directory = Path(directory)
    raw = read_model_config(directory)
    source = directory / "config.yaml"
    if not isinstance(raw, dict) or "classifier" not in raw or "preprocess" not in raw:
        raise CCELLAError(f"{source}: not a classifier model (config.yaml has no 'classifier' and 'preprocess' "
                          "sections); give a folder written by `ccella train-classifier`")
    try:
        config = from_dict(ClassifierConfig, raw["classifier"], file=source, prefix="classifier")
        preprocess = from_dict(PreprocessConfig, raw["preprocess"], file=source, prefix="preprocess")
    except ConfigError as exc:
        raise CCELLAError(str(exc)) from None
    network = build_classifier(config.network)
    _, metadata, _ = load_model_dir(directory, {COMPONENT: network})
    kind = metadata.get("extra", {}).get("kind")
    if kind != MODEL_KIND:
        raise CCELLAError(f"{directory / 'model.json'}: kind {kind!r} is not a csPCa classifier ({MODEL_KIND!r})")
    network.to(device).eval()
    return LoadedClassifier(network, config, preprocess, metadata, directory)


def export_half(source: str | Path, destination: str | Path, card: str | None = None) -> Path:
    """Copy a classifier model directory with its floating-point weights stored as float16 (half the bytes: a
    3-channel EfficientNet-B0 is 18.8 MB in fp32, 9.4 MB in fp16); loading casts them back to float32.

    ``model_hash`` is recomputed for the new weights; ``extra.stored_dtype`` records the cast.
    """
    import copy

    from ..models.serialization import ModelMetadata, save_model_dir

    model = load_classifier_dir(source)
    half = copy.deepcopy(model.network).half()
    meta = {k: v for k, v in model.metadata.items() if k in {f for f in ModelMetadata.__dataclass_fields__}}
    meta["extra"] = {**meta.get("extra", {}), "stored_dtype": "float16", "exported_from": model.model_hash}
    text = card if card is not None else (model.directory / "README.md").read_text(encoding="utf-8")
    return save_model_dir(destination, {COMPONENT: half}, {"classifier": model.config, "preprocess": model.preprocess},
                          meta, text)
