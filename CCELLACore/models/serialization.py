"""The model-directory format and safe weight loading.

A trained CCELLA++ model is one directory that explains itself (like an nnU-Net model folder)::

    my_model/
        config.yaml              the component configs (written with CCELLACore.config.dump_yaml)
        <component>.safetensors  one file per network: autoencoder, unet, adapter, ...
        model.json               format version, objective, sequences, latent scale factors, reference intensities,
                                 output grid, text encoder name, component files and the weights' SHA-256
        README.md                the model card (text given by the caller)

Weights are only ever read from safetensors or through ``torch.load(..., weights_only=True)``: a pickle that needs to
run code to load is refused, and nothing in it runs.

A model folder can only make the loaders read files inside itself: every path it names (``model.json``'s
``components``, and the files the loaders open: ``config.yaml``, ``model.json``, weights found by listing) is
resolved, symlinks followed, and refused with a :class:`CCELLAError` naming the folder, the key and the path when it
is absolute, climbs out with ``..`` or is a symlink to somewhere outside the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import dump_yaml, from_dict, load_yaml, to_dict
from ..errors import CCELLAError, ConfigError
from ..fileio import atomic_path, atomic_write_json, atomic_write_text, default_mode, read_json

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

#: Keys under which checkpoints in the wild nest their state dict, in the order they are tried. NVIDIA's MAISI
#: scripts read ``"unet_state_dict"`` (also for the autoencoder); Lightning and many others use ``"state_dict"``.
STATE_DICT_KEYS = (
    "unet_state_dict",
    "autoencoder_state_dict",
    "autoencoder",
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "ema",
)

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_WEIGHT_SUFFIXES = (".safetensors",) + _PICKLE_SUFFIXES


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


# ----------------------------------------------------------------------------------------------------------- loading
def load_weights_file(path: str | Path) -> Any:
    """Read a weights file without executing code: ``.safetensors`` via safetensors, ``.pt/.pth/.ckpt/.bin/.pkl``
    only via ``torch.load(path, map_location="cpu", weights_only=True)``.

    Returns the loaded object (a state dict, or a mapping that nests one). Raises :class:`CCELLAError` naming the file
    when it is missing, of an unknown type, corrupt, or a pickle that would need to run code (refused unexecuted).
    """
    path = Path(path)
    if not path.is_file():
        raise CCELLAError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CCELLAError(f"{path}: not a readable safetensors file ({_safetensors_truncation(path) or exc})") \
                from None
    if suffix in _PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # Bare pickles of protocol > 2 make torch warn; they are read (or refused) all the same.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # weights_only's unpickler stops at the first global it does not allow: nothing in the file has run.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CCELLAError(
                f"{path}: refused to load: the file is a pickle that needs code execution, which is never run "
                f"(torch.load weights_only=True failed: {first}). Convert it to .safetensors with a tool you trust."
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CCELLAError(f"{path}: not a readable PyTorch weights file (truncated or corrupt: "
                              f"{str(exc).splitlines()[0]})") from None
    raise CCELLAError(f"{path}: unknown weights file type '{suffix}'; expected one of {list(_WEIGHT_SUFFIXES)}")


def _safetensors_truncation(path: Path) -> str | None:
    """"truncated: ..." when the file is shorter than its header says (8-byte length, JSON header, tensor data)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated: expected at least 8 bytes, found {size}"
        n = int.from_bytes(head, "little")
        if 8 + n > size:  # a huge length is garbage, not a cut-off header (safetensors caps headers at 100 MB)
            return f"truncated: expected at least {8 + n} bytes, found {size}" if n < 100_000_000 else None
        try:
            header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return None
    return f"truncated: expected {8 + n + end} bytes, found {size}" if size < 8 + n + end else None


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_common_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel saves "module.<name>", torch.compile "_orig_mod.<name>".
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def unwrap_state_dict(obj: Any, file: str | Path, keys: tuple[str, ...] = STATE_DICT_KEYS) -> dict[str, torch.Tensor]:
    """Find the state dict in what a checkpoint file held: the object itself when it maps names to tensors, else the
    first of ``keys`` that does (one level deep, e.g. MAISI's ``{"unet_state_dict": ...}``), with a DDP ``module.`` or
    ``torch.compile`` ``_orig_mod.`` prefix removed."""
    if _is_tensor_mapping(obj):
        return _strip_common_prefix(dict(obj))
    if isinstance(obj, Mapping):
        for key in keys:
            if _is_tensor_mapping(obj.get(key)):
                return _strip_common_prefix(dict(obj[key]))
        top = [str(k) for k in list(obj)[:10]]
        raise CCELLAError(
            f"{file}: no state dict found: the file holds a mapping with keys {top}, none of which maps parameter "
            f"names to tensors (looked under {list(keys)})"
        )
    raise CCELLAError(f"{file}: no state dict found: the file holds a {type(obj).__name__}, not a mapping")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict ``{name: tensor}`` from a ``.safetensors`` or (weights-only) PyTorch file, unwrapped from the usual
    nesting keys (see :func:`unwrap_state_dict`). Pickles that need code execution are refused unexecuted."""
    return unwrap_state_dict(load_weights_file(path), path)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def check_state_dict(
    state: Mapping[str, torch.Tensor], module: nn.Module, *, source: str | Path, component: str = "model"
) -> None:
    """Raise :class:`CCELLAError` unless ``state`` has exactly ``module``'s keys with the same shapes.

    The message names ``source`` (the file) and ``component`` and lists (the first few) missing, unexpected and
    shape-mismatched keys, the first mismatched key first.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape-mismatched: {_listing(mismatched)}")
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    raise CCELLAError(
        f"{source}: weights do not fit the {component} built from the config; " + "; ".join(parts)
    )


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


def add_component(directory: str | Path, name: str, module: nn.Module, record: Mapping[str, Any] | None = None) -> None:
    """Add (or replace) component ``name`` of an existing model directory: ``<name>.safetensors`` is written first,
    then ``model.json`` with the component listed, ``model_hash`` recomputed and ``record`` stored under ``name``
    (each file atomically, so a crash leaves the old model.json naming only complete files)."""
    directory = Path(directory)
    meta_path = _inside(directory, "model.json", "model.json")
    metadata = read_json(meta_path)
    components = {**metadata["components"], name: f"{name}.safetensors"}
    with atomic_path(_inside(directory, components[name], f"model.json: components.{name}"), ".safetensors") as tmp:
        _write_safetensors(module, tmp, name)
    files = [_inside(directory, f, f"model.json: components.{n}") for n, f in components.items()]
    metadata.update(components=components, model_hash=_hash_files(files), **({name: dict(record)} if record else {}))
    atomic_write_json(meta_path, metadata)


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
