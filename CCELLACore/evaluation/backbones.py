"""Feature backbones for FID and KID, loaded from local weight files only (nothing is ever downloaded).

* :func:`load_medicalnet` -- MedicalNet's ResNet-50 ("23 datasets"), 3D, one 2048-d vector per volume: the spatial
  mean of layer4. Built from MONAI's ``resnet50`` (same parameter names as MedicalNet) with MedicalNet's geometry:
  conv1 stride 2, shortcut B without bias, layer3 and layer4 at stride 1 with dilation 2 and 4 (MONAI's stock network
  is strided there: the weights would load but give other features). Input: the whole volume z-scored.
* :func:`load_radimagenet` -- RadImageNet's ResNet-50 (the Keras port: biases in every convolution, BatchNorm eps
  1.001e-5, the stride in each first block's 1x1 convolution), 2D, applied to slices along the three planes: volume
  min-max to [0, 1], grey to 3 channels (RGB -> BGR is a no-op on grey), the ImageNet channel means subtracted in BGR
  order, empty (constant) slices skipped; one 2048-d vector per slice (spatial mean of the last block).
* :func:`load_classifier_standin` -- the stand-in: a csPCa classifier model folder's (``ccella train-classifier``)
  EfficientNet activations, spatial mean and standard deviation of the stem, every stage and the head (4192-d), for
  data sets (phantoms, CI) where neither weights file is at hand. Its numbers are NOT comparable with published
  FIDs; every table and figure names it as a stand-in.

Weight files may store their tensors under a ``state_dict`` key and with ``module.`` prefixes (DataParallel); both
are accepted. Every backbone carries the SHA-256 of its weights file, which every reported number names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.study import SEQUENCES, Exam
from ..errors import CCELLAError

__all__ = ["Backbone", "sha256_file", "read_state_dict", "medicalnet_network", "radimagenet_network",
           "load_medicalnet", "load_radimagenet", "load_classifier_standin", "PLANES", "RADIMAGENET_BGR_MEAN"]

#: Slicing planes of the 2.5D FID: array axis of our (X, Y, Z) volumes that is held fixed.
PLANES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: ImageNet channel means in BGR order, subtracted from [0, 1] inputs (the Keras "caffe"-style preprocessing).
RADIMAGENET_BGR_MEAN = (0.406, 0.456, 0.485)


@dataclass
class Backbone:
    """A feature extractor and what every number computed with it must say about it.

    ``extract(exam)`` returns feature matrices keyed by what they describe: ``"AxT2"`` (3D, (1, 2048)),
    ``"AxT2/axial"`` (2.5D, (n_slices, 2048)) or ``"bpMRI"`` (stand-in, (1, 4192)).
    """

    name: str
    kind: str  # "3d", "2.5d" or "stand-in"
    weights_file: str
    weights_sha256: str
    extract: Callable[[Exam], dict[str, np.ndarray]] = field(repr=False)
    standin: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How figures and tables name it: ``"MedicalNet ResNet-50 (sha256 ff48a622...)"``."""
        tag = " [STAND-IN: not comparable with published FIDs]" if self.standin else ""
        return f"{self.name} (sha256 {self.weights_sha256[:12]}){tag}"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256, "standin": self.standin, "settings": self.settings}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, with any
    ``state_dict`` wrapper and ``module.`` prefixes removed.

    Raises:
        CCELLAError: naming the file when it is missing, unreadable or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CCELLAError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise CCELLAError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not any(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CCELLAError(f"{path}: no state dict of tensors inside")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()
            if isinstance(v, torch.Tensor)}


def _load_into(network: nn.Module, state: dict[str, torch.Tensor], path: Path, ignore: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CCELLAError(f"{path}: not the expected ResNet-50 layout: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]} ({len(missing)}/{len(unexpected)}/{len(wrong)})")
    network.load_state_dict(state)


def medicalnet_network() -> nn.Module:
    """MedicalNet's ResNet-50 geometry on MONAI's ``resnet50``; input (B, 1, X, Y, Z), output layer4 (B, 2048, ...)."""
    from monai.networks.nets import resnet50

    net = resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B", feed_forward=False, conv1_t_stride=2,
                   bias_downsample=False)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):  # MedicalNet: stride 1, dilated, in every block
        for block in layer:
            block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1, 1), (dilation,) * 3, (dilation,) * 3
        layer[0].downsample[0].stride = (1, 1, 1)
    net.avgpool, net.fc = nn.Identity(), None

    class _Layer4(nn.Module):
        def __init__(self, resnet: nn.Module):
            super().__init__()
            self.resnet = resnet

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            r = self.resnet
            x = r.maxpool(r.act(r.bn1(r.conv1(x))))
            return r.layer4(r.layer3(r.layer2(r.layer1(x))))

    return _Layer4(net)


class _KerasBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=1.001e-5)  # noqa: E731 (Keras' epsilon)
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, stride=stride), bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1), bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1), bn(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride), bn(planes * 4)) \
            if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _KerasResNet50(nn.Module):
    """RadImageNet's ResNet-50 (Keras layout, no top); input (B, 3, H, W), output (B, 2048, H/32, W/32)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64, eps=1.001e-5)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, layers = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [_KerasBottleneck(inplanes, planes, stride, True)]
            layer += [_KerasBottleneck(planes * 4, planes, 1, False) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*layer))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def radimagenet_network() -> nn.Module:
    return _KerasResNet50()


def _device_and_dtype(device: str | torch.device) -> tuple[torch.device, torch.dtype]:
    from ..precision import choose_dtype

    device = torch.device(device)
    # bf16 only on GPUs (as the reference's CUDA autocast); on CPUs fp32 keeps the features reproducible.
    return device, (choose_dtype(device) if device.type == "cuda" else torch.float32)


def _zscore(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    return (array - array.mean()) / max(float(array.std()), 1e-8)


def load_medicalnet(path: str | Path, device: str | torch.device = "cpu") -> Backbone:
    """The 3D backbone from MedicalNet's ``resnet_50_23dataset.pth`` (its ``conv_seg`` head is not used)."""
    from ..precision import autocast_context

    path = Path(path)
    network = medicalnet_network()
    _load_into(network.resnet, read_state_dict(path), path, ignore=("conv_seg", "fc."))
    device, dtype = _device_and_dtype(device)
    network.to(device).eval()

    def extract(exam: Exam) -> dict[str, np.ndarray]:
        out = {}
        for name in SEQUENCES:
            if name in exam.volumes:
                x = torch.from_numpy(_zscore(exam.volumes[name].array))[None, None].to(device)
                with torch.no_grad(), autocast_context(device, dtype):
                    out[name] = network(x).float().mean(dim=(2, 3, 4)).cpu().numpy().astype(np.float32)
        return out

    return Backbone("MedicalNet ResNet-50 (3D)", "3d", path.name, sha256_file(path), extract,
                    settings={"input": "whole volume z-score", "feature": "layer4 spatial mean (2048)",
                              "geometry": "conv1 stride 2, layer3/4 dilation 2/4, shortcut B"})


def radimagenet_slices(volume: np.ndarray, axis: int, max_slices: int | None, empty_std: float = 1e-3) -> np.ndarray:
    """Non-empty slices of a volume along ``axis``, normalised for RadImageNet: (n, 3, H, W) float32.

    A slice is empty when its standard deviation after the volume min-max is below ``empty_std`` (padding, or
    air outside the field of view). At most ``max_slices`` evenly spaced non-empty slices are kept.
    """
    array = np.asarray(volume, np.float32)
    low, high = float(array.min()), float(array.max())
    array = (array - low) / max(high - low, 1e-8)
    slices = np.moveaxis(array, axis, 0)
    keep = np.flatnonzero(slices.reshape(len(slices), -1).std(axis=1) >= empty_std)
    if max_slices is not None and len(keep) > max_slices:
        keep = keep[np.linspace(0, len(keep) - 1, max_slices).round().astype(int)]
    grey = slices[keep][:, None]
    mean = np.asarray(RADIMAGENET_BGR_MEAN, np.float32)[None, :, None, None]
    return np.ascontiguousarray(np.repeat(grey, 3, axis=1) - mean)


def load_radimagenet(path: str | Path, device: str | torch.device = "cpu", max_slices: int | None = 32,
                     batch: int = 32) -> Backbone:
    """The 2.5D backbone from RadImageNet's ``RadImageNet-ResNet50_notop.pth`` (Keras port layout)."""
    from ..precision import autocast_context

    path = Path(path)
    network = radimagenet_network()
    _load_into(network, read_state_dict(path), path, ignore=("fc.",))
    device, dtype = _device_and_dtype(device)
    network.to(device).eval()

    def extract(exam: Exam) -> dict[str, np.ndarray]:
        out = {}
        for name in SEQUENCES:
            if name not in exam.volumes:
                continue
            for plane, axis in PLANES.items():
                slices = radimagenet_slices(exam.volumes[name].array, axis, max_slices)
                parts = [np.zeros((0, 2048), np.float32)]
                for start in range(0, len(slices), batch):
                    x = torch.from_numpy(slices[start:start + batch]).to(device)
                    with torch.no_grad(), autocast_context(device, dtype):
                        parts.append(network(x).float().mean(dim=(2, 3)).cpu().numpy().astype(np.float32))
                out[f"{name}/{plane}"] = np.concatenate(parts)
        return out

    return Backbone("RadImageNet ResNet-50 (2.5D)", "2.5d", path.name, sha256_file(path), extract,
                    settings={"input": "volume min-max [0,1], grey->3 channels, minus BGR mean "
                              f"{list(RADIMAGENET_BGR_MEAN)}", "empty_slices": "skipped (std < 1e-3)",
                              "max_slices_per_plane": max_slices, "feature": "last block spatial mean (2048)"})


def load_classifier_standin(model_dir: str | Path, device: str | torch.device = "cpu") -> Backbone:
    """The stand-in backbone: a classifier model folder's pooled EfficientNet features of the whole exam."""
    from ..classifier.data import prepare_exam
    from ..classifier.model import COMPONENT, load_classifier_dir

    model = load_classifier_dir(model_dir, device=device)
    device = torch.device(device)
    net = model.network
    captured: list[torch.Tensor] = []

    def pool(_module, _inputs, output: torch.Tensor) -> None:
        # correction=0: the last stages of a small grid are 1 voxel wide, where the sample std is undefined
        captured.append(torch.cat([output.mean(dim=(2, 3, 4)), output.std(dim=(2, 3, 4), correction=0)], dim=1))

    # Every stage, not only the head: a briefly trained network (CI) loses the input's variation in its last stages.
    for module in (net._bn0, *net._blocks, net._bn1):
        module.register_forward_hook(pool)

    def extract(exam: Exam) -> dict[str, np.ndarray]:
        array, _ = prepare_exam(exam, model.preprocess, model.config.intensity, model.sequences)
        captured.clear()
        with torch.no_grad():
            net(torch.from_numpy(array)[None].to(device))
        return {"bpMRI": torch.cat(captured, dim=1).float().cpu().numpy().astype(np.float32)}

    weights = Path(model_dir) / f"{COMPONENT}.safetensors"
    return Backbone(f"stand-in: classifier '{model.name}' features", "stand-in", weights.name, sha256_file(weights),
                    extract, standin=True,
                    settings={"model_hash": model.model_hash, "sequences": list(model.sequences),
                              "feature": "spatial mean and std of the stem, every stage and the head",
                              "input": "the classifier's own grid"})
