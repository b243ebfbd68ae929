"""ccella preprocess: one resampling onto a gland-centred grid, reference normalisation and its inverse, the batch job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.preprocess import (
    GridConfig,
    PreprocessConfig,
    config_hash,
    denormalize,
    denormalize_array,
    preprocess_exam,
    preprocess_study,
    read_normalization,
    target_grid,
)
from CCELLACore.data.preprocess_batch import preprocess_manifest
from CCELLACore.data.study import Exam, Study
from CCELLACore.data.volume import Volume, read_volume, write_volume
from CCELLACore.errors import DataError

# A small output grid: 48 x 48 x 30 mm around the gland.
GRID = GridConfig(size=(24, 24, 10), spacing=(2.0, 2.0, 3.0))
CONFIG = PreprocessConfig(grid=GRID)

BLOB_LPS = np.array([4.0, -3.0, 2.0])  # world position of the HighB/ADC blob (mm)
GLAND_LPS = np.array([-3.0, 2.0, -1.5])  # world centre of the gland ellipsoid (mm)


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _centered_volume(shape, spacing, direction, center=(0.0, 0.0, 0.0)) -> Volume:
    """An empty volume whose physical centre is ``center``."""
    half = (np.asarray(shape, float) - 1) / 2 * np.asarray(spacing)
    origin = np.asarray(center) - direction @ half
    return Volume(np.zeros(shape, np.float32), spacing, origin, direction)


def _world(vol: Volume) -> np.ndarray:
    """(X, Y, Z, 3) LPS position of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).astype(float)
    return idx @ (vol.direction @ np.diag(vol.spacing)).T + np.asarray(vol.origin)


def _weighted_centroid(vol: Volume, weights: np.ndarray) -> np.ndarray:
    w = weights.astype(float)
    return (_world(vol) * w[..., None]).sum((0, 1, 2)) / w.sum()


def make_exam_volumes(oblique: bool = True, seed: int = 0) -> dict[str, Volume]:
    """AxT2 40x40x12 at 1x1x3 mm; HighB/ADC 20x20x12 at 2x2x3 mm, slightly other direction and origin; masks on AxT2."""
    rng = np.random.default_rng(seed)
    d_t2 = _rotation(20, 10) if oblique else np.eye(3)
    d_dwi = _rotation(25, 8) if oblique else np.eye(3)
    axt2 = _centered_volume((40, 40, 12), (1.0, 1.0, 3.0), d_t2)
    axt2.array = rng.uniform(100, 1000, axt2.shape).astype(np.float32)
    highb = _centered_volume((20, 20, 12), (2.0, 2.0, 3.0), d_dwi, center=(0.7, -0.4, 0.5))
    r2 = ((_world(highb) - BLOB_LPS) ** 2).sum(-1)
    highb.array = (20 + 800 * np.exp(-r2 / (2 * 4.0**2))).astype(np.float32)
    adc = Volume(np.zeros_like(highb.array), highb.spacing, highb.origin, highb.direction)
    adc.array = (2000 - 1200 * np.exp(-r2 / (2 * 4.0**2)) + rng.uniform(0, 100, adc.shape)).astype(np.float32)
    g = _world(axt2) - GLAND_LPS
    inside = (g[..., 0] / 9) ** 2 + (g[..., 1] / 7) ** 2 + (g[..., 2] / 8) ** 2 <= 1
    gland = Volume(np.where(inside, np.where(g[..., 1] > 0, 2, 1), 0).astype(np.uint8), axt2.spacing, axt2.origin,
                   axt2.direction)
    lesion = Volume((((_world(axt2) - BLOB_LPS) ** 2).sum(-1) <= 9).astype(np.uint8), axt2.spacing, axt2.origin,
                    axt2.direction)
    return {"AxT2": axt2, "HighB": highb, "ADC": adc, "gland": gland, "lesion": lesion}


FILES = {"AxT2": "axt2.nii.gz", "HighB": "highb.nii.gz", "ADC": "adc.nii.gz", "gland": "gland.nii.gz",
         "lesion": "lesion.nii.gz"}


def write_study(root: Path, case_id: str, volumes: dict[str, Volume] | None = None, seed: int = 0) -> Study:
    volumes = make_exam_volumes(seed=seed) if volumes is None else volumes
    folder = root / "raw" / case_id
    paths = {k: write_volume(v, folder / FILES[k]) for k, v in volumes.items()}
    return Study(
        case_id=case_id, patient_id=f"p-{case_id}",
        images={k: p for k, p in paths.items() if k in ("AxT2", "HighB", "ADC")},
        masks={k: p for k, p in paths.items() if k in ("gland", "lesion")},
        report="Transition zone nodule, PI-RADS 4.", pirads=4, label=1, label_source="pirads",
    )


def _exam(volumes: dict[str, Volume]) -> Exam:
    return Exam({k: volumes[k] for k in ("AxT2", "HighB", "ADC")}, {k: volumes[k] for k in ("gland", "lesion")}, "c1")


# --- geometry ------------------------------------------------------------------------------------------------------
def test_one_grid_blob_stays_in_place_and_gland_is_centred():
    volumes = make_exam_volumes(oblique=True)
    out, info = preprocess_exam(_exam(volumes), CONFIG)
    out.check_same_space()
    ref = out.reference
    assert ref.shape == GRID.size and np.allclose(ref.spacing, GRID.spacing)
    assert np.allclose(ref.direction, volumes["AxT2"].direction)  # the AxT2 direction is kept
    assert info["center"] == "gland"
    # The blob's world position is unchanged (within one output voxel), in both DWI-derived sequences.
    raw = denormalize(out.volumes["HighB"]).array - 20
    assert np.linalg.norm(_weighted_centroid(ref, np.where(raw > 80, raw, 0)) - BLOB_LPS) < 2.0
    adc_dip = np.clip(2050 - denormalize(out.volumes["ADC"]).array, 0, None) * (out.volumes["ADC"].array > 0)
    assert np.linalg.norm(_weighted_centroid(ref, np.where(adc_dip > 150, adc_dip, 0)) - BLOB_LPS) < 2.0
    # The gland's centroid is the grid centre, in voxels and in world coordinates.
    gland = out.masks["gland"].array
    assert set(np.unique(gland)) == {0, 1, 2} and gland.dtype == np.uint8
    centre_index = np.argwhere(gland > 0).mean(0)
    assert np.all(np.abs(centre_index - (np.asarray(GRID.size) - 1) / 2) < 1.0)
    assert np.linalg.norm(np.asarray(info["center_lps"]) - GLAND_LPS) < 0.5
    # Lesion mask (nearest) still sits on the blob.
    assert np.linalg.norm(_weighted_centroid(ref, out.masks["lesion"].array) - BLOB_LPS) < 2.0


def test_volume_centre_and_zero_outside_field_of_view():
    volumes = make_exam_volumes(oblique=False)
    config = PreprocessConfig(grid=GridConfig((40, 40, 16), (2.0, 2.0, 3.0)), center="volume", normalize=False)
    out, info = preprocess_exam(_exam(volumes), config)
    assert info["center"] == "volume"
    assert np.allclose(info["center_lps"], 0.0, atol=1e-6)  # the AxT2 volume centre
    # 80 x 80 x 48 mm grid around a 40 x 40 x 36 mm AxT2: the border is padding = 0, the middle is data.
    t2 = out.volumes["AxT2"].array
    assert t2[:5].max() == 0 and t2[-5:].max() == 0 and t2[:, :, 0].max() == 0
    assert t2[18:22, 18:22, 6:10].min() >= 100


def test_volume_centre_matches_picai_prep_geometry():
    """picai_prep's Sample (resample to spacing, centre crop/pad, resample to T2) gives the same grid up to half a
    voxel; we interpolate once instead of twice."""
    import SimpleITK as sitk
    from picai_prep.preprocessing import PreprocessingSettings, Sample

    volumes = make_exam_volumes(oblique=False)
    config = PreprocessConfig(grid=GridConfig((24, 24, 10), (2.0, 2.0, 3.0)), center="volume", normalize=False)
    out, _ = preprocess_exam(_exam(volumes), config)
    sample = Sample(
        scans=[volumes["AxT2"].to_sitk(), sitk.Cast(volumes["ADC"].to_sitk(), sitk.sitkFloat32)],
        settings=PreprocessingSettings(matrix_size=(10, 24, 24), spacing=(3.0, 2.0, 2.0)),
    )
    sample.preprocess()
    picai = Volume.from_sitk(sample.scans[0])
    ours = out.volumes["AxT2"]
    assert picai.shape == ours.shape and np.allclose(picai.spacing, ours.spacing)
    assert np.allclose(picai.direction, ours.direction)
    assert np.all(np.abs(np.subtract(picai.origin, ours.origin)) <= np.asarray(ours.spacing) / 2 + 1e-6)


# --- normalisation -------------------------------------------------------------------------------------------------
def test_normalisation_percentiles_window_and_inverse(tmp_path):
    volumes = make_exam_volumes()
    raw, _ = preprocess_exam(_exam(volumes), PreprocessConfig(grid=GRID, normalize=False))
    out, info = preprocess_exam(_exam(volumes), CONFIG)
    for seq in ("AxT2", "HighB"):
        x, r = out.volumes[seq].array, raw.volumes[seq].array.astype(np.float64)
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        rec = read_normalization(out.volumes[seq])
        assert rec.method == "percentile" and rec.sequence == seq
        # Percentile semantics, numerically: bounds are the 0th and 99.5th percentile of the resampled volume.
        assert rec.lower == pytest.approx(np.percentile(r, 0.0)) and rec.upper == pytest.approx(np.percentile(r, 99.5))
        assert np.mean(x == 1.0) == pytest.approx(np.mean(r >= rec.upper), abs=1e-9)
        assert 0.0 < np.mean(x == 1.0) <= 0.006
        assert info["normalization"][seq]["upper"] == rec.upper
    adc = out.volumes["ADC"]
    rec = read_normalization(adc)
    assert (rec.method, rec.lower, rec.upper) == ("window", 0.0, 3000.0)
    assert np.allclose(adc.array, np.clip(raw.volumes["ADC"].array / 3000.0, 0, 1), atol=1e-7)

    # The record survives a NIfTI round trip (descrip) and NRRD (key/value) and inverts the mapping.
    for suffix in (".nii.gz", ".nrrd"):
        for seq in ("AxT2", "ADC"):
            back = denormalize(read_volume(write_volume(out.volumes[seq], tmp_path / f"{seq}{suffix}")))
            r = raw.volumes[seq].array
            if seq == "ADC":  # all values lie inside the window: exact up to float32 rounding
                assert np.allclose(back.array, r, rtol=1e-6, atol=1e-3)
            else:  # exact below the 99.5th percentile, clipped to it above
                upper = read_normalization(out.volumes[seq]).upper
                assert np.allclose(back.array, np.minimum(r, upper), rtol=1e-6, atol=1e-3)
            assert read_normalization(back) is None


def test_denormalize_array_units():
    x = np.array([0.0, 0.25, 1.0], np.float32)
    assert np.allclose(denormalize_array(x, "ADC"), [0.0, 750.0, 3000.0])
    assert np.allclose(denormalize_array(x, "HighB", reference_intensity=400.0), [0.0, 100.0, 400.0])
    with pytest.raises(ValueError, match="reference_intensity"):
        denormalize_array(x, "AxT2")
    with pytest.raises(ValueError, match="no CCELLA normalisation"):
        denormalize(Volume(np.zeros((2, 2, 2))))


def test_bspline_interpolation_never_overshoots():
    volumes = make_exam_volumes()
    out, _ = preprocess_exam(_exam(volumes), PreprocessConfig(grid=GRID, normalize=False, interpolation="bspline"))
    assert out.volumes["ADC"].array.min() >= 0.0
    assert out.volumes["HighB"].array.max() <= volumes["HighB"].array.max() + 1e-3


def test_bad_exams_name_the_file():
    volumes = make_exam_volumes()
    far = volumes["ADC"]
    volumes["ADC"] = Volume(far.array, far.spacing, np.add(far.origin, (500.0, 0, 0)), far.direction)
    with pytest.raises(DataError, match="adc.nii.gz.*no physical overlap"):
        preprocess_exam(_exam(volumes), CONFIG, files={"ADC": Path("adc.nii.gz")})
    volumes = make_exam_volumes()
    volumes["gland"] = volumes["gland"].with_array(np.zeros_like(volumes["gland"].array))
    with pytest.raises(DataError, match="gland.nii.gz: gland mask is empty"):
        preprocess_exam(_exam(volumes), CONFIG, files={"gland": Path("gland.nii.gz")})


# --- one study and the batch ---------------------------------------------------------------------------------------
def test_preprocess_study_writes_files_and_keeps_labels(tmp_path):
    study = write_study(tmp_path, "case1")
    new = preprocess_study(study, CONFIG, tmp_path / "out")
    assert {p.name for p in (*new.images.values(), *new.masks.values())} == set(FILES.values())
    assert (new.report, new.pirads, new.label, new.label_source) == (study.report, 4, 1, study.label_source)
    exam = new.load()
    exam.check_same_space()
    assert exam.reference.shape == GRID.size
    assert read_normalization(exam.volumes["HighB"]).method == "percentile"


def _manifest(tmp_path: Path, studies: list[Study]) -> Path:
    return write_manifest(studies, tmp_path / "in" / "manifest.csv")


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batch_bad_cases_resume_and_config_change(tmp_path):
    good = [write_study(tmp_path, f"good{i}", seed=i) for i in range(2)]
    manifest = _manifest(tmp_path, good)
    out = tmp_path / "out"
    summary = preprocess_manifest(manifest, CONFIG, out, workers=1, progress=False)
    assert summary.done == ["good0", "good1"] and not summary.skipped
    new = read_manifest(out / "manifest.csv")
    assert [s.case_id for s in new.studies] == ["good0", "good1"]
    assert new.studies[0].report == good[0].report and new.studies[0].label == 1
    assert new.studies[0].images["ADC"] == out / "cases" / "good0" / "adc.nii.gz"
    done = json.loads((out / "cases" / "good0" / "done.json").read_text())
    assert done["config_hash"] == config_hash(CONFIG)
    before = _mtimes(out / "cases")

    # Add bad cases: each is skipped with a reason naming the file; the good ones are reused untouched.
    bad = {}
    corrupt = write_study(tmp_path, "corrupt")
    corrupt.images["ADC"].write_bytes(b"not an image at all")
    bad["corrupt"] = "adc.nii.gz"
    v = make_exam_volumes()
    v["HighB"] = v["HighB"].with_array(np.where(v["HighB"].array > 500, np.nan, v["HighB"].array).astype(np.float32))
    bad["nan"] = "NaN"
    nan_study = write_study(tmp_path, "nan", v)
    v = make_exam_volumes()
    v["ADC"] = Volume(v["ADC"].array, v["ADC"].spacing, np.add(v["ADC"].origin, (0, 0, 800.0)), v["ADC"].direction)
    far = write_study(tmp_path, "far", v)
    bad["far"] = "no physical overlap"
    v = make_exam_volumes()
    v["gland"] = v["gland"].with_array(np.zeros_like(v["gland"].array))
    empty = write_study(tmp_path, "emptygland", v)
    bad["emptygland"] = "gland.nii.gz: gland mask is empty"
    v = make_exam_volumes()
    v["AxT2"] = Volume(v["AxT2"].array[:, :, :1], v["AxT2"].spacing, v["AxT2"].origin, v["AxT2"].direction)
    flat = write_study(tmp_path, "flat", v)
    bad["flat"] = "axt2.nii.gz"
    missing = write_study(tmp_path, "nohighb")
    missing.images.pop("HighB")
    bad["nohighb"] = "no HighB image"
    gone = write_study(tmp_path, "gone")
    os.remove(gone.images["AxT2"])
    bad["gone"] = "axt2.nii.gz: file not found"
    studies = [good[0], corrupt, nan_study, far, empty, flat, missing, gone, good[1]]
    manifest = _manifest(tmp_path, studies)
    summary = preprocess_manifest(manifest, CONFIG, out, workers=1, progress=False)
    assert summary.reused == ["good0", "good1"] and summary.done == []
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert set(reasons) == set(bad)
    for case_id, text in bad.items():
        assert text in reasons[case_id], (case_id, reasons[case_id])
    assert {k: t for k, t in _mtimes(out / "cases").items() if k.startswith("good")} == before
    saved = json.loads((out / "preprocess_summary.json").read_text())
    assert saved["n_skipped"] == len(bad) and saved["n_reused"] == 2
    assert [s.case_id for s in read_manifest(out / "manifest.csv").studies] == ["good0", "good1"]

    # --allow-missing processes the study without HighB, with what it has.
    summary = preprocess_manifest(manifest, CONFIG, out, workers=1, progress=False, allow_missing=True)
    assert summary.done == ["nohighb"]
    assert sorted(p.name for p in (out / "cases" / "nohighb").iterdir()) == sorted(
        ["axt2.nii.gz", "adc.nii.gz", "gland.nii.gz", "lesion.nii.gz", "done.json"])

    # A changed config invalidates the finished cases.
    changed = PreprocessConfig(grid=GRID, upper_percentile=99.0)
    summary = preprocess_manifest(_manifest(tmp_path, good), changed, out, workers=1, progress=False)
    assert summary.done == ["good0", "good1"] and summary.reused == []
    assert json.loads((out / "cases" / "good0" / "done.json").read_text())["config_hash"] == config_hash(changed)
    assert read_normalization(read_volume(out / "cases" / "good0" / "axt2.nii.gz")).upper < done["normalization"][
        "AxT2"]["upper"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    studies = [write_study(tmp_path, f"c{i}", seed=i) for i in range(3)]
    manifest = _manifest(tmp_path, studies)
    preprocess_manifest(manifest, CONFIG, tmp_path / "w1", workers=1, progress=False)
    preprocess_manifest(manifest, CONFIG, tmp_path / "w2", workers=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1" / "cases").rglob("*.nii.gz"))
    assert len(files) == 15
    for rel in files:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel
    assert (tmp_path / "w1" / "manifest.csv").read_text() == (tmp_path / "w2" / "manifest.csv").read_text()


def test_cli_tiny_classifier(tmp_path, capsys):
    from CCELLACore.cli import main

    manifest = _manifest(tmp_path, [write_study(tmp_path, "c1")])
    rc = main(["preprocess", "--manifest", str(manifest), "--config", "tiny", "--target", "classifier",
               "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert rc == 0
    vol = read_volume(tmp_path / "out" / "cases" / "c1" / "axt2.nii.gz")
    assert vol.shape == (32, 32, 8) and np.allclose(vol.spacing, (4.0, 4.0, 12.0))
    assert read_normalization(vol) is None and vol.array.max() > 100  # classifier: not normalised
    summary = json.loads((tmp_path / "out" / "preprocess_summary.json").read_text())
    assert summary["target"] == "classifier" and summary["config_name"] == "tiny" and summary["n_done"] == 1


def test_target_grid_default_is_axt2_centre():
    axt2 = _centered_volume((40, 40, 12), (1.0, 1.0, 3.0), _rotation(30, 0), center=(5.0, -2.0, 7.0))
    grid = target_grid(axt2, GridConfig((8, 8, 4), (3.0, 3.0, 3.0)))
    centre = grid.affine_lps @ np.array([3.5, 3.5, 1.5, 1.0])
    assert np.allclose(centre[:3], (5.0, -2.0, 7.0)) and np.allclose(grid.direction, axt2.direction)


def test_case_folder_names_are_safe_and_distinct():
    from CCELLACore.data.preprocess import case_folder_name

    assert case_folder_name("10001_1000001") == "10001_1000001"
    names = {case_folder_name(c) for c in ("a/b", "a_b", "../x", "a b")}
    assert len(names) == 4 and all("/" not in n and not n.startswith(".") for n in names)


def test_gland_masks_from_a_folder_and_a_warning_naming_unmasked_cases(tmp_path, caplog):
    """PI-CAI layout: one binary whole-gland mask per case, named by case id; a case without one is centred on the
    image and named in one warning."""
    from CCELLACore.cli import main

    studies = [write_study(tmp_path, name, seed=i) for i, name in enumerate(("10001_1000001", "10002_1000002"))]
    masks = tmp_path / "whole_gland" / "AI" / "Bosma22b"
    gland = read_volume(studies[0].masks["gland"])
    write_volume(gland.with_array((gland.array > 0).astype(np.uint8)), masks / "10001_1000001.nii.gz")
    for study in studies:
        study.masks.pop("gland")
    manifest = _manifest(tmp_path, studies)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="CCELLACore"):
        summary = preprocess_manifest(manifest, CONFIG, out, workers=1, progress=False, masks_dir=masks)
    assert summary.details["centered_on"] == {"gland": 1, "volume": 1}
    assert summary.details["no_gland_mask"] == ["10002_1000002"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "10002_1000002" in warnings[0] and "10001_1000001" not in warnings[0]
    done = json.loads((out / "cases" / "10001_1000001" / "done.json").read_text())
    assert done["center"] == "gland" and "gland" in done["files"]
    new = read_manifest(out / "manifest.csv").by_case()
    def grid_centre(case_id):
        axt2 = read_volume(new[case_id].images["AxT2"])
        return (axt2.affine_lps @ np.append((np.asarray(axt2.shape, float) - 1) / 2, 1.0))[:3]

    np.testing.assert_allclose(grid_centre("10001_1000001"), GLAND_LPS, atol=0.6)  # on the gland
    np.testing.assert_allclose(grid_centre("10002_1000002"), 0.0, atol=1e-3)  # on the AxT2 volume's centre
    assert "gland" not in new["10002_1000002"].masks
    assert main(["preprocess", "--manifest", str(manifest), "--config", "tiny", "--out", str(tmp_path / "cli"),
                 "--workers", "1", "--masks", str(masks), "--no-progress"]) == 0
    with pytest.raises(DataError, match="masks folder not found"):
        preprocess_manifest(manifest, CONFIG, out, workers=1, progress=False, masks_dir=tmp_path / "nowhere")
