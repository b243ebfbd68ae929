"""Data layouts: export -> import round trips, detection, bad input reported per case, and ``ccella import``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CCELLACore.cli import main as ccella_main
from CCELLACore.data.layouts import LAYOUTS, detect_layout, export_layout, import_layout
from CCELLACore.data.manifest import read_manifest
from CCELLACore.data.study import LabelSource, Study
from CCELLACore.data.volume import Volume, read_volume, resample_to_grid, write_volume
from CCELLACore.errors import DataError, ManifestError

# A rotated, offset AxT2 grid so that geometry mistakes (axis order, LPS/RAS) show up.
_ANGLE = np.deg2rad(10)
_DIRECTION = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0], [np.sin(_ANGLE), np.cos(_ANGLE), 0], [0, 0, 1]])
_T2_SPACING = (0.8, 0.8, 1.5)
_ORIGIN = (-6.0, 4.0, 10.0)


def _make_study(root: Path, case_id: str, patient_id: str, *, seed: int, split: str = "train", label: int | None = 1,
                source: LabelSource = LabelSource.PIRADS, report: str = "", isup: int | None = None,
                institution: str = "1", study_id: str = "", masks: bool = True) -> Study:
    """A tiny 16x16x8 study; ADC on a coarser 8x8x8 grid covering the same field of view (not co-registered)."""
    rng = np.random.default_rng(seed)
    folder = root / "src" / case_id
    axt2 = Volume(rng.uniform(0, 500, (16, 16, 8)).astype(np.float32), _T2_SPACING, _ORIGIN, _DIRECTION)
    highb = axt2.with_array(rng.uniform(0, 80, (16, 16, 8)).astype(np.float32))
    # Smooth ADC so that resampling it is checked against a meaningful reference.
    x, y, z = np.meshgrid(np.arange(8), np.arange(8), np.arange(8), indexing="ij")
    adc = Volume((800 + 60 * x + 30 * y + 10 * z + seed).astype(np.float32), (1.6, 1.6, 1.5), _ORIGIN, _DIRECTION)
    paths = {}
    for name, vol in (("AxT2", axt2), ("HighB", highb), ("ADC", adc)):
        paths[name] = write_volume(vol, folder / f"{name}.nii.gz")
    mask_paths = {}
    if masks:
        gland = np.zeros((16, 16, 8), np.uint8)
        gland[4:12, 4:12, 2:6] = 1
        gland[4:12, 4:7, 2:6] = 2
        lesion = np.zeros((16, 16, 8), np.uint8)
        lesion[6:9, 6:9, 3:5] = 1
        mask_paths["gland"] = write_volume(axt2.with_array(gland), folder / "gland.nii.gz")
        mask_paths["lesion"] = write_volume(axt2.with_array(lesion), folder / "lesion.nii.gz")
    return Study(case_id=case_id, patient_id=patient_id, study_id=study_id, images=paths, institution=institution,
                 split=split, masks=mask_paths, report=report, isup=isup, label=label, label_source=source)


def _assert_same_image(a: Path, b: Path) -> None:
    va, vb = read_volume(a), read_volume(b)
    assert va.same_grid(vb, atol=1e-4), (va, vb)
    np.testing.assert_allclose(va.array, vb.array, rtol=1e-6, atol=1e-4)


# --- round trips --------------------------------------------------------------------------------------------------
def test_authors_json_round_trip_resamples_onto_axt2_grid(tmp_path):
    reports = ["Lesion in the left PZ, PI-RADS 4; ADC 650 µm²/s.", ""]
    studies = [
        _make_study(tmp_path, "p01", "p01", seed=1, split="train", label=1, report=reports[0], institution="1"),
        _make_study(tmp_path, "p02", "p02", seed=2, split="test", label=0, report=reports[1], institution="2"),
    ]
    root = export_layout(studies, "authors_json", tmp_path / "authors")
    entries = json.loads((root / "train.json").read_text())
    assert entries[0]["folder"] == "p01" and entries[0]["pirads"] == [0, 1] and entries[0]["dataset"] == "Institute1"
    assert entries[0]["spacing"] == pytest.approx(list(_T2_SPACING)) and entries[0]["text_isnull"] == 0
    assert json.loads((root / "test.json").read_text())[0]["text_isnull"] == 1

    assert detect_layout(root) == "authors_json"
    imported, summary = import_layout(root)
    assert summary.skipped == [] and summary.details["warnings"] == []
    by_case = {s.case_id: s for s in imported}
    for original in studies:
        got = by_case[original.case_id]
        assert (got.patient_id, got.split, got.label, got.report, got.institution) == (
            original.patient_id, original.split, original.label, original.report, original.institution)
        assert got.label_source == LabelSource.PIRADS and got.pirads is None
        _assert_same_image(got.images["AxT2"], original.images["AxT2"])
        _assert_same_image(got.images["HighB"], original.images["HighB"])
        # ADC was on its own grid: now on AxT2's, equal to a linear resampling of the original.
        t2 = read_volume(original.images["AxT2"])
        adc = read_volume(got.images["ADC"])
        assert adc.same_grid(t2, atol=1e-4)
        expected = resample_to_grid(read_volume(original.images["ADC"]), t2).array
        np.testing.assert_allclose(adc.array, expected, atol=1e-2)
        assert got.load().same_space()  # masks written beside the volumes are found and share the grid
        np.testing.assert_array_equal(read_volume(got.masks["gland"]).array, read_volume(original.masks["gland"]).array)
    assert summary.details["per_label_source"] == {"pirads": 2}


def test_authors_json_names_folders_of_patients_with_several_studies(tmp_path):
    studies = [
        _make_study(tmp_path, "p05_a", "p05", seed=5, study_id="a", masks=False),
        _make_study(tmp_path, "p05_b", "p05", seed=6, study_id="b", masks=False),
    ]
    root = export_layout(studies, "authors_json", tmp_path / "authors")
    assert sorted(e["folder"] for e in json.loads((root / "train.json").read_text())) == ["p05_a", "p05_b"]
    unlabelled = _make_study(tmp_path, "p06", "p06", seed=7, label=None, source=LabelSource.NONE, masks=False)
    with pytest.raises(DataError, match="p06"):
        export_layout([unlabelled], "authors_json", tmp_path / "authors2")


def test_picai_round_trip_with_several_studies_per_patient(tmp_path):
    studies = [
        _make_study(tmp_path, "10001_1000001", "10001", seed=1, study_id="1000001", isup=3, label=1,
                    source=LabelSource.HISTOPATHOLOGY, institution="2", split=""),
        _make_study(tmp_path, "10001_1000002", "10001", seed=2, study_id="1000002", isup=1, label=0,
                    source=LabelSource.HISTOPATHOLOGY, institution="2", split=""),
        _make_study(tmp_path, "10002_1000003", "10002", seed=3, isup=None, label=0, source=LabelSource.PIRADS,
                    institution="2", split="", masks=False),  # study id from the case id
    ]
    root = export_layout(studies, "picai", tmp_path / "picai")
    assert detect_layout(root) == "picai"
    t2w = list(root.glob("picai_public_images_fold*/10001/10001_1000001_t2w.mha"))
    assert len(t2w) == 1
    with open(root / "picai_labels/clinical_information/marksheet.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["case_csPCa"] == "YES" and rows[0]["case_ISUP"] == "3" and rows[2]["case_ISUP"] == ""

    imported, summary = import_layout(root)
    assert summary.skipped == []
    by_case = {s.case_id: s for s in imported}
    assert sorted(by_case) == sorted(s.case_id for s in studies)
    for original in studies:
        got = by_case[original.case_id]
        assert (got.patient_id, got.label, got.label_source, got.isup, got.report, got.institution) == (
            original.patient_id, original.label, original.label_source, original.isup, "", "2")
        assert got.images["AxT2"].suffix == ".mha"
        assert "qform_code" not in read_volume(got.images["AxT2"]).metadata  # NIfTI header fields not carried over
        for seq in ("AxT2", "HighB", "ADC"):  # NIfTI -> MHA keeps voxels and geometry (ADC keeps its own grid)
            _assert_same_image(got.images[seq], original.images[seq])
    assert by_case["10002_1000003"].study_id == "1000003" and by_case["10002_1000003"].masks == {}
    gland = read_volume(by_case["10001_1000001"].masks["gland"]).array
    np.testing.assert_array_equal(gland, read_volume(studies[0].masks["gland"]).array > 0)  # PI-CAI glands are binary
    assert "human_expert" in str(by_case["10001_1000001"].masks["lesion"])
    assert summary.details["n_patients"] == 2 and summary.details["n_patients_with_several_studies"] == 1
    assert summary.details["per_label_source"] == {"histopathology": 2, "pirads": 1}


def test_prostate158_round_trip(tmp_path):
    studies = [
        _make_study(tmp_path, "001", "001", seed=1, split="train", label=1, source=LabelSource.ANNOTATION, institution="2"),
        _make_study(tmp_path, "002", "002", seed=2, split="val", label=0, source=LabelSource.ANNOTATION, institution="2"),
        _make_study(tmp_path, "003", "003", seed=3, split="test", label=1, source=LabelSource.ANNOTATION, institution="2"),
    ]
    root = export_layout(studies, "prostate158", tmp_path / "p158")
    assert detect_layout(root) == "prostate158"
    assert (root / "prostate158_train/train/002/t2.nii.gz").is_file()  # valid cases live in train/ as in the release
    imported, summary = import_layout(root)
    assert summary.skipped == []
    by_case = {s.case_id: s for s in imported}
    for original in studies:
        got = by_case[original.case_id]
        assert (got.patient_id, got.split, got.label, got.label_source, got.institution) == (
            original.patient_id, original.split, original.label, LabelSource.ANNOTATION, "2")
        for seq in ("AxT2", "HighB", "ADC"):
            _assert_same_image(got.images[seq], original.images[seq])
        np.testing.assert_array_equal(read_volume(got.masks["gland"]).array, read_volume(original.masks["gland"]).array)
    assert "lesion" in by_case["001"].masks and "lesion" not in by_case["002"].masks
    adc_tumour = read_volume(root / "prostate158_train/train/001/adc_tumor_reader1.nii.gz")
    assert adc_tumour.same_grid(read_volume(studies[0].images["ADC"]), atol=1e-4)  # on the ADC grid, as released
    assert adc_tumour.array.sum() > 0


def test_manifest_round_trip_is_self_contained(tmp_path):
    studies = [_make_study(tmp_path, "m1", "pm", seed=1, report="PI-RADS 2.", isup=0, label=0,
                           source=LabelSource.HISTOPATHOLOGY, split="val")]
    entry = export_layout(studies, "manifest", tmp_path / "man")
    assert entry == tmp_path / "man" / "manifest.csv" and detect_layout(entry.parent) == "manifest"
    imported, summary = import_layout(entry)
    got = imported[0]
    assert (got.case_id, got.patient_id, got.split, got.report, got.isup, got.label_source) == (
        "m1", "pm", "val", "PI-RADS 2.", 0, LabelSource.HISTOPATHOLOGY)
    assert (tmp_path / "man") in got.images["AxT2"].parents
    _assert_same_image(got.images["ADC"], studies[0].images["ADC"])


# --- detection ----------------------------------------------------------------------------------------------------
def test_detection_errors_name_the_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="empty"):
        detect_layout(empty)
    both = tmp_path / "both"
    (both / "prostate158_test").mkdir(parents=True)
    (both / "manifest.csv").write_text("case_id,patient_id,axt2\n")
    with pytest.raises(ManifestError, match="several layouts"):
        detect_layout(both)
    assert set(LAYOUTS) == {"manifest", "authors_json", "picai", "prostate158"}


# --- bad input ----------------------------------------------------------------------------------------------------
def _reasons(summary) -> dict[str, str]:
    """case id -> all its skip reasons, joined (a case may be skipped twice, e.g. a bad first row and a duplicate)."""
    reasons: dict[str, str] = {}
    for s in summary.skipped:
        reasons[s.case_id] = reasons.get(s.case_id, "") + " | " + s.reason
    return reasons


def test_authors_json_bad_entries_are_reported_and_the_rest_imports(tmp_path):
    studies = [_make_study(tmp_path, f"p{i}", f"p{i}", seed=i, masks=False) for i in range(4)]
    root = export_layout(studies, "authors_json", tmp_path / "authors")
    entries = json.loads((root / "train.json").read_text())
    del entries[1]["adc"]  # missing key
    entries[2]["extra"] = 1  # unknown key: a warning only
    entries[2]["spacing"] = [1.0, 1.0, 1.0]  # disagrees with the header: a warning with --check-images
    entries.append(dict(entries[0]))  # duplicate folder
    entries.append({**entries[3], "folder": "p9", "pirads": [1, 1]})  # not a one-hot
    (root / "p3" / "b1600.nii.gz").unlink()  # missing image
    (root / "train.json").write_text(json.dumps(entries, indent=1))
    (root / "test.json").write_text('[\n {"axt2": "./x/axt2.nii.gz",\n "folder": }\n]')  # invalid JSON, line 3

    imported, summary = import_layout(root, check_images=True)
    assert sorted(s.case_id for s in imported) == ["p0", "p2"]
    reasons = _reasons(summary)
    assert "missing key(s) ['adc']" in reasons["p1"] and "train.json entry 1" in reasons["p1"]
    assert "b1600.nii.gz" in reasons["p3"] and "not found" in reasons["p3"]
    assert "pirads" in reasons["p9"]
    assert "invalid JSON at line 3" in reasons["<test.json>"]
    assert sum(1 for s in summary.skipped if s.case_id == "p0" and "duplicate" in s.reason) == 1
    assert any("extra" in w["reason"] for w in summary.details["warnings"])
    assert any(w["where"] == "train.json entry 2" and "header spacing" in w["reason"] for w in summary.details["warnings"])
    (root / "train.json").write_text("{not json")
    with pytest.raises(ManifestError, match="line 1"):  # nothing readable at all: an error naming file and line
        import_layout(root)


def test_picai_bad_cases_are_reported_and_the_rest_imports(tmp_path):
    studies = [_make_study(tmp_path, f"1000{i}_20{i}", f"1000{i}", seed=i, isup=i, label=int(i >= 2), institution="2",
                           source=LabelSource.HISTOPATHOLOGY, split="", masks=False) for i in range(5)]
    root = export_layout(studies, "picai", tmp_path / "picai")
    sheet = root / "picai_labels/clinical_information/marksheet.csv"
    with open(sheet) as f:
        rows = list(csv.DictReader(f))
    rows.append(dict(rows[0]))  # duplicate row
    rows.append({**rows[0], "patient_id": "19999", "study_id": "299"})  # row without images
    kept = [r for r in rows if r["patient_id"] != "10004"]  # images without a row
    with open(sheet, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "biopsy_site"])
        writer.writeheader()
        writer.writerows({**r, "biopsy_site": ""} for r in kept)
    next(root.glob("picai_public_images_fold*/10001/10001_201_adc.mha")).unlink()  # missing sequence
    next(root.glob("picai_public_images_fold*/10002/10002_202_t2w.mha")).write_bytes(b"not an image")  # corrupt

    imported, summary = import_layout(root)
    assert sorted(s.case_id for s in imported) == ["10000_200", "10002_202", "10003_203"]  # existence only
    imported, summary = import_layout(root, "picai", check_images=True)
    assert sorted(s.case_id for s in imported) == ["10000_200", "10003_203"]
    reasons = _reasons(summary)
    assert "10001_201_adc.mha" in reasons["10001_201"]
    assert "unreadable image" in reasons["10002_202"] and "10002_202_t2w.mha" in reasons["10002_202"]
    assert "no images" in reasons["19999_299"] and "marksheet.csv row" in reasons["19999_299"]
    assert "no row in marksheet.csv" in reasons["10004_204"]
    assert any(s.case_id == "10000_200" and "duplicate row" in s.reason for s in summary.skipped)
    assert any("biopsy_site" in w["reason"] for w in summary.details["warnings"])


def test_prostate158_bad_cases_are_reported_and_the_rest_imports(tmp_path):
    studies = [_make_study(tmp_path, f"00{i}", f"00{i}", seed=i, split="train", label=i % 2, institution="2",
                           source=LabelSource.ANNOTATION) for i in range(1, 6)]
    root = export_layout(studies, "prostate158", tmp_path / "p158")
    table = root / "prostate158_train/train.csv"
    with open(table) as f:
        rows = list(csv.DictReader(f))
    rows.append(dict(rows[0]))  # duplicate ID
    (root / "prostate158_train/train/001/t2_tumor_reader1.nii.gz").unlink()  # listed tumour file missing
    (root / "prostate158_train/train/005").rename(root / "prostate158_train/train/099")  # folder in no CSV
    rows = [r for r in rows if r["ID"] != "005"]
    # A 2D image where a volume belongs: caught by --check-images.
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(root / "prostate158_train/train/002/dwi.nii.gz"))
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "comment"])
        writer.writeheader()
        writer.writerows(rows)

    imported, summary = import_layout(root, check_images=True)
    assert sorted(s.case_id for s in imported) == ["003", "004"]
    reasons = _reasons(summary)
    assert "t2_tumor_reader1" in reasons["001"] and "not found" in reasons["001"] and "duplicate ID" in reasons["001"]
    assert "not a 3D" in reasons["002"] and "dwi.nii.gz" in reasons["002"]
    assert "listed in no CSV" in reasons["099"]
    assert any("comment" in w["reason"] for w in summary.details["warnings"])
    assert {s.case_id: s.label for s in imported} == {"003": 1, "004": 0}


# --- the CLI ------------------------------------------------------------------------------------------------------
def test_ccella_import_writes_manifest_and_summary(tmp_path, capsys):
    secret = "Confidential report text 12345"
    studies = [
        _make_study(tmp_path, "p1", "p1", seed=1, split="train", label=1, report=secret, masks=False),
        _make_study(tmp_path, "p2", "p2", seed=2, split="test", label=0, report="", institution="2", masks=False),
    ]
    root = export_layout(studies, "authors_json", tmp_path / "authors")
    (root / "p2" / "adc.nii.gz").unlink()
    out = tmp_path / "out" / "manifest.csv"
    rc = ccella_main(["import", str(root), "--out", str(out), "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    manifest = read_manifest(out, check_files=True)
    assert [s.case_id for s in manifest.studies] == ["p1"] and manifest.studies[0].report == secret
    assert "../authors/p1/axt2.nii.gz" in out.read_text()  # paths relative to the manifest
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["n_studies"] == 1 and summary["n_skipped"] == 1 and summary["skipped"][0]["case_id"] == "p2"
    assert summary["per_split"] == {"train": 1} and summary["per_label"] == {"1": 1}
    assert summary["per_institution"] == {"1": 1} and summary["layout"] == "authors_json"
    printed = capsys.readouterr()
    assert "1 studies" in printed.out and secret not in printed.out + printed.err

    rc = ccella_main(["import", str(tmp_path / "empty_dir_missing"), "--out", str(tmp_path / "x.csv")])
    assert rc == 1 and "empty_dir_missing" in capsys.readouterr().err
