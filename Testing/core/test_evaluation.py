"""``ccella evaluate`` on tiny phantom sets (32 x 32 x 16 at 4 mm), with a briefly trained phantom classifier's features
as the named stand-in backbone: identical sets give FID and KID of about 0, a set of the other phantom institution
scores worse than one of the same institution, the audit flags a planted copy of a training exam and no independent
phantom, the bootstrap intervals contain their estimates, and the published backbones load from local files of
their real layouts (written here with random weights, never used for a report)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.errors import CCELLAError
from CCELLACore.evaluation.backbones import (load_classifier_standin, load_medicalnet, load_radimagenet,
                                             medicalnet_network, radimagenet_network, sha256_file)
from CCELLACore.evaluation.diversity import ms_ssim_diversity, ms_ssim_settings
from CCELLACore.evaluation.features import exam_features
from CCELLACore.evaluation.stats import fid, kid

N = 10  # exams per set of the eval_sets fixture (conftest.py)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module: the CLI run reuses the features of the first test."""
    return tmp_path_factory.mktemp("feature_cache")


def _rows(features: list[dict]) -> np.ndarray:
    return np.concatenate([f["bpMRI"] for f in features]).astype(np.float64)


def test_identical_sets_score_zero_and_the_other_institution_scores_worse(eval_sets, standin, cache):
    backbone = load_classifier_standin(standin)
    feats = {name: exam_features(backbone, read_manifest(path).studies, cache, progress=False)[0]
             for name, path in eval_sets.items()}
    real, same, shifted = (_rows(feats[k]) for k in ("real", "same", "shifted"))
    assert real.shape[0] == N and np.isfinite(real).all()
    fids = {"identical": fid(real, real), "same": fid(real, same), "shifted": fid(real, shifted)}
    kids = {"identical": kid(real, real), "same": kid(real, same), "shifted": kid(real, shifted)}
    print("stand-in FID", fids, "KID", kids)
    assert fids["identical"] < 1e-9 * fids["same"] + 1e-12
    assert fids["same"] < fids["shifted"] and kids["same"] < kids["shifted"]
    assert abs(kids["identical"]) < kids["shifted"]
    # The unbiased KID of a set with itself is -O(1/n) noise: with many rows it is ~0 against a real shift.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32))
    assert abs(kid(x, x)) < 0.05 * kid(x, x + 0.5)
    # Cached features resume: a second pass reads the same numbers without touching the cache files.
    cache_files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")}
    assert len(cache_files) == 3 * N
    again = exam_features(backbone, read_manifest(eval_sets["real"]).studies, cache, progress=False)[0]
    assert np.array_equal(_rows(again), real)
    assert all(p.stat().st_mtime_ns == t for p, t in cache_files.items())


def test_evaluate_writes_the_report_and_the_audit_flags_only_the_planted_copy(eval_sets, standin, cache, tmp_path):
    real = read_manifest(eval_sets["real"]).studies
    copied = next(s for s in real if s.split == "train")
    planted = dataclasses.replace(copied, case_id="planted_copy", patient_id="planted")
    synthetic = write_manifest(read_manifest(eval_sets["same"]).studies + [planted],
                               tmp_path / "synthetic" / "manifest.csv")
    shutil.copy(eval_sets["same"].parent / "truth.json", synthetic.parent / "truth.json")  # the phantom reports' truth
    out = tmp_path / "eval"
    assert main(["evaluate", "--real", str(eval_sets["real"]), "--synthetic", str(synthetic), "--out", str(out),
                 "--standin", str(standin), "--classifier", str(standin), "--bootstrap", "20", "--kid-subsets", "5",
                 "--diversity-exams", "4", "--device", "cpu", "--cache", str(cache), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    report = (out / "report.md").read_text(encoding="utf-8")

    for key in ("medicalnet_3d", "radimagenet_2_5d"):  # no weights file: unavailable, with the reason
        assert metrics["fidelity"][key]["available"] is False and "not computed" in metrics["fidelity"][key]["reason"]
    stand = metrics["fidelity"]["standin"]
    assert stand["backbone"]["weights_sha256"] == sha256_file(standin / "classifier.safetensors")
    assert "STAND-IN" in stand["label"] and stand["label"] in report and "unavailable" in report
    for name in ("fid", "kid"):
        m = stand["per_key"]["bpMRI"][name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["ci_low"] < m["ci_high"] and m["n_bootstrap"] >= 15
        assert m["n_real"] == N and m["n_synthetic"] == N + 1

    audit = metrics["memorisation"]
    assert [r["case_id"] for r in audit["possible_copies"]] == ["planted_copy"]
    assert audit["possible_copies"][0]["nearest_train_case"] == copied.case_id
    assert audit["possible_copies"][0]["distance"] < 1e-6 and audit["threshold"] > 0.1
    assert "1 possible copies" in report

    for name in ("AxT2", "HighB", "ADC"):
        d = metrics["diversity"][name]
        assert 0 < d["synthetic"]["mean"] < 1 and d["synthetic"]["n_pairs"] == 6
    rows = {(r["set"], r["sequence"]) for r in metrics["intensity"]}
    assert {("real", "ADC"), ("synthetic", "AxT2")} <= rows
    assert metrics["faithfulness"]["classifier"]["n"] == N + 1
    lesions = metrics["faithfulness"]["phantom_lesions"]
    assert lesions["n"] == N and sum(g["lesion_found"]["n"] for g in lesions["groups"].values()) == N
    for figure in ("montage.png", "histograms.png", "fid_standin.png"):
        assert (out / "figures" / figure).stat().st_size > 1000 and f"figures/{figure}" in report


def test_published_backbones_load_from_local_files_with_or_without_module_prefixes(tmp_path):
    from CCELLACore.data.study import Exam
    from CCELLACore.data.volume import Volume

    torch.manual_seed(0)
    medicalnet = {f"module.{k}": v.half() for k, v in medicalnet_network().resnet.state_dict().items()}
    torch.save({"state_dict": medicalnet}, tmp_path / "resnet_50_23dataset.pth")
    torch.save({k: v.half() for k, v in radimagenet_network().state_dict().items()}, tmp_path / "radimagenet.pth")
    array = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32)
    array[:, :, -2:] = 0  # padding: empty axial slices
    exam = Exam({"AxT2": Volume(array, spacing=(4.0, 4.0, 4.0))}, case_id="tiny")

    three_d = load_medicalnet(tmp_path / "resnet_50_23dataset.pth")
    assert three_d.weights_sha256 == sha256_file(tmp_path / "resnet_50_23dataset.pth")
    assert three_d.extract(exam)["AxT2"].shape == (1, 2048)
    net = medicalnet_network()  # MedicalNet's geometry: output stride 8 (dilated layer3/4), not MONAI's 32
    assert net(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 2048, 4, 4, 2)

    two_d = load_radimagenet(tmp_path / "radimagenet.pth", max_slices=8)
    features = two_d.extract(exam)
    assert set(features) == {"AxT2/sagittal", "AxT2/coronal", "AxT2/axial"}
    assert features["AxT2/axial"].shape == (8, 2048) and features["AxT2/sagittal"].shape == (8, 2048)
    assert "STAND-IN" not in two_d.label and two_d.weights_sha256[:12] in two_d.label

    with pytest.raises(CCELLAError, match="radimagenet.pth: not the expected ResNet-50 layout"):
        load_medicalnet(tmp_path / "radimagenet.pth")
    with pytest.raises(CCELLAError, match="missing.pth: weights file not found"):
        load_radimagenet(tmp_path / "missing.pth")


def test_ms_ssim_adapts_its_scales_to_small_volumes():
    assert len(ms_ssim_settings((256, 256, 128))["weights"]) == 5
    small = ms_ssim_settings((32, 32, 16))
    assert len(small["weights"]) == 2 and abs(sum(small["weights"]) - 1) < 1e-9
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings((6, 6, 6))
    volume = np.random.default_rng(1).random((32, 32, 16)).astype(np.float32)
    same = ms_ssim_diversity([volume, volume.copy()])
    assert same["n_pairs"] == 1 and abs(same["mean"] - 1) < 1e-4


def test_synthesize_audit_writes_the_audit_of_what_it_wrote(data, trained, tmp_path):
    out = tmp_path / "synth"
    assert main(["synthesize", "--manifest", str(data / "prep" / "manifest.csv"), "--model", str(trained), "--out",
                 str(out), "--steps", "2", "--splits", "val", "test", "--no-progress", "--audit"]) == 0
    audit = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert len(audit["synthetic"]) == len(read_manifest(out / "manifest.csv").studies) >= 1
    assert audit["possible_copies"] == [] and audit["n_train"] >= 2


def test_evaluate_against_real_exams_of_one_split_only(eval_sets, standin, cache, tmp_path):
    """Real exams all of one split (e.g. a test set alone): the audit takes them all as the training yardstick
    (leave one patient out) instead of failing on an empty held-out part (found by running `ccella evaluate`
    against a test split)."""
    real = [dataclasses.replace(s, split="test") for s in read_manifest(eval_sets["real"]).studies]
    manifest = write_manifest(real, tmp_path / "real_test" / "manifest.csv")
    out = tmp_path / "eval"
    assert main(["evaluate", "--real", str(manifest), "--synthetic", str(eval_sets["same"]), "--out", str(out),
                 "--standin", str(standin), "--bootstrap", "20", "--kid-subsets", "5", "--diversity-exams", "4",
                 "--device", "cpu", "--cache", str(cache), "--no-progress"]) == 0
    audit = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["memorisation"]
    assert "leave one patient out" in audit["yardstick"]["kind"]
    assert len(audit["synthetic"]) == len(read_manifest(eval_sets["same"]).studies)


def test_fid_equals_monai_where_monai_works_and_stays_exact_where_it_raises():
    """Full-rank covariances: the value of MONAI's FIDMetric. Two 40-exam sets of low-rank features with different
    covariances (as the demo's stand-in features of real and generated exams): MONAI's SciPy sqrtm raises on some
    ("Imaginary component ... too high"); this gives the exact value, checked against the eigenvalues of the
    covariance product."""
    import warnings

    import torch
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(300, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy 1.17 warns about MONAI's `disp` argument
        monai_value = float(FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert fid(a, b) == pytest.approx(monai_value, rel=1e-6)

    # Whether SciPy's sqrtm raises on a given low-rank pair depends on the BLAS kernels (OpenBLAS core type): so
    # ten pairs, MONAI must raise on at least one, and ours must be exact on every one.
    raised = 0
    for seed in range(9, 14):
        for decay in (-4, -6):
            rng = np.random.default_rng(seed)
            mixing = [rng.normal(size=(60, 300)) * np.logspace(0, decay, 60)[:, None] for _ in range(2)]
            x, y = (50 * rng.normal(size=(40, 60)) @ m for m in mixing)
            y = y + 20
            basis, _ = np.linalg.qr(np.concatenate([x, y]).T)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    FIDMetric()(torch.from_numpy(y @ basis), torch.from_numpy(x @ basis))
            except ValueError as exc:
                assert "Imaginary component" in str(exc)
                raised += 1
            cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
            cross = np.sqrt(np.clip(np.linalg.eigvals(cov_x @ cov_y).real, 0, None)).sum()
            expected = float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cov_x) + np.trace(cov_y) - 2 * cross)
            assert fid(x, y) == pytest.approx(expected, rel=1e-6)
            assert 0 <= fid(x, x[::-1]) < 1e-6 * fid(x, y)
    assert raised >= 1
