"""The generic YAML -> frozen dataclass validator: errors name the key and the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from CCELLACore.config import builtin_config_path, dump_yaml, from_dict, load_yaml
from CCELLACore.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    size: tuple[int, int, int] = (256, 256, 128)
    spacing: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Outer:
    name: str
    lr: float = 1e-4
    steps: int = 10
    mode: Literal["epsilon", "velocity"] = "epsilon"
    weights: Optional[str] = None
    grid: Inner = field(default_factory=Inner)
    flags: tuple[bool, ...] = (False, True)


def test_valid_mapping_converts_types():
    cfg = from_dict(Outer, {"name": "x", "lr": "3e-4", "steps": 5, "grid": {"size": [64, 64, 32]}, "flags": [True]})
    assert cfg.lr == 3e-4 and cfg.grid.size == (64, 64, 32) and cfg.grid.spacing == (0.5, 0.5, 0.5)
    assert cfg.flags == (True,)
    assert from_dict(Outer, load_yaml_text(dump_yaml(cfg))) == cfg


def load_yaml_text(text):
    import yaml

    return yaml.safe_load(text)


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"name": "x", "stpes": 3}, "stpes", "unknown key"),
        ({"name": "x", "grid": {"sise": [1, 2, 3]}}, "grid.sise", "unknown key"),
        ({"name": "x", "steps": "ten"}, "steps", "integer"),
        ({"name": "x", "steps": True}, "steps", "integer"),
        ({"name": "x", "mode": "v"}, "mode", "one of"),
        ({"name": "x", "grid": {"size": [1, 2]}}, "grid.size", "expected 3 values"),
        ({"name": "x", "grid": {"spacing": [1, "a", 1]}}, "grid.spacing[1]", "number"),
        ({}, "name", "missing required key"),
    ],
)
def test_errors_name_key_and_file(data, key, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, file="configs/my.yaml")
    assert err.value.key == key
    assert message in str(err.value) and "configs/my.yaml" in str(err.value) and f"'{key}'" in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d.*bad\.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "none.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listing)
    with pytest.raises(ConfigError, match="no config named 'nosuch'"):
        builtin_config_path("nosuch")
