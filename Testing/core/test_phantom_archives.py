"""Every importer on the phantom world's own archives: `ccella phantoms` writes the authors' JSON, PI-CAI and
Prostate158 layouts beside the project manifest; importing each gives back the same studies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CCELLACore.cli import main
from CCELLACore.data import LabelSource, read_manifest, read_volume
from CCELLACore.data.layouts import detect_layout, import_layout


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_archive")
    # 14 studies: the multi-study fraction is raised so that some patients have two studies
    assert main(["phantoms", "--institution", "2", "--n", "14", "--size", "32", "32", "16", "--spacing", "4", "4",
                 "4", "--seed", "5", "--multi-study-fraction", "0.4", "--out", str(root), "--no-progress"]) == 0
    manifest = read_manifest(root / "manifest.csv", check_files=True)
    assert not manifest.problems
    return root, manifest.by_case()


def _source(truth, case_id):
    """The phantom study an imported one came from. The authors' format names a study by its folder: the patient id,
    or <patient>_<study> when the patient has several studies."""
    if case_id in truth:
        return truth[case_id]
    (match,) = [s for s in truth.values() if s.patient_id == case_id]
    return match


@pytest.mark.parametrize("layout", ["authors_json", "picai", "prostate158"])
def test_layout_is_detected_and_imports_every_study(archive, layout):
    root, truth = archive
    assert detect_layout(root / layout) == layout
    studies, summary = import_layout(root / layout)
    assert not summary.skipped, summary.skipped
    assert len(studies) == len(truth)
    for study in studies:
        source = _source(truth, study.case_id)
        assert study.label == source.label, study.case_id
        assert set(study.images) == {"AxT2", "HighB", "ADC"}
        if layout == "authors_json":
            assert study.label_source == LabelSource.PIRADS and study.report == (source.report or "")
        if layout == "picai":
            assert study.patient_id == source.patient_id and study.study_id == source.study_id
            assert study.label_source in (LabelSource.HISTOPATHOLOGY, LabelSource.PIRADS)
        if layout == "prostate158":
            assert study.label_source == LabelSource.ANNOTATION
        # AxT2 voxels and geometry survive the layout (authors' JSON keeps the AxT2 grid too)
        mine, theirs = read_volume(study.images["AxT2"]), read_volume(source.images["AxT2"])
        assert mine.same_grid(theirs)
        np.testing.assert_allclose(mine.array, theirs.array, rtol=1e-6)


def test_picai_keeps_several_studies_per_patient(archive):
    root, truth = archive
    patients = [s.patient_id for s in truth.values()]
    assert len(set(patients)) < len(patients), "the fixture should contain a patient with two studies"
    studies, _ = import_layout(root / "picai")
    assert sorted(s.patient_id for s in studies) == sorted(patients)


@pytest.mark.parametrize("layout", ["authors_json", "picai", "prostate158"])
def test_import_cli_writes_a_manifest_that_reads_back(archive, layout, tmp_path, capsys):
    root, truth = archive
    out = tmp_path / f"{layout}.csv"
    assert main(["import", str(root / layout), "--out", str(out), "--check-images"]) == 0
    manifest = read_manifest(out, check_files=True)
    assert not manifest.problems and len(manifest) == len(truth)
    summary = json.loads(out.with_suffix(".summary.json").read_text(encoding="utf-8"))
    assert summary["n_skipped"] == 0 and summary["n_done"] == len(truth)
    printed = capsys.readouterr().out
    for study in truth.values():
        if study.report:
            assert study.report[:40] not in printed  # never print report text
