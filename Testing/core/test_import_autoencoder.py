"""`ccella import-autoencoder`: a frozen model folder from a pretrained (MAISI-layout) weights file, no training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.cli import main
from CCELLACore.models.autoencoder import SequenceAutoencoder, build_autoencoder, load_autoencoder_dir
from CCELLACore.settings import load_config


def _maisi_like_file(tmp_path, nested: bool):
    """A random-weight autoencoder saved as NVIDIA's MAISI file is: a plain state dict (epoch273_alternative.pt) or
    one nested under "unet_state_dict" with a DDP "module." prefix (the newer MAISI checkpoints)."""
    torch.manual_seed(7)
    source = build_autoencoder(load_config("tiny").autoencoder).eval()
    state = source.state_dict()
    payload = {"unet_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 273} if nested else state
    path = tmp_path / "model_maisi_autoencoder_epoch273_alternative.pt"
    torch.save(payload, path)
    return source, path


@pytest.mark.parametrize("nested", [False, True])
def test_import_writes_a_frozen_folder_with_the_files_weights(tmp_path, nested):
    source, path = _maisi_like_file(tmp_path, nested)
    out = tmp_path / "maisi_ae"
    assert main(["import-autoencoder", "--weights", str(path), "--config", "tiny", "--out", str(out)]) == 0
    model, meta = load_autoencoder_dir(out)
    saved = load_file(str(out / "autoencoder.safetensors"))
    assert saved.keys() == source.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in source.state_dict().items())
    assert meta["extra"]["frozen"] is True and meta["extra"]["steps"] == 0
    assert meta["extra"]["initialised_from"] == path.name and len(meta["extra"]["source_sha256"]) == 64
    assert meta["grid_size"] == [32, 32, 16]  # the tiny config's preprocess grid
    x = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    expected = SequenceAutoencoder(source, dtype=torch.float32).encode(x)
    assert torch.equal(SequenceAutoencoder(model, dtype=torch.float32).encode(x), expected)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "not trained" in card and "do not redistribute" in card


def test_import_refuses_weights_of_another_architecture(tmp_path, capsys):
    _, path = _maisi_like_file(tmp_path, nested=False)
    # the paper's MAISI architecture (64/128/256 channels) does not fit the tiny file: an error, no folder
    assert main(["import-autoencoder", "--weights", str(path), "--config", "paper", "--out",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert path.name in err and "shape-mismatched" in err and "encoder.blocks.0.conv.conv.weight" in err
    assert not (tmp_path / "out").exists()


def test_train_ldm_keeps_the_autoencoder_frozen(data, trained):
    """The diffusion model folder embeds the autoencoder it was given, byte for byte (never trained)."""
    given = load_file(str(data / "ae" / "autoencoder.safetensors"))
    embedded = load_file(str(trained / "autoencoder.safetensors"))
    assert given.keys() == embedded.keys() and all(torch.equal(given[k], embedded[k]) for k in given)
    meta = json.loads((trained / "model.json").read_text())
    assert meta["extra"]["autoencoder_hash"]
