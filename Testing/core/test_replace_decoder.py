"""``ccella replace-decoder``: a decoder fine-tuned on the model's own latents replaces the model's, the generator
loads and decodes with it, and an autoencoder with another encoder is refused by name."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.cli import main
from CCELLACore.errors import CCELLAError
from CCELLACore.fileio import read_json
from CCELLACore.models.autoencoder import ENCODER_PARTS
from CCELLACore.models.replace_decoder_cli import replace_decoder
from CCELLACore.pipelines.generation import CCELLAPipeline


def _fine_tune(data, out, *, train_encoder: bool):
    """`ccella train-autoencoder` of the tiny config from the model's own autoencoder, 2 steps."""
    assert main(["train-autoencoder", "--config", "tiny", "--manifest", str(data / "prep" / "manifest.csv"),
                 "--out", str(out), "--max-steps", "2", "--device", "cpu", "--no-progress",
                 "--set", f"autoencoder.weights_path={data / 'ae' / 'autoencoder.safetensors'}",
                 "--set", f"train_autoencoder.train_encoder={str(train_encoder).lower()}",
                 "--set", "train_autoencoder.lr=1e-2", "--set", "train_autoencoder.val_split=''"]) == 0
    return out / "model"


def test_replace_decoder_keeps_the_latents_and_changes_the_exam(data, trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    before = read_json(model / "model.json")
    report = "PI-RADS 4 lesion in the left peripheral zone, 12 mm."
    exam_before = CCELLAPipeline.from_pretrained(model, device="cpu")(report, seed=0, steps=2).exam

    decoder = _fine_tune(data, tmp_path / "ft", train_encoder=False)
    assert main(["replace-decoder", "--model", str(model), "--autoencoder", str(decoder)]) == 0
    after = read_json(model / "model.json")
    assert after["model_hash"] != before["model_hash"]
    assert after["extra"]["decoder_fine_tuned"]["replaced_autoencoder_hash"] == before["extra"]["autoencoder_hash"]
    old, new = load_file(str(trained / "autoencoder.safetensors")), load_file(str(model / "autoencoder.safetensors"))
    assert new.keys() == old.keys()
    assert any(k.startswith(ENCODER_PARTS) for k in old)
    assert all(torch.equal(new[k], old[k]) for k in old if k.startswith(ENCODER_PARTS))
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("decoder."))

    pipe = CCELLAPipeline.from_pretrained(model, device="cpu")  # the hash check passes: model.json is consistent
    exam_after = pipe(report, seed=0, steps=2).exam
    assert pipe.model_hash == after["model_hash"]
    for name, volume in exam_after.volumes.items():
        assert volume.shape == exam_before.volumes[name].shape
    assert any(not torch.equal(torch.from_numpy(exam_after.volumes[n].array), torch.from_numpy(v.array))
               for n, v in exam_before.volumes.items())


def test_replace_decoder_refuses_another_encoder(data, trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    retrained = _fine_tune(data, tmp_path / "whole", train_encoder=True)
    with pytest.raises(CCELLAError, match=r"encoder weight encoder\.\S+ differs"):
        replace_decoder(model, retrained)
    assert read_json(model / "model.json") == read_json(trained / "model.json")  # nothing written
