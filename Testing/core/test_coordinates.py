"""Coordinate-map inputs of the U-Net (how a symmetric gland gets a left and a right), fine-tuning a model that
lacks them (``train-ldm --init``: the new inputs start at zero, so the grown model starts as the old one) and the
``--set`` config overrides the demo build uses for that stage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.models.autoencoder import build_autoencoder
from CCELLACore.models.ldm import CCELLALDM, LDMConfig, load_grown_state
from CCELLACore.models.serialization import ModelMetadata, save_model_dir
from CCELLACore.models.unet import CCELLAUNet, UNetConfig, coordinate_maps
from CCELLACore.settings import load_config
from CCELLACore.training.ldm import train_ldm


def _with_coordinates(config: LDMConfig) -> LDMConfig:
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, coordinate_channels=3))


def _unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 12, 16, 16, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 8, 32, generator=g), torch.tensor([[0.3, 0.7]] * batch),
            torch.tensor([[2.0, 2.0, 2.0]] * batch))


def test_coordinate_maps_span_minus_one_to_one_along_their_own_axis():
    maps = coordinate_maps(torch.zeros(2, 12, 16, 8, 4))
    assert maps.shape == (2, 3, 16, 8, 4)
    for axis in range(3):
        along = maps[0, axis].movedim(axis, 0).reshape(maps.shape[2 + axis], -1)
        assert torch.allclose(along[:, 0], torch.linspace(-1, 1, maps.shape[2 + axis]))
        assert torch.equal(along, along[:, :1].expand_as(along))  # constant across the other axes


def test_coordinate_channels_are_validated():
    with pytest.raises(ValueError, match="coordinate_channels must be 0 or 3"):
        dataclasses.replace(UNetConfig.tiny(), coordinate_channels=2)
    net = CCELLAUNet(dataclasses.replace(UNetConfig.tiny(), coordinate_channels=3))
    assert net.conv_in.conv.weight.shape[1] == 12 + 3
    with pytest.raises(ValueError, match=r"x must be \(B, 12"):
        net(torch.zeros(1, 15, 16, 16, 8), *_unet_inputs(1)[1:])


def test_a_grown_model_starts_exactly_as_the_model_it_grew_from():
    torch.manual_seed(0)
    small = CCELLALDM(LDMConfig.tiny()).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    grown = CCELLALDM(_with_coordinates(LDMConfig.tiny())).eval()
    names = load_grown_state(grown, small.state_dict(), "small.safetensors")
    assert names == ["unet.conv_in.conv.weight"]
    assert grown.unet.conv_in.conv.weight.shape[1] == 15
    assert not grown.unet.conv_in.conv.weight[:, 12:].any()
    x, t, _, _, spacing = _unet_inputs()
    features, mask = torch.randn(2, 7, small.config.adapter.input_dim), torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        a, b = small(x, t, spacing, features, mask), grown(x, t, spacing, features, mask)
    assert torch.allclose(a.prediction, b.prediction, atol=1e-6)
    assert torch.allclose(a.class_logits, b.class_logits)

    other = CCELLALDM(dataclasses.replace(LDMConfig.tiny(), unet=dataclasses.replace(
        UNetConfig.tiny(), num_channels=(8, 8, 16, 32), num_head_channels=(0, 0, 8, 8))))
    with pytest.raises(CCELLAError, match="small.safetensors.*shape-mismatched"):
        load_grown_state(other, small.state_dict(), "small.safetensors")


def test_overrides_set_nested_keys_and_name_bad_ones():
    config = load_config("tiny", ["train_ldm.lr=2.0e-4", "ldm.unet.coordinate_channels=3", "sampling.steps=7"])
    assert config.train_ldm.lr == 2e-4 and config.ldm.unet.coordinate_channels == 3 and config.sampling.steps == 7
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["train_ldm.lr"])
    with pytest.raises(ConfigError, match="train_ldm.lrr"):
        load_config("tiny", ["train_ldm.lrr=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("tiny", ["train_ldm.lr.x=1"])


def test_train_ldm_init_fine_tunes_a_model_into_one_with_coordinates(data, trained, tmp_path):
    config = load_config("tiny", ["ldm.unet.coordinate_channels=3"])
    # The autoencoder embedded in the initial model folder is the one it was trained on.
    model_dir = train_ldm(config, data / "prep" / "manifest.csv", trained, tmp_path / "run", device="cpu",
                          max_steps=2, progress=False, init=trained)
    meta = json.loads((model_dir / "model.json").read_text())
    base = json.loads((trained / "model.json").read_text())
    assert meta["extra"]["initialised_from"] == base["model_hash"]
    assert meta["latent_scale_factors"] == base["latent_scale_factors"]
    assert load_config(model_dir / "config.yaml").ldm.unet.coordinate_channels == 3
    torch.manual_seed(1)  # another autoencoder: other weights, so other latents
    save_model_dir(tmp_path / "ae2", {"autoencoder": build_autoencoder(config.autoencoder)},
                   {"autoencoder": config.autoencoder},
                   ModelMetadata(grid_size=(32, 32, 16), spacing=(4.0, 4.0, 4.0)), "another tiny autoencoder")
    with pytest.raises(ConfigError, match="another autoencoder.*--init-new-autoencoder"):
        train_ldm(config, data / "prep" / "manifest.csv", tmp_path / "ae2", tmp_path / "run2", device="cpu",
                  max_steps=1, progress=False, init=trained)
    # An encoder fine-tuned from the initial model's: allowed when asked for, with the scale of its own latents.
    again = train_ldm(config, data / "prep" / "manifest.csv", tmp_path / "ae2", tmp_path / "run3", device="cpu",
                      max_steps=1, progress=False, init=trained, init_new_autoencoder=True)
    meta = json.loads((again / "model.json").read_text())
    assert meta["extra"]["initialised_from"] == base["model_hash"] and meta["extra"]["init_new_autoencoder"]
    assert meta["extra"]["autoencoder_hash"] != base["extra"]["autoencoder_hash"]
    assert meta["latent_scale_factors"].keys() == base["latent_scale_factors"].keys()
    assert all(abs(meta["latent_scale_factors"][s] - base["latent_scale_factors"][s]) > 1e-4
               for s in base["latent_scale_factors"])
