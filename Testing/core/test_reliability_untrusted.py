"""Untrusted files (RELIABILITY.md): a checkpoint, config or text-encoder folder that would run code is refused, and
the code never runs (each payload would create a marker file)."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.models.serialization import load_weights_file, read_model_config
from CCELLACore.models.text_encoder import TextEncoder, TextEncoderConfig, TextEncoderError
from CCELLACore.settings import load_config
from CCELLACore.training.checkpoint import load_checkpoint, save_checkpoint
from test_reliability_inputs import Evil, _job, _values, snapshot


def test_checkpoint_with_a_code_running_pickle_is_refused_unexecuted(tmp_path):
    saved = _job(0)
    saved.step = 4
    ckpt = save_checkpoint(tmp_path / "ckpt", saved)
    marker = tmp_path / "pwned"
    training = torch.load(ckpt / "training.pt", weights_only=True)
    training["rng"]["python"] = Evil(marker)  # the rest of the file is genuine
    torch.save(training, ckpt / "training.pt")
    before = snapshot(tmp_path / "ckpt")
    live = _job(3)
    was = [t.clone() for t in _values(live)]
    with pytest.raises(CCELLAError, match="refused to load: the file is a pickle that needs code execution") as err:
        load_checkpoint(tmp_path / "ckpt", live)
    assert str(err.value).startswith(str(ckpt / "training.pt"))
    assert not marker.exists() and live.step == 0
    assert all(torch.equal(a, b) for a, b in zip(was, _values(live)))
    assert snapshot(tmp_path / "ckpt") == before
    raw = tmp_path / "weights.pkl"  # a bare pickle (no zip container) takes the same path
    raw.write_bytes(pickle.dumps({"w": Evil(marker)}))
    with pytest.raises(CCELLAError, match=r"weights\.pkl: refused to load"):
        load_weights_file(raw)
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_in_configs_and_model_folders(data, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"train_ldm:\n  lr: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
    config = tmp_path / "evil.yaml"
    config.write_text(payload, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 2: could not determine a constructor for the tag "
                                          r"'tag:yaml.org,2002:python/object/apply:builtins.open'") as err:
        load_config(config)
    assert str(config) in str(err.value)
    folder = tmp_path / "model"
    shutil.copytree(data / "ae", folder)
    (folder / "config.yaml").write_text(payload, encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML at line 2") as err:
        read_model_config(folder)
    assert str(folder / "config.yaml") in str(err.value)
    assert not marker.exists()


def test_text_encoder_that_needs_remote_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }), encoding="utf-8")
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    with pytest.raises(TextEncoderError, match=r"config\.json names custom code \(auto_map\), which is never run") as err:
        TextEncoder.from_config(TextEncoderConfig(name_or_path=str(folder)))
    assert str(folder) in str(err.value) and not marker.exists()
    # The same through the tokenizer's config, with an ordinary config.json.
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_evil.Tok", None]}}),
                                                  encoding="utf-8")
    with pytest.raises(TextEncoderError, match=r"tokenizer_config\.json names custom code"):
        TextEncoder.from_config(TextEncoderConfig(name_or_path=str(folder)))
    assert not marker.exists()
