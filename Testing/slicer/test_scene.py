"""Exam <-> MRML scene conversion with a real MRML scene (PyPI ``slicer-core``; no Slicer application, no Qt).

Geometry is checked three ways: the node's IJKToRAS against ``Volume.affine_ras``, a world point through the node's
RASToIJK against SimpleITK's own physical-point lookup, and files read by Slicer's storage node against SimpleITK.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")


from CCELLACore.data.manifest import write_manifest  # noqa: E402
from CCELLACore.data.study import Exam, Study  # noqa: E402
from CCELLACore.data.volume import SYNTHETIC_KEY, Volume, read_volume, write_volume  # noqa: E402
from CCELLACore.errors import DataError  # noqa: E402
from CCELLAPlusPlusLib.scene import (  # noqa: E402
    ADC_WINDOW_LEVEL,
    CASE_ATTRIBUTE,
    MODEL_HASH_ATTRIBUTE,
    MODEL_HASH_KEY,
    ROLE_ATTRIBUTE,
    SYNTHETIC_ATTRIBUTE,
    StudySceneLogic,
    exam_to_scene,
    node_to_volume,
    scene_to_exam,
    volume_to_node,
)

SHAPE = (16, 12, 8)  # X, Y, Z: all different, so an axis swap changes the shape
SPACING = (0.5, 0.7, 3.0)
ORIGIN = (12.5, -30.25, 41.0)
BLOB = (11, 3, 5)  # voxel (i, j, k) of the AxT2 blob centre; asymmetric on purpose
BLOB_VALUE = 1000.0


def _rotation() -> np.ndarray:
    a, b, c = 0.35, -0.25, 0.15
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    # Slicer's colour logic adds the default colour tables label maps display with (it logs once that it has no
    # application to find colour files in; the built-in tables are what matters here).
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(slicer.mrmlScene)
    yield slicer.mrmlScene
    colors.SetMRMLScene(None)
    slicer.mrmlScene.Clear(True)


@pytest.fixture
def exam() -> Exam:
    rng = np.random.default_rng(7)
    grid = dict(spacing=SPACING, origin=ORIGIN, direction=_rotation())
    axt2 = rng.uniform(0, 300, SHAPE).astype(np.float32)
    i, j, k = BLOB
    axt2[i - 1 : i + 2, j - 1 : j + 2, k] = 600.0
    axt2[i, j, k] = BLOB_VALUE
    highb = rng.uniform(0, 80, SHAPE).astype(np.float32)
    adc = rng.uniform(200, 2600, SHAPE).astype(np.float32)
    gland = np.zeros(SHAPE, np.uint8)
    gland[4:13, 2:10, 2:6] = 1
    gland[4:13, 2:5, 2:6] = 2
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[10:13, 2:5, 4:6] = 1
    return Exam(
        volumes={"AxT2": Volume(axt2, **grid), "HighB": Volume(highb, **grid), "ADC": Volume(adc, **grid)},
        masks={"gland": Volume(gland, **grid), "lesion": Volume(lesion, **grid)},
        case_id="case007",
    )


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _children(sh, item) -> list[int]:
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(n) for n in range(ids.GetNumberOfIds())]


# --- geometry ---------------------------------------------------------------------------------------------------
def test_node_geometry_equals_affine_ras(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    assert list(nodes) == ["AxT2", "HighB", "ADC", "gland", "lesion"]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for role, volume in [*exam.volumes.items(), *exam.masks.items()]:
        node = nodes[role]
        np.testing.assert_allclose(_ijk_to_ras(node), volume.affine_ras, atol=1e-12)
        np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-12)
        np.testing.assert_allclose(node.GetOrigin(), (-ORIGIN[0], -ORIGIN[1], ORIGIN[2]), atol=1e-12)
        directions = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(directions)
        np.testing.assert_allclose(
            slicer.util.arrayFromVTKMatrix(directions)[:3, :3], lps_to_ras @ volume.direction, atol=1e-12
        )
        voxels = slicer.util.arrayFromVolume(node)
        assert voxels.shape == SHAPE[::-1]  # Slicer arrays are (K, J, I)
        assert voxels.dtype == volume.array.dtype
        np.testing.assert_array_equal(voxels, volume.array.transpose(2, 1, 0))


def test_world_point_maps_to_same_voxel_as_affine_and_sitk(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    axt2 = exam.volumes["AxT2"]
    # A point inside the blob's centre voxel, off the voxel centre by less than half a voxel on every axis.
    ijk = np.array([*BLOB, 1.0]) + np.array([0.3, -0.2, 0.4, 0.0])
    ras = axt2.affine_ras @ ijk

    ras_to_ijk = vtk.vtkMatrix4x4()
    nodes["AxT2"].GetRASToIJKMatrix(ras_to_ijk)
    node_ijk = slicer.util.arrayFromVTKMatrix(ras_to_ijk) @ ras
    ours = np.linalg.inv(axt2.affine_ras) @ ras
    np.testing.assert_allclose(node_ijk, ours, atol=1e-9)
    i, j, k = np.round(node_ijk[:3]).astype(int)
    assert (i, j, k) == BLOB
    assert slicer.util.arrayFromVolume(nodes["AxT2"])[k, j, i] == BLOB_VALUE

    # SimpleITK, independent of our affine code: the same point in LPS lands in the same voxel.
    image = axt2.to_sitk()
    lps = (-ras[0], -ras[1], ras[2])
    assert image.TransformPhysicalPointToIndex(lps) == BLOB
    assert image[BLOB] == BLOB_VALUE


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_slicer_storage_node_reads_same_geometry_as_sitk(exam, tmp_path, suffix):
    """Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode) and our write_volume agree on orientation."""
    axt2 = exam.volumes["AxT2"]
    path = write_volume(axt2, tmp_path / f"axt2{suffix}")
    read_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fromFile")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(read_node) == 1
    converted = volume_to_node(axt2, "converted")
    np.testing.assert_allclose(_ijk_to_ras(read_node), axt2.affine_ras, atol=1e-5)
    np.testing.assert_allclose(_ijk_to_ras(read_node), _ijk_to_ras(converted), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(read_node), slicer.util.arrayFromVolume(converted))
    # And back: the node read by Slicer converts to the volume SimpleITK reads.
    from_sitk = read_volume(path)
    assert node_to_volume(read_node).same_grid(from_sitk, atol=1e-5)


# --- masks, attributes, hierarchy, display ----------------------------------------------------------------------
def test_masks_become_label_maps(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    for role in ("gland", "lesion"):
        assert nodes[role].IsA("vtkMRMLLabelMapVolumeNode")
        display = nodes[role].GetDisplayNode()
        assert display.IsA("vtkMRMLLabelMapVolumeDisplayNode")
        assert display.GetColorNode() is not None and display.GetColorNode().GetName() == "Labels"
    for role in ("AxT2", "HighB", "ADC"):
        assert not nodes[role].IsA("vtkMRMLLabelMapVolumeNode")
    assert set(np.unique(slicer.util.arrayFromVolume(nodes["gland"]))) == {0, 1, 2}


def test_bool_mask_becomes_uint8_and_fractional_mask_is_refused(exam):
    ref = exam.volumes["AxT2"]
    node = volume_to_node(ref.with_array(exam.masks["lesion"].array > 0), "boolmask", label_map=True)
    assert slicer.util.arrayFromVolume(node).dtype == np.uint8
    with pytest.raises(ValueError, match="non-integer"):
        volume_to_node(ref.with_array(np.full(SHAPE, 0.5, np.float32)), "fraction", label_map=True)


def test_synthetic_nodes_are_marked(exam):
    nodes = exam_to_scene(exam, "gen01", synthetic=True, source_model_hash="sha256:abc123")
    for role, node in nodes.items():
        assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "true"
        assert node.GetAttribute(MODEL_HASH_ATTRIBUTE) == "sha256:abc123"
        assert node.GetAttribute(ROLE_ATTRIBUTE) == role
        assert node.GetName() == f"gen01 {role} (synthetic)"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(nodes["AxT2"]))
    assert sh.GetItemName(folder) == "case007 (synthetic)"


def test_model_hash_defaults_to_volume_metadata(exam):
    exam.volumes["ADC"].metadata[MODEL_HASH_KEY] = "deadbeef"
    nodes = exam_to_scene(exam, "gen02", synthetic=True)
    assert nodes["AxT2"].GetAttribute(MODEL_HASH_ATTRIBUTE) == "deadbeef"


def test_real_nodes_are_not_marked_synthetic(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False, source_model_hash="ignored")
    for role, node in nodes.items():
        assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "false"
        assert node.GetAttribute(MODEL_HASH_ATTRIBUTE) is None
        assert node.GetAttribute(CASE_ATTRIBUTE) == "case007"
        assert node.GetName() == f"case007 {role}"


def test_subject_hierarchy_folder_holds_the_nodes(exam):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.CreateFolderItem(sh.GetSceneItemID(), "Generated")
    nodes = exam_to_scene(exam, "case007", synthetic=False, parent_item=parent)
    folders = _children(sh, parent)
    assert len(folders) == 1
    folder = folders[0]
    assert sh.GetItemName(folder) == "case007"
    assert sh.GetItemAttribute(folder, CASE_ATTRIBUTE) == "case007"
    in_folder = {sh.GetItemDataNode(item).GetID() for item in _children(sh, folder)}
    assert in_folder == {node.GetID() for node in nodes.values()}
    # A second exam gets its own folder at the scene level by default.
    exam_to_scene(exam, "other", synthetic=True)
    top = [sh.GetItemName(item) for item in _children(sh, sh.GetSceneItemID())]
    assert top == ["Generated", "case007 (synthetic)"]


def test_display_window_level(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    adc = nodes["ADC"].GetDisplayNode()
    assert not adc.GetAutoWindowLevel()
    assert (adc.GetWindow(), adc.GetLevel()) == ADC_WINDOW_LEVEL
    assert (adc.GetWindowLevelMin(), adc.GetWindowLevelMax()) == (0.0, 3000.0)
    t2 = nodes["AxT2"].GetDisplayNode()
    low, high = np.percentile(exam.volumes["AxT2"].array.astype(np.float64), (0.5, 99.5))
    assert not t2.GetAutoWindowLevel()
    assert t2.GetWindowLevelMin() == pytest.approx(low, rel=1e-6)
    assert t2.GetWindowLevelMax() == pytest.approx(high, rel=1e-6)


# --- scene -> exam ----------------------------------------------------------------------------------------------
def test_round_trip_scene_to_exam(exam):
    back = scene_to_exam(exam_to_scene(exam, "case007", synthetic=False))
    assert back.case_id == "case007"
    assert set(back.volumes) == set(exam.volumes) and set(back.masks) == set(exam.masks)
    for group, original in (("volumes", exam.volumes), ("masks", exam.masks)):
        for role, volume in original.items():
            got = getattr(back, group)[role]
            assert got.shape == volume.shape and got.array.dtype == volume.array.dtype
            np.testing.assert_array_equal(got.array, volume.array)
            np.testing.assert_allclose(got.spacing, volume.spacing, atol=1e-12)
            np.testing.assert_allclose(got.origin, volume.origin, atol=1e-12)
            np.testing.assert_allclose(got.direction, volume.direction, atol=1e-12)
            assert SYNTHETIC_KEY not in got.metadata
    back.check_same_space()


def test_round_trip_keeps_synthetic_marks(exam):
    back = scene_to_exam(exam_to_scene(exam, "g", synthetic=True, source_model_hash="cafe"))
    for volume in back.volumes.values():
        assert volume.metadata == {SYNTHETIC_KEY: "true", MODEL_HASH_KEY: "cafe"}


def test_scene_to_exam_applies_parent_linear_transform(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # 10 mm towards the patient's right (+x in RAS), i.e. -10 mm in LPS x
    transform.SetMatrixTransformToParent(shift)
    nodes["ADC"].SetAndObserveTransformNodeID(transform.GetID())
    back = scene_to_exam({"AxT2": nodes["AxT2"], "ADC": nodes["ADC"]}, case_id="moved")
    np.testing.assert_allclose(back.volumes["ADC"].origin, np.add(ORIGIN, (-10.0, 0.0, 0.0)), atol=1e-9)
    np.testing.assert_allclose(back.volumes["AxT2"].origin, ORIGIN, atol=1e-9)
    assert back.case_id == "moved"


def test_scene_to_exam_rejects_unknown_role(exam):
    nodes = exam_to_scene(exam, "case007", synthetic=False)
    with pytest.raises(ValueError, match="unknown role 'T1'"):
        scene_to_exam({"T1": nodes["AxT2"]})
    with pytest.raises(ValueError, match="no sequence volume"):
        scene_to_exam({"gland": nodes["gland"], "AxT2": None})


# --- logic: manifest -> scene -----------------------------------------------------------------------------------
def _write_case(exam: Exam, folder, *, synthetic: bool = False, report: str = "") -> Study:
    suffixes = {"AxT2": ".nrrd", "HighB": ".nii.gz", "ADC": ".mha"}
    images = {}
    for name, volume in exam.volumes.items():
        if synthetic:
            volume = volume.with_array(volume.array, **{SYNTHETIC_KEY: "true", MODEL_HASH_KEY: "f00d"})
        images[name] = write_volume(volume, folder / f"{exam.case_id}_{name}{suffixes[name]}")
    masks = {name: write_volume(v, folder / f"{exam.case_id}_{name}.nii.gz") for name, v in exam.masks.items()}
    return Study(exam.case_id, "patient-x", images, masks=masks, report=report)


def test_load_study_from_manifest(exam, tmp_path):
    secret = "Lesion 14 mm in the left apex, PI-RADS 5. Patient John Smith."
    real = _write_case(exam, tmp_path, report=secret)
    other = Exam(volumes=dict(exam.volumes), case_id="gen05")
    synthetic = _write_case(other, tmp_path, synthetic=True)
    manifest = write_manifest([real, synthetic], tmp_path / "manifest.csv")
    messages: list[str] = []
    logic = StudySceneLogic(logCallback=messages.append)

    assert logic.listCases(manifest) == ["case007", "gen05"]
    nodes = logic.loadStudyFromManifest(manifest, "case007")
    assert list(nodes) == ["AxT2", "HighB", "ADC", "gland", "lesion"]
    for role, node in nodes.items():
        on_disk = read_volume(tmp_path / f"case007_{role}{'.nrrd' if role == 'AxT2' else '.mha' if role == 'ADC' else '.nii.gz'}")
        np.testing.assert_allclose(_ijk_to_ras(node), on_disk.affine_ras, atol=1e-5)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), on_disk.array.transpose(2, 1, 0))
        assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "false"
    assert nodes["gland"].IsA("vtkMRMLLabelMapVolumeNode")

    generated = logic.loadStudyFromManifest(manifest, "gen05")
    assert list(generated) == ["AxT2", "HighB", "ADC"]
    assert all(n.GetAttribute(SYNTHETIC_ATTRIBUTE) == "true" for n in generated.values())
    assert all(n.GetAttribute(MODEL_HASH_ATTRIBUTE) == "f00d" for n in generated.values())

    assert messages == ["Loaded case007: 3 volume(s), 2 mask(s)", "Loaded gen05: 3 volume(s), 0 mask(s) [synthetic]"]
    assert not any("John" in m or "apex" in m for m in messages)  # never log report text


def test_load_study_errors_name_the_case(exam, tmp_path):
    manifest = write_manifest([_write_case(exam, tmp_path)], tmp_path / "manifest.csv")
    logic = StudySceneLogic()
    with pytest.raises(DataError, match="case nope: not in manifest manifest.csv"):
        logic.loadStudyFromManifest(manifest, "nope")
    (tmp_path / "case007_ADC.mha").unlink()
    with pytest.raises(DataError, match="case case007: .*case007_ADC.mha"):
        logic.loadStudyFromManifest(manifest, "case007")
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
