"""Shared fixtures: a tiny phantom data set preprocessed for the LDM, an untrained tiny autoencoder, and a tiny
model trained for 6 steps (session-scoped: built once, used by the generation, synthesis and honour tests); three
tiny phantom sets and a briefly trained classifier as the stand-in backbone (the evaluation tests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from CCELLACore.cli import main
from CCELLACore.models.autoencoder import build_autoencoder
from CCELLACore.models.serialization import ModelMetadata, save_model_dir
from CCELLACore.settings import load_config
from CCELLACore.training.ldm import train_ldm


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """8 tiny phantom exams preprocessed for the LDM, and an (untrained) tiny autoencoder model directory."""
    root = tmp_path_factory.mktemp("ldm_data")
    assert main(["phantoms", "--institution", "1", "--n", "8", "--size", "32", "32", "16", "--spacing", "4", "4", "4",
                 "--seed", "0", "--out", str(root / "phantoms"), "--layouts", "none", "--no-progress"]) == 0
    assert main(["preprocess", "--manifest", str(root / "phantoms" / "manifest.csv"), "--config", "tiny",
                 "--target", "ldm", "--out", str(root / "prep"), "--workers", "1", "--no-progress"]) == 0
    config = load_config("tiny")
    torch.manual_seed(0)
    autoencoder = build_autoencoder(config.autoencoder)
    save_model_dir(root / "ae", {"autoencoder": autoencoder}, {"autoencoder": config.autoencoder},
                   ModelMetadata(grid_size=(32, 32, 16), spacing=(4.0, 4.0, 4.0)), "untrained tiny autoencoder")
    return root


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """A tiny model trained 6 steps in one go (shared by the generation tests)."""
    run = tmp_path_factory.mktemp("run_full")
    return train_ldm(load_config("tiny"), data / "prep" / "manifest.csv", data / "ae", run, device="cpu",
                     progress=False)


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory) -> dict[str, Path]:
    """real: institution 1, seed 0; same: institution 1, seed 1; shifted: institution 2, seed 1 (one grid)."""
    root = tmp_path_factory.mktemp("eval_sets")
    for name, institution, seed in (("real", 1, 0), ("same", 1, 1), ("shifted", 2, 1)):
        assert main(["phantoms", "--institution", str(institution), "--n", "10", "--size", "32", "32", "16",
                     "--spacing", "4", "4", "4", "--seed", str(seed), "--out", str(root / name), "--layouts", "none",
                     "--no-progress"]) == 0
    return {name: root / name / "manifest.csv" for name in ("real", "same", "shifted")}


@pytest.fixture(scope="session")
def standin(eval_sets, tmp_path_factory) -> Path:
    """A phantom classifier trained for one epoch on the real set: the stand-in backbone (and faithfulness model)."""
    from CCELLACore.classifier.config import load_classifier_config
    from CCELLACore.classifier.train import train_classifier

    config = load_classifier_config("tiny")
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, epochs=1, val_split="", checkpoint_every=100, train_splits=("train", "val", "test")))
    return train_classifier(config, eval_sets["real"], tmp_path_factory.mktemp("standin"), device="cpu",
                            progress=False)
