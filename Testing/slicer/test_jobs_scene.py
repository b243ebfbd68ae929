"""Generate / Classify logic against a real MRML scene (slicer-core): generated volumes in the scene match the
files the child wrote, attributes are set, exams stack up, Save round-trips, and Classify's scene side (export,
classification.json + saliency, errors) works with files written here."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from CCELLACore.data.study import Exam  # noqa: E402
from CCELLACore.data.volume import Volume, read_volume, write_volume  # noqa: E402
from CCELLACore.errors import CCELLAError  # noqa: E402
from CCELLAPlusPlusLib.jobs import (  # noqa: E402
    CLASSIFIER_HASH_ATTRIBUTE,
    CLASSIFIER_NAME_ATTRIBUTE,
    CLASSIFIER_PROBABILITY_ATTRIBUTE,
    GENERATED_ATTRIBUTE,
    PREDICTED_CLASS_ATTRIBUTE,
    PROBABILITY_ATTRIBUTE,
    SEED_ATTRIBUTE,
    SETTINGS_ATTRIBUTE,
    GenerationRequest,
    JobSceneLogic,
    classifier_status,
    guess_role,
)
from CCELLAPlusPlusLib.scene import (  # noqa: E402
    MODEL_HASH_ATTRIBUTE,
    REPORT_ATTRIBUTE,
    SYNTHETIC_ATTRIBUTE,
    exam_to_scene,
)
from conftest_helpers import REPORT  # noqa: E402


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(slicer.mrmlScene)
    yield slicer.mrmlScene
    colors.SetMRMLScene(None)
    slicer.mrmlScene.Clear(True)


def _sh():
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_generated_volumes_in_the_scene_match_the_files(tiny_generation):
    _events, out_dir, _log, _command = tiny_generation
    sidecar = json.loads((out_dir / "generation.json").read_text())
    messages = []
    logic = JobSceneLogic(logCallback=messages.append)
    first = logic.loadGenerationFolder(out_dir)
    assert sorted(first["nodes"]) == ["ADC", "AxT2", "HighB"] and first["name"] == "Synthetic exam 1 (seed 5)"
    for role, node in first["nodes"].items():
        volume = read_volume(out_dir / sidecar["files"][role])
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), volume.array.transpose(2, 1, 0))
        np.testing.assert_allclose(_ijk_to_ras(node), volume.affine_ras, atol=1e-6)
        assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "true"
        assert node.GetAttribute(MODEL_HASH_ATTRIBUTE) == sidecar["model_hash"] != ""
        assert "(synthetic)" in node.GetName()
    # Per-sequence window/level: ADC in its physical window, the others from their own intensities.
    adc_display = first["nodes"]["ADC"].GetDisplayNode()
    assert (adc_display.GetWindow(), adc_display.GetLevel()) == (3000.0, 1500.0)
    assert first["nodes"]["AxT2"].GetDisplayNode().GetWindow() != adc_display.GetWindow()
    sh, folder = _sh(), first["folder"]
    assert sh.GetItemAttribute(folder, REPORT_ATTRIBUTE) == REPORT
    assert sh.GetItemAttribute(folder, SEED_ATTRIBUTE) == "5"
    assert sh.GetItemAttribute(folder, GENERATED_ATTRIBUTE) == "true"
    settings = json.loads(sh.GetItemAttribute(folder, SETTINGS_ATTRIBUTE))
    assert settings["steps"] == 3 and settings["model_hash"] == sidecar["model_hash"]
    probability = float(sh.GetItemAttribute(folder, PROBABILITY_ATTRIBUTE))
    assert probability == pytest.approx(sidecar["predicted_csPCa_probability"], abs=1e-4)
    assert sh.GetItemAttribute(folder, PREDICTED_CLASS_ATTRIBUTE) == ("csPCa" if probability >= 0.5 else "no csPCa")
    assert not any(REPORT in m for m in messages)  # the log never shows the report
    # A second exam goes into its own folder beside the first.
    second = logic.loadGenerationFolder(out_dir)
    assert second["folder"] != folder and second["name"].startswith("Synthetic exam 2")
    assert sh.GetItemParent(second["folder"]) == sh.GetItemParent(folder) == sh.GetSceneItemID()
    assert len(logic.studyFolders()) == 2


@pytest.mark.parametrize("fmt,suffix", [("NIfTI", ".nii.gz"), ("NRRD", ".nrrd")])
def test_save_writes_volumes_and_sidecar(tiny_generation, tmp_path, fmt, suffix):
    loaded = JobSceneLogic().loadGenerationFolder(tiny_generation[1])
    files = JobSceneLogic().saveExam(loaded["nodes"], tmp_path / "saved", fmt)
    assert sorted(p.name for p in files) == sorted([f"axt2{suffix}", f"highb{suffix}", f"adc{suffix}", "generation.json"])
    for role, node in loaded["nodes"].items():
        back = read_volume(tmp_path / "saved" / f"{role.lower()}{suffix}")
        np.testing.assert_array_equal(back.array.transpose(2, 1, 0), slicer.util.arrayFromVolume(node))
        np.testing.assert_allclose(back.affine_ras, _ijk_to_ras(node), atol=1e-5)
    sidecar = json.loads((tmp_path / "saved" / "generation.json").read_text())
    assert sidecar["synthetic"] is True and sidecar["report"] == REPORT and sidecar["settings"]["steps"] == 3
    with pytest.raises(ValueError, match="format must be one of"):
        JobSceneLogic().saveExam(loaded["nodes"], tmp_path / "x", "DICOM")


def test_generation_request_errors_name_the_setting(tmp_path):
    for request, message in [
        (GenerationRequest(report="  "), "report is empty"),
        (GenerationRequest(report="r", steps=0), "steps must be >= 1"),
        (GenerationRequest(report="r", guidance=-1.0), "guidance must be >= 0"),
        (GenerationRequest(report="r", spacing=(1.0, 0.0, 1.0)), "spacing must be three positive"),
        (GenerationRequest(report="r", device="tpu"), "device must be one of"),
        (GenerationRequest(report="r", model_dir=str(tmp_path / "none")), "model folder not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            request.validate()
    GenerationRequest(unconditional=True).validate()


def _oblique_exam(case_id: str = "case1") -> Exam:
    a = 0.3
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rng = np.random.default_rng(0)
    t2 = dict(spacing=(0.5, 0.6, 3.0), origin=(10.0, -20.0, 5.0), direction=direction)
    dwi = dict(spacing=(2.0, 2.0, 3.0), origin=(8.0, -22.0, 5.0), direction=np.eye(3))  # another geometry
    return Exam(volumes={"AxT2": Volume(rng.random((20, 16, 6)).astype(np.float32) * 500, **t2),
                         "HighB": Volume(rng.random((8, 7, 6)).astype(np.float32) * 50, **dwi),
                         "ADC": Volume(rng.random((8, 7, 6)).astype(np.float32) * 2500, **dwi)}, case_id=case_id)


def test_classify_scene_side_export_result_and_saliency(tmp_path):
    exam = _oblique_exam()
    nodes = exam_to_scene(exam, "case1", synthetic=False)
    logic = JobSceneLogic()
    # The study folder gives the three volumes; names give roles for volumes loaded from elsewhere.
    (folder, name), = logic.studyFolders()
    assert name == "case1" and logic.studyVolumes(folder) == nodes
    exported = logic.exportVolumes(nodes, tmp_path / "in")
    for role, path in exported.items():
        assert path.name == f"{role.lower()}.nii.gz"
        assert read_volume(path).same_grid(exam.volumes[role], atol=1e-4)
    # What `ccella classify` writes (issue 17's contract), here written by the test.
    out = tmp_path / "out"
    out.mkdir()
    (out / "classification.json").write_text(json.dumps(
        {"probability": 0.83, "model_name": "phantom-classifier", "model_hash": "abc123def456"}))
    saliency = exam.volumes["AxT2"].with_array(np.linspace(0, 1, 20 * 16 * 6, dtype=np.float32).reshape(20, 16, 6))
    write_volume(saliency, out / "saliency.nii.gz")
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    result = logic.loadClassificationFolder(out, nodes["AxT2"])
    assert result.probability == pytest.approx(0.83) and result.model_name == "phantom-classifier"
    assert result.messages == []
    assert nodes["AxT2"].GetAttribute(CLASSIFIER_PROBABILITY_ATTRIBUTE) == "0.8300"
    assert nodes["AxT2"].GetAttribute(CLASSIFIER_NAME_ATTRIBUTE) == "phantom-classifier"
    assert nodes["AxT2"].GetAttribute(CLASSIFIER_HASH_ATTRIBUTE) == "abc123def456"
    node = result.saliency_node
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 1
    np.testing.assert_allclose(_ijk_to_ras(node), _ijk_to_ras(nodes["AxT2"]), atol=1e-5)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), saliency.array.transpose(2, 1, 0), atol=1e-6)
    sh = _sh()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder


def test_classification_json_errors_name_file_and_key(tmp_path):
    nodes = exam_to_scene(_oblique_exam(), "c", synthetic=False)
    logic = JobSceneLogic()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CCELLAError, match="classification.json: missing"):
        logic.loadClassificationFolder(out, nodes["AxT2"])
    (out / "classification.json").write_text(json.dumps({"model_name": "m"}))
    with pytest.raises(CCELLAError, match="key 'probability' missing"):
        logic.loadClassificationFolder(out, nodes["AxT2"])
    (out / "classification.json").write_text(json.dumps({"probability": 1.5, "model_name": "m"}))
    with pytest.raises(CCELLAError, match=r"'probability' must be a number in \[0, 1\]"):
        logic.loadClassificationFolder(out, nodes["AxT2"])
    (out / "classification.json").write_text(json.dumps({"probability": 0.2, "model": {"name": "m", "hash": "h"}}))
    result = logic.loadClassificationFolder(out, nodes["AxT2"])
    assert (result.model_name, result.model_hash) == ("m", "h")
    assert result.saliency_node is None and "saliency.nii.gz was not written" in result.messages[0]


def test_classify_says_plainly_what_is_missing(tmp_path):
    from CCELLACore.cli import COMMANDS

    from CCELLACore.classifier.classify_cli import DEFAULT_MODEL

    ok, message = classifier_status(None)
    assert ok == ("classify" in COMMANDS and DEFAULT_MODEL.is_dir())
    if "classify" not in COMMANDS:
        assert "no 'ccella classify' command" in message
        nodes = exam_to_scene(_oblique_exam(), "c", synthetic=False)
        with pytest.raises(CCELLAError, match="No classifier yet"):
            JobSceneLogic().startClassification(nodes, tmp_path)
    else:  # no folder = the bundled demo classifier, where this checkout has one; a given folder is checked
        assert message == "Classifier: demo_classifier" if ok else "choose a classifier model folder" in message
        assert "not found" in classifier_status(tmp_path / "none")[1]
        assert "no .safetensors" in classifier_status(tmp_path)[1]


def test_guess_role_from_series_names():
    assert guess_role("t2_tse_tra") == "AxT2"
    assert guess_role("ep2d_diff_b1400") == "HighB" and guess_role("case_hbv.mha") == "HighB"
    assert guess_role("ep2d_diff_ADC") == "ADC"
    assert guess_role("localizer") is None


def test_phantom_samples_are_written_once_and_carry_their_reports(tmp_path):
    logic = JobSceneLogic()
    manifest = logic.ensurePhantomSamples(tmp_path / "cache", n=2)
    stamp = manifest.stat().st_mtime_ns
    nodes = logic.loadPhantomSample(tmp_path / "cache", 0)
    assert {"AxT2", "HighB", "ADC"} <= set(nodes)
    sh = _sh()
    folder = sh.GetItemParent(sh.GetItemByDataNode(nodes["AxT2"]))
    assert sh.GetItemAttribute(folder, REPORT_ATTRIBUTE).strip()
    assert logic.ensurePhantomSamples(tmp_path / "cache", n=2).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="phantom sample 7 does not exist"):
        logic.loadPhantomSample(tmp_path / "cache", 7)
