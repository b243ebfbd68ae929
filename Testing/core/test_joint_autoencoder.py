"""A joint autoencoder (``autoencoder.in_channels`` = the number of sequences): the sequences of an exam are the
channels of one volume, encoded together into the same 12-channel latent the per-sequence autoencoder makes, so the
diffusion model, generation, the autoencoder ceiling and the light decoder work unchanged on top of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from CCELLACore.data.manifest import read_manifest
from CCELLACore.data.study import SEQUENCES
from CCELLACore.errors import ConfigError
from CCELLACore.models.autoencoder import SequenceAutoencoder, build_autoencoder, load_autoencoder_dir
from CCELLACore.pipelines.generation import CCELLAPipeline
from CCELLACore.settings import load_config
from CCELLACore.training.autoencoder import train_autoencoder
from CCELLACore.training.autoencoder_data import load_sequence_samples
from CCELLACore.training.distill_decoder import DistillConfig, distill_decoder
from CCELLACore.training.ldm import train_ldm

JOINT = ["autoencoder.in_channels=3", "autoencoder.out_channels=3"]
REPORT = "PI-RADS 5 lesion in the left peripheral zone, mid gland, 18 mm, markedly restricted diffusion."


@pytest.fixture(scope="module")
def joint_ae(data, tmp_path_factory):
    """A tiny joint autoencoder trained 3 steps with the gland-weighted L1 on the 8 tiny phantoms."""
    config = load_config("tiny", [*JOINT, "train_autoencoder.gland_weight=9", "train_autoencoder.lesion_weight=20"])
    return train_autoencoder(config, data / "prep" / "manifest.csv", tmp_path_factory.mktemp("joint_ae"),
                             device="cpu", max_steps=3, progress=False)


def test_samples_are_whole_exams_with_a_channel_per_sequence(data):
    studies = read_manifest(data / "prep" / "manifest.csv").studies
    single, _ = load_sequence_samples(studies, SEQUENCES, masks=("gland",))
    joint, _ = load_sequence_samples(studies, SEQUENCES, masks=("gland",), joint=True)
    n = joint.n_exams
    assert joint.images.shape == (n, 3, *single.grid_size) and single.images.shape == (3 * n, 1, *single.grid_size)
    assert torch.equal(joint.images.reshape(3 * n, 1, *single.grid_size), single.images)  # same volumes, regrouped
    assert joint.masks["gland"].shape == (n, 1, *single.grid_size)
    assert torch.equal(joint.masks["gland"], single.masks["gland"][::3])
    assert joint.names[0] == (single.names[0][0], "AxT2+HighB+ADC")


def test_joint_autoencoder_keeps_the_latent_shape_and_the_card_says_joint(joint_ae):
    model, metadata = load_autoencoder_dir(joint_ae, "cpu")
    assert metadata["extra"]["train_samples"] == metadata["extra"]["train_exams"]  # one sample per exam
    card = (joint_ae / "README.md").read_text(encoding="utf-8")
    assert "together" in card and "12 latent channels" in card and "(gland voxels x 10)" in card
    ae = SequenceAutoencoder(model, "cpu", torch.float32)
    assert ae.joint and ae.in_channels == 3 and ae.latent_channels == 12
    x = torch.rand(2, 3, 32, 32, 16)
    z = ae.encode_sequences(x)
    assert z.shape == (2, 12, 8, 8, 4)  # what the per-sequence autoencoder gives: the U-Net is the same
    per_sequence = SequenceAutoencoder(build_autoencoder(load_config("tiny").autoencoder), "cpu", torch.float32)
    assert per_sequence.encode_sequences(x).shape == z.shape
    assert ae.decode_sequences(z).shape == x.shape
    # The sequences are encoded together: changing one changes the latent channels of the others too.
    y = x.clone()
    y[:, 2] = 0.0  # ADC only
    assert not torch.allclose(ae.encode_sequences(y)[:, :4], z[:, :4])


def test_diffusion_generation_and_light_decoder_run_on_a_joint_autoencoder(data, joint_ae, tmp_path):
    config = load_config("tiny", JOINT)
    model_dir = train_ldm(config, data / "prep" / "manifest.csv", joint_ae, tmp_path / "ldm", device="cpu",
                          max_steps=2, progress=False)
    assert load_config(model_dir / "config.yaml").autoencoder.in_channels == 3
    pipe = CCELLAPipeline.from_pretrained(model_dir, device="cpu")
    out = pipe(REPORT, seed=0, steps=2)
    for name in SEQUENCES:
        volume = out.exam.volumes[name].array
        assert volume.shape == (32, 32, 16) and np.isfinite(volume).all()
    exam = read_manifest(data / "prep" / "manifest.csv").studies[0].load(SEQUENCES, masks=False)
    images = np.stack([exam.volumes[s].array for s in SEQUENCES]).astype(np.float32)
    assert pipe.reconstruct(images).shape == images.shape  # the autoencoder ceiling's path (ccella honour)

    record = distill_decoder(model_dir, data / "prep" / "manifest.csv", tmp_path / "distill",
                             DistillConfig(steps=2, batch_size=2, crop=(4, 4, 4)), device="cpu", progress=False)
    assert record["config"]["latent_channels"] == 12 and record["config"]["out_channels"] == 3
    assert json.loads((model_dir / "model.json").read_text())["light_decoder"]["config"]["out_channels"] == 3
    light = CCELLAPipeline.from_pretrained(model_dir, device="cpu", decoder="light")
    assert light(REPORT, seed=0, steps=2).exam.volumes["ADC"].array.shape == (32, 32, 16)


def test_a_joint_autoencoder_must_take_every_sequence():
    with pytest.raises(ConfigError, match="autoencoder.in_channels must be 1 .* or 3"):
        load_config("tiny", ["autoencoder.in_channels=2", "autoencoder.out_channels=2"])
    with pytest.raises(ConfigError, match="in_channels 3 and out_channels 1 must be equal"):
        load_config("tiny", ["autoencoder.in_channels=3"])
