"""Manifest CSV: round trip, relative paths, per-row problems, strict columns; labels and study records."""

from __future__ import annotations

import numpy as np
import pytest

from CCELLACore.data import (
    Exam,
    LabelSource,
    Study,
    Volume,
    derive_label,
    read_manifest,
    write_manifest,
    write_volume,
)
from CCELLACore.errors import DataError, ManifestError


def _study(tmp_path, case_id="p1_s1", patient_id="p1", report="Report with µ, ≥ 1.5 cm and a \"quote\",\nnew line"):
    folder = tmp_path / "data" / case_id
    vol = Volume(np.ones((4, 4, 3), np.float32), spacing=(1, 1, 3))
    images = {seq: write_volume(vol, folder / f"{seq.lower()}.nii.gz") for seq in ("AxT2", "HighB", "ADC")}
    gland = write_volume(vol.with_array(np.ones((4, 4, 3), np.uint8)), folder / "gland.nii.gz")
    label, source = derive_label(isup=3, pirads=2)
    return Study(
        case_id=case_id, patient_id=patient_id, study_id="s1", institution="1", split="train", images=images,
        masks={"gland": gland}, report=report, pirads=2, isup=3, label=label, label_source=source,
    )


def test_labels_prefer_histopathology():
    assert derive_label(isup=1, pirads=5) == (0, LabelSource.HISTOPATHOLOGY)
    assert derive_label(isup=2, pirads=1) == (1, LabelSource.HISTOPATHOLOGY)
    assert derive_label(isup=None, pirads=4) == (1, LabelSource.PIRADS)
    assert derive_label(isup=None, pirads=3) == (0, LabelSource.PIRADS)
    assert derive_label(isup=None, pirads=None) == (None, LabelSource.NONE)


def test_round_trip_with_relative_paths(tmp_path):
    study = _study(tmp_path)
    path = write_manifest([study], tmp_path / "manifest.csv")
    text = path.read_text(encoding="utf-8")
    assert str(tmp_path) not in text  # relative paths only
    assert "data/p1_s1/axt2.nii.gz" in text
    manifest = read_manifest(path, check_files=True)
    assert manifest.problems == []
    (back,) = manifest.studies
    assert back.report == study.report
    assert (back.label, back.label_source, back.pirads, back.isup) == (1, LabelSource.HISTOPATHOLOGY, 2, 3)
    assert back.images["ADC"].resolve() == study.images["ADC"].resolve()
    exam = back.load()
    assert isinstance(exam, Exam) and set(exam.volumes) == {"AxT2", "HighB", "ADC"} and "gland" in exam.masks
    exam.check_same_space()


def test_bad_rows_are_reported_and_others_kept(tmp_path):
    good = _study(tmp_path)
    path = write_manifest([good], tmp_path / "manifest.csv")
    text = path.read_text(encoding="utf-8")
    header_line, good_row = text.split("\n", 1)
    header = header_line.split(",")
    def row(**values):
        return ",".join(str(values.get(c, "")) for c in header) + "\n"
    extra = [
        row(case_id="p2_s1", patient_id="p2", axt2="data/missing/axt2.nii.gz"),  # file missing
        row(case_id="p3_s1", patient_id="p3", axt2="x.nii.gz", pirads="7"),  # out of range
        row(case_id="p4_s1", patient_id="p4", axt2="x.nii.gz", label="maybe"),  # not an integer
        row(case_id="p5_s1", patient_id="p5", axt2="x.nii.gz", split="training"),  # unknown split
    ]
    # duplicate of the good case, placed after it
    path.write_text(text + good_row + "".join(extra), encoding="utf-8")
    manifest = read_manifest(path, check_files=True)
    assert [s.case_id for s in manifest.studies] == ["p1_s1"]
    reasons = {p.case_id: p.reason for p in manifest.problems}
    assert set(reasons) == {"p1_s1", "p2_s1", "p3_s1", "p4_s1", "p5_s1"}
    assert "duplicate" in reasons["p1_s1"]
    assert "not found" in reasons["p2_s1"] and "missing/axt2.nii.gz" in reasons["p2_s1"]
    assert "PI-RADS must be 1-5" in reasons["p3_s1"]
    assert "'label'" in reasons["p4_s1"]
    assert "split" in reasons["p5_s1"]


def test_unknown_column_names_column_and_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,patient_id,axt2,lable\nc,p,a.nii.gz,1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv.*lable"):
        read_manifest(path)
    path.write_text("case_id,axt2\nc,a.nii.gz\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="patient_id"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    path.write_bytes(b"case_id,patient_id,axt2\nc,p,\xff\xfe.nii.gz\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        read_manifest(path)


def test_exam_same_space_check_names_the_sequence():
    a = Volume(np.zeros((4, 4, 4), np.float32), spacing=(1, 1, 1))
    b = Volume(np.zeros((2, 2, 4), np.float32), spacing=(2, 2, 1))
    exam = Exam(volumes={"AxT2": a, "ADC": b}, case_id="c7")
    assert not exam.same_space() and exam.physical_overlap()
    with pytest.raises(DataError, match="c7.*ADC is not on the AxT2 grid.*ccella preprocess"):
        exam.check_same_space()
    far = Volume(np.zeros((4, 4, 4), np.float32), origin=(500, 0, 0))
    assert not Exam(volumes={"AxT2": a, "HighB": far}).physical_overlap()


def test_study_validation():
    with pytest.raises(DataError, match="no AxT2"):
        Study(case_id="c", patient_id="p", images={"ADC": "a.nii.gz"})
    with pytest.raises(DataError, match="unknown sequence"):
        Study(case_id="c", patient_id="p", images={"AxT2": "a", "T1": "b"})
    s = Study(case_id="c", patient_id="p", images={"AxT2": "a"}, report="  ")
    assert not s.has_report and s.sequences == ("AxT2",)
