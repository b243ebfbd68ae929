"""Training checkpoints for exact resume, written atomically and without unsafe pickles.

A checkpoint folder ``<dir>/last`` (the one before it is kept as ``<dir>/previous``) holds::

    models.safetensors   network weights, keys "<component>/<parameter>"
    ema.safetensors      EMA shadow weights, same keys (if any EMA)
    training.pt          optimizer, LR scheduler and GradScaler state dicts, RNG states (python, numpy, torch CPU,
                         CUDA, and the torch.Generators given); plain containers of tensors and numbers, saved with
                         torch.save and read back only with torch.load(weights_only=True)
    state.json           step, epoch, latent scale factors, config hash, EMA settings; written last, so a folder
                         without it is incomplete and ignored

Resuming from ``last`` continues bit-identically to a run that was never interrupted (same machine and library
versions). Fixes the reference, which overwrote one file per epoch, recomputed the scale factors on resume and lost
the GradScaler state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import dump_yaml
from ..errors import CCELLAError
from ..fileio import atomic_write_json, read_json
from .ema import EMA

__all__ = ["TrainingState", "save_checkpoint", "load_checkpoint", "find_checkpoint", "config_hash",
           "get_rng_states", "set_rng_states"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
LAST, PREVIOUS = "last", "previous"


def config_hash(config: Any) -> str:
    """SHA-256 (hex) of a config (dataclass or mapping) as YAML: resuming with a different config is caught."""
    return hashlib.sha256(dump_yaml(config).encode("utf-8")).hexdigest()


@dataclass
class TrainingState:
    """Everything a training job needs to continue exactly where it stopped.

    The modules, optimizers, schedulers, scaler, EMAs and generators are live objects: :func:`save_checkpoint`
    reads their state, :func:`load_checkpoint` writes the saved state back into them (build them the same way
    first). ``step``, ``epoch``, ``scale_factors`` and ``extra`` are restored as values.

    Args:
        models: ``{component: network}``.
        optimizers / schedulers: ``{name: object with state_dict/load_state_dict}``.
        scaler: the ``torch.amp.GradScaler`` if one is used.
        emas: ``{component: EMA}``.
        generators: ``{name: torch.Generator}`` whose states are saved (e.g. the data shuffling generator).
        step / epoch: optimiser steps and epochs completed.
        scale_factors: latent scale factors per sequence (saved, never recomputed on resume).
        config_hash: :func:`config_hash` of the training config; a resume with another config is refused.
        extra: JSON-able values (best metric, data-loader position, ...).
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    scaler: Any | None = None
    emas: dict[str, EMA] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    scale_factors: dict[str, float] | None = None
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------ RNG
def get_rng_states() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, CUDA) as weights-only-loadable values."""
    version, mt_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": (version, tuple(mt_state), gauss),
        # numpy arrays are not allowed by weights_only loading: keep the key as an int64 tensor.
        "numpy": (kind, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned."""
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        saved = states["cuda"]
        if len(saved) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; not restoring them",
                        len(saved), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(saved)


# ------------------------------------------------------------------------------------------------------ save/load
def _check_names(names: Any, what: str) -> None:
    for name in names:
        if not name or "/" in name:
            raise CCELLAError(f"invalid {what} name {name!r} (must be non-empty, without '/')")


def _flat(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # Clones: safetensors needs contiguous CPU tensors that do not share storage.
    return {
        f"{name}/{k}": v.detach().to("cpu").contiguous().clone() for name, sd in parts.items() for k, v in sd.items()
    }


def _unflat(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, param = key.partition("/")
        out.setdefault(name, {})[param] = value
    return out


def save_checkpoint(directory: str | Path, state: TrainingState) -> Path:
    """Write ``state`` to ``<directory>/last``, keeping the former ``last`` as ``<directory>/previous``.

    The new checkpoint is written completely into a temporary folder first; only then is the old ``last`` renamed
    to ``previous`` and the new folder renamed to ``last``, so an interruption never leaves no usable checkpoint.

    Returns:
        The path of the new ``last`` folder.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    directory = Path(directory)
    _check_names(state.models, "model")
    _check_names(state.emas, "EMA")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-ckpt-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=directory))
    try:
        try:
            save_file(_flat({n: m.state_dict() for n, m in state.models.items()}), str(tmp / "models.safetensors"))
            ema_meta = {}
            if state.emas:
                ema_states = {n: e.state_dict() for n, e in state.emas.items()}
                save_file(_flat({n: s["shadow"] for n, s in ema_states.items()}), str(tmp / "ema.safetensors"))
                ema_meta = {n: {k: s[k] for k in ("decay", "warmup", "num_updates")} for n, s in ema_states.items()}
            torch.save(
                {
                    "optimizers": {n: o.state_dict() for n, o in state.optimizers.items()},
                    "schedulers": {n: s.state_dict() for n, s in state.schedulers.items()},
                    "scaler": None if state.scaler is None else state.scaler.state_dict(),
                    "rng": get_rng_states(),
                    "generators": {n: g.get_state() for n, g in state.generators.items()},
                },
                tmp / "training.pt",
            )
            atomic_write_json(tmp / "state.json", {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "step": int(state.step),
                "epoch": int(state.epoch),
                "scale_factors": None if state.scale_factors is None else {k: float(v) for k, v in
                                                                            state.scale_factors.items()},
                "config_hash": state.config_hash,
                "models": sorted(state.models),
                "ema": ema_meta,
                "extra": state.extra,
            })
        except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, quota, file size limit
            raise CCELLAError(f"{directory}: cannot write the checkpoint ({str(exc).strip().splitlines()[-1]}; disk "
                              "full?); the last complete checkpoint is unchanged") from None
        last, previous = directory / LAST, directory / PREVIOUS
        if last.exists():
            if previous.exists():
                shutil.rmtree(previous)  # safe: `last` is complete
            os.replace(last, previous)
        os.replace(tmp, last)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory / LAST


def find_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``directory`` (``last``, else ``previous``), or None."""
    directory = Path(directory)
    for name in (LAST, PREVIOUS):
        if (directory / name / "state.json").is_file():
            if name == PREVIOUS:
                log.warning("%s: no complete 'last' checkpoint; resuming from 'previous'", directory)
            return directory / name
    return None


def load_checkpoint(directory: str | Path, state: TrainingState, *, allow_config_change: bool = False) -> Path:
    """Restore ``state`` in place from the newest complete checkpoint in ``directory`` (see :func:`find_checkpoint`;
    ``directory`` may also be a checkpoint folder itself).

    Raises:
        CCELLAError: no checkpoint; a different config hash (unless ``allow_config_change``); models, optimizers,
            schedulers, EMAs or generators that do not match the saved ones (naming them); an unreadable (truncated,
            corrupt) file, naming it. Every file is read and checked before ``state`` is changed.

    Returns:
        The checkpoint folder used.
    """
    from ..models.weights import check_state_dict, load_weights_file

    directory = Path(directory)
    folder = directory if (directory / "state.json").is_file() else find_checkpoint(directory)
    if folder is None:
        raise CCELLAError(f"{directory}: no complete checkpoint ('{LAST}' or '{PREVIOUS}' with state.json)")
    def unreadable(exc: CCELLAError) -> CCELLAError:
        other = folder.parent / PREVIOUS
        if folder.name == LAST and (other / "state.json").is_file():
            return CCELLAError(f"{exc}; the previous checkpoint {other} is complete: delete {folder} to resume from it")
        return exc

    try:
        meta = read_json(folder / "state.json")
    except CCELLAError as exc:
        raise unreadable(exc) from None
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CCELLAError(f"{folder / 'state.json'}: unsupported checkpoint format {meta.get('format_version')!r}")
    if state.config_hash and meta.get("config_hash") and meta["config_hash"] != state.config_hash \
            and not allow_config_change:
        raise CCELLAError(f"{folder}: the checkpoint was written with a different training config (config hash "
                          f"{meta['config_hash'][:12]} vs {state.config_hash[:12]}); resume with the same config")

    def same_names(saved: Any, live: Any, what: str) -> None:
        if set(saved) != set(live):
            raise CCELLAError(f"{folder}: checkpoint has {what} {sorted(saved)}, the job has {sorted(live)}")

    # Read and check every file before changing anything: a bad checkpoint leaves the live objects untouched.
    try:
        models = _unflat(load_weights_file(folder / "models.safetensors"))
        training = load_weights_file(folder / "training.pt")  # torch.load(weights_only=True)
        shadows = _unflat(load_weights_file(folder / "ema.safetensors")) if state.emas else {}
    except CCELLAError as exc:
        raise unreadable(exc) from None
    same_names(models, state.models, "models")
    for name, module in state.models.items():
        check_state_dict(models[name], module, source=folder / "models.safetensors", component=name)
    same_names(training["optimizers"], state.optimizers, "optimizers")
    same_names(training["schedulers"], state.schedulers, "LR schedulers")
    same_names(training["generators"], state.generators, "generators")
    same_names(meta.get("ema", {}), state.emas, "EMAs")
    if (training["scaler"] is None) != (state.scaler is None):
        raise CCELLAError(f"{folder}: GradScaler {'missing from' if training['scaler'] is None else 'present in'} "
                          f"the checkpoint but {'used' if state.scaler is not None else 'not used'} by the job")

    for name, module in state.models.items():
        module.load_state_dict(models[name])
    for name, opt in state.optimizers.items():
        opt.load_state_dict(training["optimizers"][name])
    for name, sched in state.schedulers.items():
        sched.load_state_dict(training["schedulers"][name])
    if state.scaler is not None:
        state.scaler.load_state_dict(training["scaler"])
    if state.emas:
        for name, ema in state.emas.items():
            ema.load_state_dict({**meta["ema"][name], "shadow": shadows[name]})
    for name, gen in state.generators.items():
        gen.set_state(training["generators"][name])
    set_rng_states(training["rng"])
    state.step = int(meta["step"])
    state.epoch = int(meta["epoch"])
    state.scale_factors = meta.get("scale_factors")
    state.extra = dict(meta.get("extra") or {})
    if not state.config_hash:
        state.config_hash = meta.get("config_hash") or ""
    return folder
