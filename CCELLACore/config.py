"""YAML configs validated into frozen dataclasses.

Each component owns its config dataclass (defaults = the paper's values) next to its code; this module only knows how
to turn a YAML mapping into such a dataclass, strictly: an unknown key, a wrong type or a missing required value is a
:class:`~CCELLACore.errors.ConfigError` that names the dotted key and the file.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Grid:
    ...     size: tuple[int, int, int] = (256, 256, 128)
    ...     spacing: tuple[float, float, float] = (0.5, 0.5, 0.5)
    >>> from_dict(Grid, {"size": [64, 64, 32]}, file="tiny.yaml").size
    (64, 64, 32)
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "load_yaml", "dump_yaml", "CONFIG_DIR", "builtin_config_path"]

T = TypeVar("T")

#: Folder of the configs shipped with the package (``paper.yaml``, ``tiny.yaml``, ...).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def builtin_config_path(name_or_path: str | Path) -> Path:
    """Resolve ``"tiny"`` / ``"paper"`` to the shipped YAML, or return an existing path unchanged."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError("config file not found", file=path)
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config named '{name_or_path}'; shipped configs: {shipped}, or give a .yaml path")
    return candidate


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 at byte {exc.start}", file=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", file=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", file=path)
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, file: str | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples, ints to floats, mappings to
    nested dataclasses."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, file)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"must be one of {list(get_args(tp))}, got {value!r}", file=file, key=key)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for section {tp.__name__}, got {value!r}", file=file, key=key)
        return from_dict(tp, value, file=file, prefix=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", file=file, key=key)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} values, got {len(value)}", file=file, key=key)
            items = [_convert(v, a, f"{key}[{i}]", file) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_convert(v, inner, f"{key}[{i}]", file) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", file=file, key=key)
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, key, file): _convert(v, vt, f"{key}.{k}", file) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", file=file, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key)
        return value
    if tp is float:
        # YAML reads 1e-4 as a string; accept numeric strings for floats only.
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", file=file, key=key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", file=file, key=key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", file=file, key=key)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a path, got {value!r}", file=file, key=key)
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, file: str | Path | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types (errors name key and file)."""
    file = None if file is None else str(file)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key; allowed here: {sorted(fields)}", file=file, key=key)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError("missing required key", file=file, key=key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks
        raise ConfigError(str(exc), file=file, key=prefix or None) from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able data (tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)

