"""``ccella train-classifier`` and ``ccella classify`` on tiny phantom exams (32 x 32 x 32 classifier grid): a run
killed with SIGKILL and started again ends with the same bytes as an uninterrupted one, the model directory
describes itself, classify resamples exams of another geometry and writes the saliency map on the AxT2 input's grid,
fine-tuning starts from the given model, and bad inputs give errors naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.classifier.classify import classify_files
from CCELLACore.classifier.config import load_classifier_config
from CCELLACore.classifier.model import export_half, load_classifier_dir
from CCELLACore.classifier.train import train_classifier
from CCELLACore.cli import main
from CCELLACore.data.phantoms import generate_phantom
from CCELLACore.data.volume import Volume, read_volume, write_volume
from CCELLACore.errors import CCELLAError, DataError
from CCELLACore.fileio import read_json
from CCELLACore.models.serialization import model_hash

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3  # classifier_tiny.yaml: checkpoint every epoch, validation at epochs 2 and 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the subprocesses below (OMP_NUM_THREADS=1): same kernels, same bytes; no oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 institution-1 phantom exams (AxT2 32 x 32 x 24 at 4 mm), split per patient by `ccella split`."""
    root = tmp_path_factory.mktemp("cls_data")
    assert main(["phantoms", "--institution", "1", "--n", "16", "--size", "32", "32", "24", "--spacing", "4", "4", "4",
                 "--seed", "0", "--out", str(root / "phantoms"), "--layouts", "none", "--no-progress"]) == 0
    assert main(["split", "--manifest", str(root / "phantoms" / "manifest.csv"), "--out", str(root / "split.csv"),
                 "--overwrite"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (in this process); returns its run folder."""
    out = tmp_path_factory.mktemp("cls_full")
    train_classifier(load_classifier_config("tiny"), data / "split.csv", out, device="cpu", progress=False)
    return out


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "CCELLACore.cli", "train-classifier", "--config", "tiny", "--manifest",
            str(data / "split.csv"), "--out", str(out), "--device", "cpu", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_model_directory_describes_itself(trained, data):
    model = trained / "model"
    meta = read_json(model / "model.json")
    extra = meta["extra"]
    assert extra["kind"] == "cspca-classifier" and extra["epochs"] == EPOCHS
    assert meta["sequences"] == ["AxT2", "HighB", "ADC"] and meta["grid_size"] == [32, 32, 32]
    assert meta["model_hash"] == model_hash(model)
    train_data = extra["training_data"]
    assert train_data["n"] + extra["validation_data"]["n"] <= 16 and train_data["n_pos"] + train_data["n_neg"] == train_data["n"]
    assert extra["validation_data"]["n"] >= 1
    assert extra["selected"] in ("best validation AP", "last epoch")
    card = (model / "README.md").read_text(encoding="utf-8")
    assert "EfficientNetBN efficientnet-b0" in card and "CPU" in card
    loaded = load_classifier_dir(model)
    assert loaded.sequences == ("AxT2", "HighB", "ADC") and tuple(loaded.preprocess.grid.size) == (32, 32, 32)
    rows = (trained / "metrics.csv").read_text(encoding="utf-8").splitlines()
    header = rows[0].split(",")
    assert {"train_loss", "lr", "val_ap", "val_auc", "epoch"} <= set(header)
    lrs = [float(r.split(",")[header.index("lr")]) for r in rows[1:] if r.split(",")[header.index("lr")]]
    cfg = load_classifier_config("tiny").train
    total = len(lrs)
    np.testing.assert_allclose(lrs, [cfg.lr * (1 - s / total) ** 2 for s in range(total)], rtol=1e-9)


def test_sigkill_between_checkpoints_then_resume_gives_the_same_bytes(data, trained, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and read_json(state)["epoch"] >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()
    killed_at = read_json(state)["epoch"]
    assert 1 <= killed_at < EPOCHS

    result = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("checkpoints/last/models.safetensors",):
        assert (out / name).read_bytes() == (trained / name).read_bytes(), name
    resumed, uninterrupted = (load_file(str(run / "model" / "classifier.safetensors")) for run in (out, trained))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert read_json(out / "model" / "model.json")["model_hash"] == read_json(trained / "model" / "model.json")["model_hash"]
    # the steps redone after the kill replace the killed run's rows: the CSV reads as one run
    assert (out / "metrics.csv").read_text() == (trained / "metrics.csv").read_text()


def _inst2_exam(tmp_path: Path) -> dict[str, Path]:
    """An institution-2 exam: another size, spacing and an oblique direction; HighB/ADC on their own grids."""
    case = generate_phantom(3, 2, seed=5)
    files = {}
    for seq, vol in case.exam.volumes.items():
        files[seq] = write_volume(vol, tmp_path / "inst2" / f"{seq.lower()}.nii.gz")
    return files


def test_classify_other_geometry_writes_saliency_on_the_axt2_grid(trained, tmp_path):
    files = _inst2_exam(tmp_path)
    axt2 = read_volume(files["AxT2"])
    assert axt2.shape != (32, 32, 32) and not np.allclose(axt2.direction, np.eye(3))
    assert main(["classify", "--model", str(trained / "model"), "--study", str(tmp_path / "inst2"),
                 "--out", str(tmp_path / "res"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "res" / "classification.json").read_text())
    assert 0.0 <= result["probability"] <= 1.0
    assert result["model"]["hash"] == model_hash(trained / "model")
    assert result["inputs"] == {"AxT2": "axt2.nii.gz", "HighB": "highb.nii.gz", "ADC": "adc.nii.gz"}
    saliency = read_volume(tmp_path / "res" / "saliency.nii.gz")
    assert saliency.same_grid(axt2)
    assert saliency.array.min() >= 0.0 and saliency.array.max() <= 1.0 and saliency.array.max() > 0.0
    # same probability through the Python API with the three files given one by one
    model = load_classifier_dir(trained / "model")
    again = classify_files(model, files, tmp_path / "res2", saliency=False)
    assert again["probability"] == pytest.approx(result["probability"], abs=1e-6)
    assert not (tmp_path / "res2" / "saliency.nii.gz").exists()
    # the float16 export (how the demo classifier ships) loads into the float32 network and agrees
    half = export_half(trained / "model", tmp_path / "half")
    assert (half / "classifier.safetensors").stat().st_size < 0.55 * (trained / "model" / "classifier.safetensors").stat().st_size
    third = classify_files(load_classifier_dir(half), files, tmp_path / "res3", saliency=False)
    assert third["probability"] == pytest.approx(result["probability"], abs=0.02)
    assert third["model"]["hash"] == model_hash(half) != result["model"]["hash"]


def test_bad_inputs_give_errors_naming_the_file(trained, tmp_path, capsys):
    files = _inst2_exam(tmp_path)
    model = load_classifier_dir(trained / "model")
    with pytest.raises(DataError, match="HighB"):
        classify_files(model, {"AxT2": files["AxT2"], "ADC": files["ADC"]}, tmp_path / "o1")
    # an ADC map 500 mm away from the AxT2 volume: mismatched geometry
    adc = read_volume(files["ADC"])
    far = Volume(adc.array, adc.spacing, tuple(np.asarray(adc.origin) + 500.0), adc.direction)
    far_path = write_volume(far, tmp_path / "far" / "adc_far.nii.gz")
    with pytest.raises(DataError, match=r"adc_far\.nii\.gz.*no physical overlap"):
        classify_files(model, {**files, "ADC": far_path}, tmp_path / "o2")
    # NaN voxels
    hb = read_volume(files["HighB"])
    bad = hb.array.copy()
    bad[3, 3, 3] = np.nan
    nan_path = write_volume(hb.with_array(bad), tmp_path / "nan" / "highb_nan.nii.gz")
    assert main(["classify", "--model", str(trained / "model"), "--axt2", str(files["AxT2"]), "--highb",
                 str(nan_path), "--adc", str(files["ADC"]), "--out", str(tmp_path / "o3")]) == 1
    err = capsys.readouterr().err
    assert "highb_nan.nii.gz" in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "o3" / "classification.json").exists()
    # not a classifier
    with pytest.raises(CCELLAError, match="not found|config.yaml"):
        load_classifier_dir(tmp_path / "nowhere")


def test_fine_tuning_starts_from_the_given_model(data, trained, tmp_path):
    config = load_classifier_config("tiny")
    with pytest.raises(CCELLAError, match="AxT2"):
        train_classifier(config, data / "split.csv", tmp_path / "bad", init=trained / "model", sequences=("AxT2",),
                         device="cpu", progress=False)
    out = train_classifier(config, data / "split.csv", tmp_path / "ft", init=trained / "model", institution=1,
                           device="cpu", progress=False)
    meta = read_json(out / "model.json")["extra"]
    assert meta["initialised_from"]["model_hash"] == model_hash(trained / "model")
    assert meta["epochs"] == config.train.finetune_epochs and meta["lr"] == config.train.finetune_lr
    assert meta["training_data"]["institution"] == "1"
    with pytest.raises(DataError, match="institution 2"):
        train_classifier(config, data / "split.csv", tmp_path / "none", institution=2, device="cpu", progress=False)


def test_the_shipped_demo_classifier_classifies_out_of_the_box(tmp_path):
    """No --model: classify uses CCELLACore/demo_classifier (at most 10 MB, float16), on an exam of another geometry."""
    from CCELLACore.classifier.classify_cli import DEFAULT_MODEL

    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) < 10 * 2**20
    files = _inst2_exam(tmp_path)
    assert main(["classify", "--study", str(tmp_path / "inst2"), "--out", str(tmp_path / "res"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "res" / "classification.json").read_text())
    assert 0.0 <= result["probability"] <= 1.0
    assert result["model"]["name"] == "ccella-demo-classifier"
    assert result["model"]["hash"] == model_hash(DEFAULT_MODEL)
    assert read_volume(tmp_path / "res" / "saliency.nii.gz").same_grid(read_volume(files["AxT2"]))
