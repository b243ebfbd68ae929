"""What a generation model folder offers, read without building the networks (for a GUI's settings controls).

Example::

    python -m CCELLACore.jobs model-info --model CCELLACore/demo_model

prints one protocol ``result`` event holding :class:`ModelInfo` as JSON.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CCELLAError

__all__ = ["ModelInfo", "read_model_info", "weights_bytes", "estimate_gpu_bytes"]

_REQUIRED_METADATA = ("objective", "sequences", "grid_size", "spacing")


@dataclass(frozen=True)
class ModelInfo:
    """A model folder's generation choices.

    Attributes:
        path: the folder.
        name: its folder name.
        model_hash: SHA-256 of its weights (``model.json``).
        objective: ``epsilon`` or ``velocity``; decides the samplers.
        sequences: e.g. ("AxT2", "HighB", "ADC").
        grid_size: output voxels (X, Y, Z).
        spacing: default output spacing in mm (the training set's median).
        samplers: samplers the model supports, empty when torch is not installed yet (the child still uses the
            model's own default).
        default_sampler / default_steps / default_guidance: the model's ``sampling:`` section (None when unknown).
        max_steps: the training schedule's timesteps, the most sampling steps (None when unknown).
    """

    path: str
    name: str
    model_hash: str
    objective: str
    sequences: tuple[str, ...]
    grid_size: tuple[int, ...]
    spacing: tuple[float, ...]
    samplers: tuple[str, ...] = ()
    default_sampler: str | None = None
    default_steps: int | None = None
    default_guidance: float | None = None
    max_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for a GUI, e.g. ``"demo_model: ddpm, 100 steps, guidance 1.0, 64x64x32 at 2.0 mm"``."""
        parts = [self.name]
        settings = [s for s in (self.default_sampler,
                                f"{self.default_steps} steps" if self.default_steps else None,
                                f"guidance {self.default_guidance:g}" if self.default_guidance is not None else None)
                    if s]
        grid = "x".join(str(g) for g in self.grid_size)
        spacing = " x ".join(f"{s:g}" for s in self.spacing)
        return f"{parts[0]}: {', '.join(settings) + ', ' if settings else ''}{grid} voxels at {spacing} mm"


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / "model.json"
    if not directory.is_dir():
        raise CCELLAError(f"{directory}: model folder not found")
    if not path.is_file():
        raise CCELLAError(f"{path}: missing; a model folder holds config.yaml, model.json and its .safetensors files")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CCELLAError(f"{path}: not valid JSON ({exc})") from None
    for key in _REQUIRED_METADATA:
        if key not in metadata:
            raise CCELLAError(f"{path}: key '{key}' missing")
    return metadata


def read_model_info(directory: str | Path) -> ModelInfo:
    """Read ``model.json`` (and, when PyYAML and torch are installed, ``config.yaml`` and the sampler table).

    Raises:
        CCELLAError: the folder or ``model.json`` is missing, or a required key is missing (named with the file).
    """
    directory = Path(directory)
    metadata = _read_metadata(directory)
    objective = str(metadata["objective"])
    sampling: dict[str, Any] = {}
    max_steps = None
    if importlib.util.find_spec("yaml") is not None and (directory / "config.yaml").is_file():
        from ..config import load_yaml

        raw = load_yaml(directory / "config.yaml")
        sampling = raw.get("sampling") or {}
        max_steps = (raw.get("diffusion") or {}).get("num_train_timesteps")
    samplers: tuple[str, ...] = ()
    default_sampler = sampling.get("sampler")
    if importlib.util.find_spec("torch") is not None:
        # The sampler table lives with the sampling config (no torch, no MONAI); never a copy of it here.
        from ..sampling.config import DEFAULT_SAMPLER, SUPPORTED_SAMPLERS

        if objective not in SUPPORTED_SAMPLERS:
            raise CCELLAError(f"{directory / 'model.json'}: unknown objective '{objective}'; "
                              f"expected one of {sorted(SUPPORTED_SAMPLERS)}")
        samplers = tuple(SUPPORTED_SAMPLERS[objective])
        default_sampler = default_sampler or DEFAULT_SAMPLER[objective]
    return ModelInfo(
        path=str(directory),
        name=directory.name,
        model_hash=str(metadata.get("model_hash", "")),
        objective=objective,
        sequences=tuple(metadata["sequences"]),
        grid_size=tuple(int(g) for g in metadata["grid_size"]),
        spacing=tuple(float(s) for s in metadata["spacing"]),
        samplers=samplers,
        default_sampler=default_sampler,
        default_steps=int(sampling["steps"]) if "steps" in sampling else None,
        default_guidance=float(sampling["guidance"]) if "guidance" in sampling else None,
        max_steps=int(max_steps) if max_steps else None,
    )


def weights_bytes(directory: str | Path) -> int:
    """Total size of the folder's ``.safetensors`` files."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


#: Decoder feature channels assumed at full resolution in :func:`estimate_gpu_bytes` (MAISI's first level).
_DECODER_CHANNELS = 64


def estimate_gpu_bytes(directory: str | Path) -> int:
    """A conservative guess of the GPU memory a generation needs, checked before the model is put on the GPU.

    1 GiB (CUDA context, text encoder) + 4 x the weights (fp32 copies and workspace) + the decoder's full-resolution
    activations: X*Y*Z voxels x S sequences x 64 channels x 4 bytes x 3 live tensors. Demo model (64x64x32, 3
    sequences): about 1.4 GiB; the paper's 256x256x128 grid: about 20 GiB. A guess, not a measurement: the child
    takes ``--min-free-gpu-gb`` instead when given.
    """
    info = _read_metadata(Path(directory))
    voxels = 1
    for g in info["grid_size"]:
        voxels *= int(g)
    activations = voxels * len(info["sequences"]) * _DECODER_CHANNELS * 4 * 3
    return 2**30 + 4 * weights_bytes(directory) + activations


def main(argv: list[str] | None = None) -> int:
    """``python -m CCELLACore.jobs model-info --model DIR``: one ``result`` line (or ``error``)."""
    import argparse

    from .protocol import ProgressWriter

    parser = argparse.ArgumentParser(prog="python -m CCELLACore.jobs model-info")
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    writer = ProgressWriter()
    try:
        writer.result(**read_model_info(args.model).to_dict())
    except CCELLAError as exc:
        writer.error(str(exc), kind="input")
        return 1
    return 0
