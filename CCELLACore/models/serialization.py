"""The model-directory format and safe weight loading.

A trained CCELLA++ model is one directory that explains itself (like an nnU-Net model folder)::

    my_model/
        config.yaml              the component configs (written with CCELLACore.config.dump_yaml)
        <component>.safetensors  one file per network: autoencoder, unet, adapter, ...
        model.json               format version, objective, sequences, latent scale factors, reference intensities,
                                 output grid, text encoder name, component files and the weights' SHA-256
        README.md                the model card (text given by the caller)

Weights are only ever read from safetensors or through ``torch.load(..., weights_only=True)``
(:mod:`~CCELLACore.models.weights`): a pickle that needs to run code to load is refused, and nothing in it runs.

A model folder can only make the loaders read files inside itself: every path it names (``model.json``'s
``components``, and the files the loaders open: ``config.yaml``, ``model.json``, weights found by listing) is
resolved, symlinks followed, and refused with a :class:`CCELLAError` naming the folder, the key and the path when it
is absolute, climbs out with ``..`` or is a symlink to somewhere outside the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import dump_yaml, from_dict, load_yaml, to_dict
from ..errors import CCELLAError, ConfigError
from ..fileio import atomic_path, atomic_write_json, atomic_write_text, default_mode, read_json
from .weights import (_PICKLE_SUFFIXES, _WEIGHT_SUFFIXES, STATE_DICT_KEYS, check_state_dict, load_state_dict_file,
                      load_weights_file, unwrap_state_dict)

__all__ = [
    "FORMAT_VERSION",
    "ModelMetadata",
    "STATE_DICT_KEYS",
    "load_weights_file",
    "load_state_dict_file",
    "unwrap_state_dict",
    "check_state_dict",
    "save_model_dir",
    "add_component",
    "read_model_config",
    "load_model_dir",
    "model_hash",
    "component_hash",
]

#: Version of the model-directory layout written by :func:`save_model_dir`.
FORMAT_VERSION = 1



@dataclass(frozen=True)
class ModelMetadata:
    """What a model directory records besides configs and weights (``model.json``).

    Args:
        objective: the diffusion training target, "epsilon" (noise) or "velocity" (rectified flow).
        sequences: the sequences in latent channel order, 4 latent channels each.
        latent_scale_factors: per sequence, 1/std of its latents over the training set (multiplies z in training,
            divides it before decoding).
        reference_intensities: per sequence, the value an output of 1.0 maps to (AxT2/HighB: the training set's mean
            99.5th percentile, arbitrary units; ADC: 3000e-6 mm^2/s, the inverted fixed window).
        grid_size: output volume size in voxels (X, Y, Z).
        spacing: output voxel spacing in mm (X, Y, Z).
        text_encoder: the text encoder's name (a package or Hugging Face name, never copied into the model).
        extra: anything else the caller wants to keep (JSON-able).
    """

    objective: Literal["epsilon", "velocity"] = "epsilon"
    sequences: tuple[str, ...] = ("AxT2", "HighB", "ADC")
    latent_scale_factors: dict[str, float] = field(default_factory=dict)
    reference_intensities: dict[str, float] = field(default_factory=dict)
    grid_size: tuple[int, int, int] = (256, 256, 128)
    spacing: tuple[float, float, float] = (0.5, 0.5, 0.5)
    text_encoder: str = "google/flan-t5-xxl"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in (("latent_scale_factors", self.latent_scale_factors),
                             ("reference_intensities", self.reference_intensities)):
            if values and set(values) != set(self.sequences):
                raise ValueError(f"{name} must have one value per sequence {list(self.sequences)}, got {list(values)}")
            for seq, v in values.items():
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                    raise ValueError(f"{name}[{seq}] must be a finite positive number, got {v!r}")
        if any(s <= 0 for s in self.grid_size) or any(not (s > 0) for s in self.spacing):
            raise ValueError(f"grid_size and spacing must be positive, got {self.grid_size}, {self.spacing}")


# ------------------------------------------------------------------------------------------------- model directories
def _inside(directory: Path, listed: Any, key: str) -> Path:
    """``directory / listed``, refused unless it stays inside ``directory`` once resolved (symlinks followed).

    ``key`` says where the path was named (e.g. ``"model.json: components.ldm"``). The returned path keeps the name
    as listed (model hashes cover file names), and it is not required to exist.
    """
    if not isinstance(listed, str) or not listed.strip() or "\0" in listed:
        raise CCELLAError(f"{directory}: {key} must name a file in the model folder, got {listed!r}")
    relative = Path(listed)
    if relative.is_absolute() or relative.drive or relative.root:
        raise CCELLAError(f"{directory}: {key} names an absolute path {listed!r}; a model folder may only name "
                          "files inside itself")
    if os.path.normpath(listed).split(os.sep)[0] == os.pardir:
        raise CCELLAError(f"{directory}: {key} names {listed!r}, which leaves the model folder ('..'); a model "
                          "folder may only name files inside itself")
    path = directory / relative
    root = directory.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise CCELLAError(f"{directory}: {key}: {listed!r} cannot be resolved ({exc})") from None
    if resolved != root and not resolved.is_relative_to(root):
        raise CCELLAError(f"{directory}: {key} names {listed!r}, a symlink (or a path through one) to {resolved}, "
                          "outside the model folder; a model folder may only name files inside itself")
    return path


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _component_files(directory: Path, components: Mapping[str, str] | None = None) -> list[Path]:
    if components is not None:
        if not isinstance(components, Mapping):
            raise CCELLAError(f"{directory}: model.json: 'components' must map component names to weights files")
        return [_inside(directory, listed, f"model.json: components.{name}") for name, listed in components.items()]
    listed = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _WEIGHT_SUFFIXES)
    return [p for p in (_inside(directory, name, name) for name in listed) if p.is_file()]


def model_hash(directory: str | Path) -> str:
    """SHA-256 (hex) over the model directory's weights files (names and bytes, in name order)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CCELLAError(f"{directory}: model directory not found")
    meta_path = _inside(directory, "model.json", "model.json")
    components = read_json(meta_path).get("components") if meta_path.is_file() else None
    files = _component_files(directory, components)
    for path in files:
        if not path.is_file():
            raise CCELLAError(f"{path}: weights file listed in {meta_path.name} not found")
    return _hash_files(files)


def component_hash(directory: str | Path, name: str) -> str:
    """SHA-256 of one component's weights file, computed as :func:`model_hash` computes it for a folder holding only
    that component, so an autoencoder folder and a full model embedding the same autoencoder hash alike."""
    directory = Path(directory)
    meta_path = _inside(directory, "model.json", "model.json")
    components = read_json(meta_path).get("components") if meta_path.is_file() else None
    if not isinstance(components, Mapping) or name not in components:
        raise CCELLAError(f"{directory}: model.json lists no component '{name}'")
    path = _inside(directory, components[name], f"model.json: components.{name}")
    if not path.is_file():
        raise CCELLAError(f"{path}: weights file listed in {meta_path.name} not found")
    return _hash_files([path])


def _write_safetensors(module: nn.Module, path: Path, component: str) -> None:
    from safetensors.torch import save_file

    # Clones: safetensors refuses tensors that share storage (tied weights) and needs contiguous CPU tensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    # One metadata key: safetensors writes a map whose key order varies between processes, which would make the
    # bytes (and model_hash) of identical weights differ.
    save_file(state, str(path), metadata={"component": component})


def save_model_dir(
    directory: str | Path,
    components: Mapping[str, nn.Module],
    config: Any,
    metadata: ModelMetadata | Mapping[str, Any],
    card: str,
) -> Path:
    """Write a model directory atomically: everything goes into a temporary sibling folder first, which then replaces
    ``directory`` in one rename (an existing model directory is moved aside and removed only after that).

    Args:
        directory: the model directory to create or replace. An existing non-empty folder that is not a model
            directory (no ``model.json``) is refused rather than overwritten.
        components: ``{name: network}``; each becomes ``<name>.safetensors``. Names: letters, digits, "_" and "-".
        config: the component configs: a config dataclass or a mapping of them (written with ``dump_yaml``).
        metadata: a :class:`ModelMetadata` (or a mapping validated into one).
        card: the model card's Markdown text (``README.md``).

    Returns:
        The directory path.
    """
    directory = Path(directory)
    if not components:
        raise CCELLAError(f"{directory}: a model needs at least one component network")
    for name in components:
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise CCELLAError(f"{directory}: invalid component name {name!r} (letters, digits, '_' and '-' only)")
    if isinstance(metadata, Mapping):
        metadata = from_dict(ModelMetadata, dict(metadata), file=directory / "model.json")
    if directory.exists():
        if not directory.is_dir():
            raise CCELLAError(f"{directory}: exists and is not a directory; refusing to replace it")
        if any(directory.iterdir()) and not (directory / "model.json").is_file():
            raise CCELLAError(f"{directory}: exists, is not empty and is not a model directory; refusing to replace it")

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        files = {}
        for name, module in components.items():
            files[name] = f"{name}.safetensors"
            _write_safetensors(module, tmp / files[name], name)
        atomic_write_text(tmp / "config.yaml", dump_yaml(config))
        atomic_write_text(tmp / "README.md", card if card.endswith("\n") else card + "\n")
        model_json = {
            "format_version": FORMAT_VERSION,
            **to_dict(metadata),
            "components": files,
            "model_hash": _hash_files([tmp / f for f in files.values()]),
        }
        atomic_write_json(tmp / "model.json", model_json)

        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{directory.name}-", dir=directory.parent))
            os.rmdir(old)
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except OSError:
            if old is not None:
                os.replace(old, directory)  # put the previous model back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def add_component(directory: str | Path, name: str, module: nn.Module, record: Mapping[str, Any] | None = None,
                  extra: Callable[[str], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Add (or replace) component ``name`` of an existing model directory: ``<name>.safetensors`` is written first,
    then ``model.json`` with the component listed, ``model_hash`` recomputed, ``record`` stored under ``name`` and
    ``extra(hash of the new weights file)`` merged into ``extra`` (each file atomically and model.json once, so a
    crash leaves the old model.json naming only complete files, never a half-updated one). Returns the new
    model.json metadata."""
    directory = Path(directory)
    meta_path = _inside(directory, "model.json", "model.json")
    metadata = read_json(meta_path)
    components = {**metadata["components"], name: f"{name}.safetensors"}
    weights = _inside(directory, components[name], f"model.json: components.{name}")
    with atomic_path(weights, ".safetensors") as tmp:
        _write_safetensors(module, tmp, name)
    files = [_inside(directory, f, f"model.json: components.{n}") for n, f in components.items()]
    metadata.update(components=components, model_hash=_hash_files(files), **({name: dict(record)} if record else {}))
    if extra is not None:
        metadata["extra"] = {**metadata.get("extra", {}), **extra(_hash_files([weights]))}
    atomic_write_json(meta_path, metadata)
    return metadata


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.yaml`` of a model directory as a plain mapping (build the networks from it, then call
    :func:`load_model_dir` with them)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CCELLAError(f"{directory}: model directory not found")
    path = _inside(directory, "config.yaml", "config.yaml")
    if not path.is_file():
        raise CCELLAError(f"{path}: missing; a model directory needs config.yaml, model.json and its weights files")
    return load_yaml(path)


def _find_weights(directory: Path, name: str, listed: Any) -> Path:
    key = f"model.json: components.{name}"
    path = _inside(directory, listed, key)
    if path.is_file():
        return path
    # A .pt/.pkl left in place of the safetensors file is read only weights-only (a malicious one is refused).
    for suffix in _PICKLE_SUFFIXES:
        alt = _inside(directory, f"{name}{suffix}", key)
        if alt.is_file():
            return alt
    raise CCELLAError(f"{path}: weights file of component '{name}' not found")


#: What a model folder holds besides its weights files (the model card is README.md).
_FOLDER_FILES = ("config.yaml", "model.json", "README.md")


def load_model_dir(
    directory: str | Path,
    modules: Mapping[str, nn.Module] | None = None,
    *,
    verify_hash: bool = True,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read a model directory written by :func:`save_model_dir`.

    Args:
        directory: the model directory.
        modules: optional ``{component: network}`` built from the directory's config (:func:`read_model_config`);
            each component's weights are checked against it (error naming the component, file and first mismatched
            key) and loaded into it.
        verify_hash: check the weights files against ``model_hash`` in ``model.json``.

    Returns:
        ``(config, metadata, state_dicts)``: config.yaml as a mapping, model.json as a mapping, and
        ``{component: state_dict}`` (CPU tensors).
    """
    directory = Path(directory)
    config = read_model_config(directory)
    meta_path = _inside(directory, "model.json", "model.json")
    if not meta_path.is_file():
        raise CCELLAError(f"{meta_path}: missing; a model directory needs config.yaml, model.json and weights files")
    metadata = read_json(meta_path)
    if not isinstance(metadata, dict):
        raise CCELLAError(f"{meta_path}: expected a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CCELLAError(f"{meta_path}: format_version {version!r} is not supported (this version reads "
                          f"{FORMAT_VERSION})")
    components = metadata.get("components")
    if not isinstance(components, dict) or not components:
        raise CCELLAError(f"{meta_path}: 'components' must map component names to weights files")
    known = {f.name for f in dataclasses.fields(ModelMetadata)}
    try:
        from_dict(ModelMetadata, {k: v for k, v in metadata.items() if k in known}, file=meta_path)
    except ConfigError as exc:
        raise CCELLAError(str(exc)) from None
    if modules is not None:
        unknown = sorted(set(modules) - set(components))
        if unknown:
            raise CCELLAError(f"{meta_path}: no component(s) {unknown}; the model has {sorted(components)}")

    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    used_files = []
    for name, listed in components.items():
        path = _find_weights(directory, name, listed)
        used_files.append(path)
        state_dicts[name] = load_state_dict_file(path)
    extra = sorted(p.name for p in directory.iterdir() if p.name not in {*_FOLDER_FILES, *(f.name for f in used_files)})
    if extra:
        logging.getLogger(__name__).warning("%s: ignoring %s, not part of the model (never read)", directory, extra)
    if verify_hash and metadata.get("model_hash") is not None:
        actual = _hash_files(used_files)
        if actual != metadata["model_hash"]:
            raise CCELLAError(
                f"{meta_path}: the weights files ({', '.join(p.name for p in used_files)}) do not match the "
                f"recorded model_hash (files changed after saving)"
            )
    for name, module in (modules or {}).items():
        path = _find_weights(directory, name, components[name])
        check_state_dict(state_dicts[name], module, source=path, component=name)
        module.load_state_dict(state_dicts[name])
    return config, metadata, state_dicts
