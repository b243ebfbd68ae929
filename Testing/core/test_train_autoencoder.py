"""``ccella train-autoencoder`` on four tiny phantom exams (32x32x16 voxels): the loss falls, a kill and restart
give bit-identical results, the model directory loads and reconstructs better than an untrained network, bad exams
are skipped by name, and the discriminator and fine-tuning paths run."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.phantoms import generate_phantom
from CCELLACore.data.preprocess_batch import preprocess_manifest
from CCELLACore.data.study import SEQUENCES, Study
from CCELLACore.data.volume import write_volume
from CCELLACore.errors import ConfigError, DataError
from CCELLACore.fileio import read_json
from CCELLACore.models.autoencoder import ENCODER_PARTS, SequenceAutoencoder, build_autoencoder, load_autoencoder_dir
from CCELLACore.settings import load_config
from CCELLACore.training import autoencoder_cli
from CCELLACore.training.autoencoder import train_autoencoder

SPLITS = ("train", "train", "train", "val")


def _tiny(**changes):
    """The shipped tiny config, with ``train_autoencoder`` fields changed."""
    config = load_config("tiny")
    if not changes:
        return config
    return dataclasses.replace(config, train_autoencoder=dataclasses.replace(config.train_autoencoder, **changes))


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    """Four phantom exams (3 train, 1 val) preprocessed with the tiny LDM grid; returns the manifest."""
    root = tmp_path_factory.mktemp("phantoms")
    studies = []
    for index, split in enumerate(SPLITS):
        case = generate_phantom(index, 1, (32, 32, 16), (4.0, 4.0, 4.0), seed=0)
        paths = {}
        for name, vol in (*case.exam.volumes.items(), *case.exam.masks.items()):
            paths[name] = root / "cases" / case.case_id / f"{name}.nii.gz"
            write_volume(vol, paths[name])
        studies.append(Study(case_id=case.case_id, patient_id=f"patient{index}", split=split, report=case.report,
                             images={s: paths[s] for s in SEQUENCES}, masks={m: paths[m] for m in ("gland", "lesion")}))
    write_manifest(studies, root / "manifest.csv")
    summary = preprocess_manifest(root / "manifest.csv", load_config("tiny").preprocess.ldm, root / "prep",
                                  workers=1, progress=False)
    assert not summary.skipped
    return root / "prep" / "manifest.csv"


@pytest.fixture(scope="module")
def full_run(prep, tmp_path_factory) -> Path:
    """One uninterrupted run of the tiny config; returns its run folder."""
    out = tmp_path_factory.mktemp("full")
    train_autoencoder(load_config("tiny"), prep, out, device="cpu", progress=False)
    return out


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_metrics_have_the_logged_columns(full_run):
    cfg = load_config("tiny").train_autoencoder
    rows = _rows(full_run)
    train = [r for r in rows if r["train_l1"]]
    val = [r for r in rows if r["val_l1"]]
    assert [int(r["step"]) for r in train] == list(range(1, cfg.max_steps + 1))
    assert [int(r["step"]) for r in val] == [cfg.validate_every, cfg.max_steps]
    for column in ("train_total", "train_l1", "train_ssim", "train_kl", "lr", "grad_norm", "val_psnr", "val_ssim"):
        assert column in rows[0]
    # Robust to single noisy batches: mean of the first four logged L1 values against the last four.
    l1 = [float(r["train_l1"]) for r in train]
    assert sum(l1[-4:]) / 4 < 0.75 * sum(l1[:4]) / 4
    total = [float(r["train_total"]) for r in train]
    assert sum(total[-4:]) < sum(total[:4])
    lrs = [float(r["lr"]) for r in train]
    assert lrs[0] == pytest.approx(cfg.lr) and all(a > b for a, b in zip(lrs, lrs[1:]))  # polynomial decay
    assert float(val[-1]["val_ssim"]) > 0 and float(val[-1]["val_psnr"]) > 10


def test_kill_and_restart_gives_bit_identical_weights(prep, full_run, tmp_path):
    cfg = load_config("tiny").train_autoencoder
    assert cfg.checkpoint_every < 6 < cfg.max_steps
    out = tmp_path / "run"
    train_autoencoder(load_config("tiny"), prep, out, device="cpu", stop_after=6, progress=False)
    assert read_json(out / "checkpoints" / "last" / "state.json")["step"] == 6
    assert not (out / "model").exists()
    # A kill while writing the step-6 checkpoint: only the one before (step 4) is complete.
    shutil.rmtree(out / "checkpoints" / "last")
    assert read_json(out / "checkpoints" / "previous" / "state.json")["step"] == 4
    train_autoencoder(load_config("tiny"), prep, out, device="cpu", progress=False)

    for name in ("checkpoints/last/models.safetensors", "checkpoints/last/ema.safetensors"):
        assert (out / name).read_bytes() == (full_run / name).read_bytes(), name
    # The model file's tensors (its safetensors header metadata is written in hash-map order, so not its bytes).
    resumed, uninterrupted = (load_file(str(run / "model" / "autoencoder.safetensors")) for run in (out, full_run))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # The metrics of the steps redone after the kill replace the killed run's rows: the CSV reads as one run.
    assert _rows(out) == _rows(full_run)


def test_model_directory_loads_and_beats_an_untrained_autoencoder(prep, full_run):
    config = load_config("tiny")
    model, metadata = load_autoencoder_dir(full_run / "model", "cpu")
    assert tuple(metadata["grid_size"]) == (32, 32, 16) and tuple(metadata["spacing"]) == (4.0, 4.0, 4.0)
    assert tuple(metadata["sequences"]) == SEQUENCES
    assert metadata["extra"]["steps"] == config.train_autoencoder.max_steps
    assert metadata["extra"]["train_exams"] == 3 and metadata["extra"]["val_exams"] == 1
    card = (full_run / "model" / "README.md").read_text(encoding="utf-8")
    assert f"L1 {metadata['extra']['val_l1']:.4f}" in card and "PSNR" in card and "CPU" in card

    val_study = next(s for s in read_manifest(prep).studies if s.split == "val")
    exam = val_study.load(SEQUENCES, masks=False)
    x = torch.stack([torch.from_numpy(exam.volumes[s].array).float() for s in SEQUENCES])[:, None]  # (3, 1, X, Y, Z)

    def l1(network) -> float:
        ae = SequenceAutoencoder(network, "cpu")
        return float((ae.decode(ae.encode(x)) - x).abs().mean())

    torch.manual_seed(0)
    untrained = l1(build_autoencoder(config.autoencoder))
    trained = l1(model)
    assert trained < 0.7 * untrained
    assert trained == pytest.approx(metadata["extra"]["val_l1"], rel=0.1)  # the card's figure (it clamps to [0, 1])


def test_missing_file_exam_is_skipped_by_name_via_the_cli(prep, tmp_path, caplog):
    manifest = read_manifest(prep)
    studies = []
    for study in manifest.studies:  # copy the prepared cases so the shared ones stay intact
        folder = tmp_path / "cases" / study.case_id
        shutil.copytree(study.images["AxT2"].parent, folder)
        studies.append(study.with_paths({s: folder / p.name for s, p in study.images.items()},
                                        {m: folder / p.name for m, p in study.masks.items()}))
    broken = studies[1]
    broken.images["HighB"].unlink()
    write_manifest(studies, tmp_path / "manifest.csv")

    parser = argparse.ArgumentParser()
    autoencoder_cli.add_arguments(parser)
    args = parser.parse_args(["--config", "tiny", "--manifest", str(tmp_path / "manifest.csv"), "--out",
                              str(tmp_path / "run"), "--max-steps", "2", "--device", "cpu", "--no-progress"])
    with caplog.at_level(logging.WARNING, logger="CCELLACore"):
        assert autoencoder_cli.run(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(broken.case_id in m and broken.images["HighB"].name in m for m in warnings), warnings
    meta = read_json(tmp_path / "run" / "model" / "model.json")
    assert meta["extra"]["train_exams"] == 2 and meta["extra"]["train_samples"] == 6

    # Every training exam unusable: a clear error, not a crash deep inside.
    for study in studies:
        if study.split == "train" and study.images["HighB"].exists():
            study.images["HighB"].unlink()
    with pytest.raises(DataError, match="no usable exam in splits"):
        train_autoencoder(_tiny(), tmp_path / "manifest.csv", tmp_path / "run2", device="cpu", progress=False)


def test_grid_not_divisible_by_the_downsampling_factor_names_the_grid_key(prep, tmp_path):
    config = load_config("tiny")
    deep = dataclasses.replace(config.autoencoder, num_channels=(4,) * 6, num_res_blocks=(1,) * 6,
                               attention_levels=(False,) * 6)  # 32x downsampling; the grid has 16 slices
    with pytest.raises(ConfigError, match="preprocess.ldm.grid.size"):
        train_autoencoder(dataclasses.replace(config, autoencoder=deep), prep, tmp_path, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="train_autoencoder.patch_size"):
        train_autoencoder(_tiny(patch_size=(16, 16, 6)), prep, tmp_path, device="cpu", progress=False)


def test_discriminator_trains_after_its_start_and_stays_out_of_the_model(prep, tmp_path):
    gan = {"adversarial_weight": 0.1, "adversarial_start": 1, "patch_size": (16, 16, 16), "ssim_win_size": 7}
    with pytest.raises(ConfigError, match="train_autoencoder.disc_layers"):  # 16 -> 8 -> 4 -> 2 -> 1 voxel
        train_autoencoder(_tiny(**gan, disc_layers=3), prep, tmp_path, device="cpu", progress=False)
    config = _tiny(**gan, disc_layers=2, max_steps=3)
    train_autoencoder(config, prep, tmp_path, device="cpu", progress=False)
    rows = [r for r in _rows(tmp_path) if r["train_l1"]]
    assert rows[0]["train_disc"] == "" and rows[0]["train_gen_adv"] == ""  # step 1: before adversarial_start
    assert all(float(r["train_disc"]) > 0 and float(r["train_gen_adv"]) > 0 for r in rows[1:])
    state = read_json(tmp_path / "checkpoints" / "last" / "state.json")
    assert state["models"] == ["autoencoder", "discriminator"]
    assert list(read_json(tmp_path / "model" / "model.json")["components"]) == ["autoencoder"]


def test_weights_path_fine_tunes_from_given_weights(prep, full_run, tmp_path):
    config = load_config("tiny")
    weights = full_run / "model" / "autoencoder.safetensors"
    tuned = dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, weights_path=weights),
                                train_autoencoder=dataclasses.replace(config.train_autoencoder, max_steps=1))
    train_autoencoder(tuned, prep, tmp_path, device="cpu", progress=False)
    first_scratch = float(_rows(full_run)[0]["train_l1"])
    first_tuned = float(_rows(tmp_path)[0]["train_l1"])
    assert first_tuned < 0.6 * first_scratch  # the first step already starts from trained weights
    meta = read_json(tmp_path / "model" / "model.json")
    assert meta["extra"]["initialised_from"] == "autoencoder.safetensors"
    assert "weights_path: null" in (tmp_path / "model" / "config.yaml").read_text(encoding="utf-8")


def test_decoder_only_fine_tuning_keeps_the_encoder_and_so_the_latents(prep, full_run, tmp_path):
    """``train_encoder: false``: the saved encoder and latent heads equal the loaded ones bit for bit (a diffusion
    model trained on its latents stays valid), the decoder changes; without loaded weights it is refused."""
    config = load_config("tiny")
    weights = full_run / "model" / "autoencoder.safetensors"
    with pytest.raises(ConfigError, match="train_autoencoder.train_encoder"):
        train_autoencoder(_tiny(train_encoder=False), prep, tmp_path / "no_weights", device="cpu", progress=False)
    tuned = dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, weights_path=weights),
                                train_autoencoder=dataclasses.replace(config.train_autoencoder, max_steps=2,
                                                                      lr=1e-2, train_encoder=False))
    train_autoencoder(tuned, prep, tmp_path / "run", device="cpu", progress=False)
    before, after = load_file(str(weights)), load_file(str(tmp_path / "run" / "model" / "autoencoder.safetensors"))
    assert any(k.startswith(ENCODER_PARTS) for k in before)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(ENCODER_PARTS))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))


def test_weighted_l1_is_the_weighted_mean_of_the_absolute_error():
    from CCELLACore.training.autoencoder_losses import weighted_l1

    target = torch.zeros(1, 1, 2, 1, 1)
    recon = torch.tensor([1.0, 3.0]).reshape(1, 1, 2, 1, 1)
    assert weighted_l1(recon, target).item() == pytest.approx(2.0)
    weight = torch.tensor([1.0, 4.0]).reshape(1, 1, 2, 1, 1)  # gland_weight 3 on the second voxel
    assert weighted_l1(recon, target, weight).item() == pytest.approx((1.0 * 1 + 3.0 * 4) / 5)


def test_gland_weight_reads_each_exams_gland_and_needs_masks(prep, full_run, tmp_path):
    """``gland_weight`` / ``lesion_weight``: every sequence sample carries its exam's own masks, the weighted L1
    changes the training loss from the plain one (same seed, same samples), the card names it; a manifest without
    gland masks is refused naming the key."""
    from CCELLACore.training.autoencoder_data import load_sequence_samples

    studies = read_manifest(prep).studies
    samples, skipped = load_sequence_samples(studies, SEQUENCES, masks=("gland", "lesion"))
    assert not skipped and all(m.shape == samples.images.shape for m in samples.masks.values())
    for k, (case, _) in enumerate(samples.names):
        exam = next(s for s in studies if s.case_id == case).load(masks=True)
        own = torch.from_numpy(exam.masks["gland"].array > 0.5)
        assert torch.equal(samples.masks["gland"][k, 0], own) and own.any() and not own.all()
        lesion = torch.from_numpy(exam.masks["lesion"].array > 0.5)
        assert torch.equal(samples.masks["lesion"][k, 0], lesion)

    train_autoencoder(_tiny(gland_weight=9.0, lesion_weight=20.0, max_steps=2), prep, tmp_path / "gland",
                      device="cpu", progress=False)
    plain, weighted = float(_rows(full_run)[0]["train_l1"]), float(_rows(tmp_path / "gland")[0]["train_l1"])
    assert weighted != pytest.approx(plain, rel=1e-3)
    card = (tmp_path / "gland" / "model" / "README.md").read_text(encoding="utf-8")
    assert "(gland voxels x 10) (lesion voxels + 20)" in card

    bare = write_manifest([dataclasses.replace(s, masks={}) for s in studies], tmp_path / "bare" / "manifest.csv")
    with pytest.raises(ConfigError, match="train_autoencoder.gland_weight"):
        train_autoencoder(_tiny(gland_weight=9.0), bare, tmp_path / "bare_run", device="cpu", progress=False)
