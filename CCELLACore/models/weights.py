"""Safe weight loading: a weights file is read without ever running code from it.

``.safetensors`` files are read by safetensors; ``.pt/.pth/.ckpt/.bin/.pkl`` files only through
``torch.load(..., weights_only=True)``, so a pickle that needs to run code to load is refused, and nothing in it runs.
State dicts nested the usual ways (MAISI's ``unet_state_dict``, Lightning's ``state_dict``, DDP's ``module.``) are
unwrapped, and a state dict is checked against the module it is meant for with errors that name the file.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CCELLAError

__all__ = ["STATE_DICT_KEYS", "load_weights_file", "load_state_dict_file", "unwrap_state_dict", "check_state_dict"]

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
