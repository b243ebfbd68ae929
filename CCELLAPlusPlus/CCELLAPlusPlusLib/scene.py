"""Bridge between CCELLACore's :class:`Exam` and Slicer's MRML scene.

Geometry (one place for the extension):

- ``Volume.array`` is (X, Y, Z) = (I, J, K); Slicer's ``arrayFromVolume`` is (K, J, I), so arrays are transposed.
- ``Volume`` geometry is LPS (ITK); MRML volume nodes are RAS. The node's IJKToRAS matrix is exactly
  ``Volume.affine_ras`` = diag(-1, -1, 1, 1) @ ``Volume.affine_lps``: directions diag(-1, -1, 1) @ LPS direction,
  origin = LPS origin with x and y negated, spacing unchanged.

This is Slicer-side code (it imports ``slicer`` and ``vtk``); CCELLACore itself never does. The logic here is
headless: no widget, no popup; it reports through ``logCallback`` and never logs report text or patient ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import slicer
import vtk

from CCELLACore.data.study import MASKS, SEQUENCES, Exam
from CCELLACore.data.volume import SYNTHETIC_KEY, Volume
from CCELLACore.errors import DataError

__all__ = [
    "ATTRIBUTE_PREFIX",
    "SYNTHETIC_ATTRIBUTE",
    "MODEL_HASH_ATTRIBUTE",
    "ROLE_ATTRIBUTE",
    "CASE_ATTRIBUTE",
    "REPORT_ATTRIBUTE",
    "MODEL_HASH_KEY",
    "SYNTHETIC_NAME_SUFFIX",
    "ADC_WINDOW_LEVEL",
    "LPS_TO_RAS",
    "ijk_to_ras_matrix",
    "volume_to_node",
    "node_to_volume",
    "exam_to_scene",
    "scene_to_exam",
    "StudySceneLogic",
]

ATTRIBUTE_PREFIX = "CCELLA."
#: Node attribute set to "true" on every synthetic volume (and "false" on real ones we load).
SYNTHETIC_ATTRIBUTE = "CCELLA.synthetic"
#: Node attribute holding the hash of the model that generated a synthetic volume.
MODEL_HASH_ATTRIBUTE = "CCELLA.sourceModelHash"
#: Node attribute naming what a node is: a sequence in SEQUENCES or a mask in MASKS.
ROLE_ATTRIBUTE = "CCELLA.role"
#: Node attribute holding the exam's case id (ids and hashes may be shown; report text never is).
CASE_ATTRIBUTE = "CCELLA.caseId"
#: Subject hierarchy attribute of a study folder holding its report (the user's own input; never logged).
REPORT_ATTRIBUTE = "CCELLA.report"
#: Volume metadata key (NRRD/MHA header field) for the generating model's hash, mirrored by MODEL_HASH_ATTRIBUTE.
MODEL_HASH_KEY = "CCELLA_model_sha256"
SYNTHETIC_NAME_SUFFIX = " (synthetic)"

#: ADC display window and level in 10^-6 mm^2/s: shows 0-3000, the reference's ADC window.
ADC_WINDOW_LEVEL = (3000.0, 1500.0)
#: AxT2 and HighB have arbitrary units: window between these intensity percentiles.
_AUTO_PERCENTILES = (0.5, 99.5)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

LogCallback = Callable[[str], None]


# --- single volumes ---------------------------------------------------------------------------------------------
def ijk_to_ras_matrix(volume: Volume) -> vtk.vtkMatrix4x4:
    """The node IJKToRAS matrix of ``volume`` (equal to ``volume.affine_ras``)."""
    matrix = vtk.vtkMatrix4x4()
    affine = volume.affine_ras
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(affine[r, c]))
    return matrix


def _label_array(array: np.ndarray, name: str) -> np.ndarray:
    """Label maps need integer voxels: bool -> uint8; float masks must hold whole numbers."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise ValueError(f"mask '{name}' has non-integer values; a label map needs whole numbers")
    return array.astype(np.int16)


def volume_to_node(volume: Volume, name: str, *, label_map: bool = False):
    """Add ``volume`` to ``slicer.mrmlScene`` as a scalar volume node (or label map node).

    Args:
        volume: array (X, Y, Z) with LPS geometry.
        name: node name.
        label_map: create a ``vtkMRMLLabelMapVolumeNode`` (integer voxels required).

    Returns:
        The new node; its array (K, J, I) is ``volume.array`` transposed and its IJKToRAS is ``volume.affine_ras``.
    """
    array = volume.array
    if label_map:
        array = _label_array(array, name)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    class_name = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    # addVolumeFromArray deep-copies the voxels, so the transposed view is safe to pass.
    return slicer.util.addVolumeFromArray(
        np.ascontiguousarray(array.transpose(2, 1, 0)), ijk_to_ras_matrix(volume), name, class_name
    )


def _world_matrix(node) -> np.ndarray:
    """IJK -> world RAS of ``node``, including a linear parent transform (moved volumes keep their placement)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(
                f"volume '{node.GetName()}' is under a non-linear transform; harden the transform first"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = slicer.util.arrayFromVTKMatrix(to_world) @ matrix
    return matrix


def node_to_volume(node) -> Volume:
    """A :class:`Volume` (X, Y, Z; LPS) from a scalar or label map volume node; voxels are copied.

    The CCELLA synthetic attributes come back as ``SYNTHETIC_KEY`` / ``MODEL_HASH_KEY`` metadata.
    """
    if node is None or node.GetImageData() is None:
        raise ValueError("volume node has no image data")
    array = np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0)
    affine_lps = LPS_TO_RAS @ _world_matrix(node)  # diag(-1,-1,1,1) is its own inverse
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    metadata: dict[str, str] = {}
    if node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "true":
        metadata[SYNTHETIC_KEY] = "true"
        model_hash = node.GetAttribute(MODEL_HASH_ATTRIBUTE)
        if model_hash:
            metadata[MODEL_HASH_KEY] = model_hash
    return Volume(
        np.ascontiguousarray(array),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in affine_lps[:3, 3]),
        linear / spacing,
        metadata,
    )


def _set_display(node, role: str, volume: Volume) -> None:
    display = node.GetDisplayNode()
    if display is None or role in MASKS:
        return  # label maps keep their colour table display
    display.AutoWindowLevelOff()
    if role == "ADC":
        display.SetWindowLevel(*ADC_WINDOW_LEVEL)
        return
    values = np.asarray(volume.array, dtype=np.float64)
    low, high = np.percentile(values, _AUTO_PERCENTILES)
    if high <= low:  # constant image: any non-zero window shows it
        high = low + 1.0
    display.SetWindowLevelMinMax(float(low), float(high))


# --- subject hierarchy ------------------------------------------------------------------------------------------
def _subject_hierarchy():
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)


def _item_of(sh, node) -> int:
    """The node's subject hierarchy item; Slicer's SH plugins create it on add, slicer-core does not."""
    item = sh.GetItemByDataNode(node)
    if item == sh.GetInvalidItemID():
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


# --- exams ------------------------------------------------------------------------------------------------------
def exam_to_scene(
    exam: Exam,
    name_prefix: str,
    synthetic: bool,
    parent_item: int | None = None,
    *,
    source_model_hash: str = "",
) -> dict:
    """Put an exam's volumes (and masks, as label maps) into ``slicer.mrmlScene`` under one SH folder.

    Args:
        exam: volumes keyed by sequence (AxT2, HighB, ADC), masks keyed by name (gland, lesion); each keeps its
            own geometry.
        name_prefix: node names are ``"<prefix> <role>"`` (plus " (synthetic)").
        synthetic: mark every node ``CCELLA.synthetic = "true"`` and suffix the names; real exams get "false".
        parent_item: subject hierarchy item to create the study folder under (default: the scene).
        source_model_hash: hash of the generating model; defaults to the volumes' ``CCELLA_model_sha256``.

    Returns:
        Nodes keyed by role (sequence or mask name), in SEQUENCES then MASKS order.
    """
    sh = _subject_hierarchy()
    suffix = SYNTHETIC_NAME_SUFFIX if synthetic else ""
    folder_name = (exam.case_id or name_prefix) + suffix
    parent = sh.GetSceneItemID() if parent_item is None else parent_item
    folder = sh.CreateFolderItem(parent, folder_name)
    if exam.case_id:
        sh.SetItemAttribute(folder, CASE_ATTRIBUTE, exam.case_id)
    if not source_model_hash and synthetic:
        source_model_hash = next(
            (v.metadata[MODEL_HASH_KEY] for v in exam.volumes.values() if v.metadata.get(MODEL_HASH_KEY)), ""
        )

    items = [(role, exam.volumes[role], False) for role in SEQUENCES if role in exam.volumes]
    items += [(role, exam.masks[role], True) for role in MASKS if role in exam.masks]
    unknown = (set(exam.volumes) - set(SEQUENCES)) | (set(exam.masks) - set(MASKS))
    if unknown:
        raise ValueError(f"exam {exam.case_id or name_prefix}: unknown volume(s) {sorted(unknown)}")

    nodes: dict = {}
    for role, volume, is_mask in items:
        node = volume_to_node(volume, f"{name_prefix} {role}{suffix}", label_map=is_mask)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true" if synthetic else "false")
        if synthetic and source_model_hash:
            node.SetAttribute(MODEL_HASH_ATTRIBUTE, source_model_hash)
        if exam.case_id:
            node.SetAttribute(CASE_ATTRIBUTE, exam.case_id)
        _set_display(node, role, volume)
        sh.SetItemParent(_item_of(sh, node), folder)
        nodes[role] = node
    return nodes


def scene_to_exam(nodes: Mapping[str, object], case_id: str | None = None) -> Exam:
    """An :class:`Exam` from volume nodes keyed by role (as :func:`exam_to_scene` returns, or chosen by a user).

    Args:
        nodes: ``{"AxT2": node, "HighB": node, "ADC": node, "gland": labelmap, ...}``; ``None`` values are skipped.
        case_id: the exam's case id; default: the nodes' ``CCELLA.caseId`` attribute when they agree.

    Raises:
        ValueError: an unknown role, no sequence volume, or a node without image data.
    """
    volumes: dict[str, Volume] = {}
    masks: dict[str, Volume] = {}
    ids = set()
    for role, node in nodes.items():
        if node is None:
            continue
        if role in SEQUENCES:
            volumes[role] = node_to_volume(node)
        elif role in MASKS:
            masks[role] = node_to_volume(node)
        else:
            raise ValueError(f"unknown role '{role}'; expected one of {SEQUENCES + MASKS}")
        ids.add(node.GetAttribute(CASE_ATTRIBUTE) or "")
    if not volumes:
        raise ValueError(f"no sequence volume given; expected at least one of {SEQUENCES}")
    if case_id is None:
        case_id = ids.pop() if len(ids) == 1 else ""
    return Exam(volumes=volumes, masks=masks, case_id=case_id)


# --- headless logic ---------------------------------------------------------------------------------------------
class StudySceneLogic:
    """Headless study loading, shared by the module's Logic class and plain-Python tests.

    Args:
        logCallback: receives progress lines (counts, case ids, file names; never report text).
    """

    def __init__(self, logCallback: LogCallback | None = None) -> None:
        self.logCallback = logCallback

    def log(self, message: str) -> None:
        if self.logCallback is not None:
            self.logCallback(message)

    def listCases(self, manifestPath: str | Path) -> list[str]:
        """Case ids of a manifest, in file order; rows that cannot be used are logged (count and reasons)."""
        from CCELLACore.data.manifest import read_manifest

        manifest = read_manifest(manifestPath)
        if manifest.problems:
            self.log(f"{len(manifest.problems)} row(s) of {Path(manifestPath).name} skipped")
            for problem in manifest.problems:
                self.log(f"  {problem.case_id}: {problem.reason}")
        return [study.case_id for study in manifest.studies]

    def loadStudyFromManifest(self, manifestPath: str | Path, caseId: str, parentItem: int | None = None) -> dict:
        """Read one case of a manifest and put it into the scene (see :func:`exam_to_scene`).

        Volumes whose metadata marks them synthetic (``CCELLA_synthetic = true``) are loaded as synthetic.

        Raises:
            ManifestError: the manifest is missing or malformed.
            DataError: the case is not in the manifest, or an image is missing/corrupt.
        """
        from CCELLACore.data.manifest import read_manifest

        manifestPath = Path(manifestPath)
        studies = read_manifest(manifestPath).by_case()
        if caseId not in studies:
            raise DataError(caseId, f"not in manifest {manifestPath.name} ({len(studies)} usable case(s))")
        study = studies[caseId]
        exam = study.load()
        if not exam.same_space():
            self.log(f"{caseId}: volumes are on different grids; Slicer shows each in its own geometry")
        synthetic = any(v.metadata.get(SYNTHETIC_KEY, "").lower() == "true" for v in exam.volumes.values())
        nodes = exam_to_scene(exam, caseId, synthetic, parentItem)
        if study.has_report and nodes:
            sh = _subject_hierarchy()
            sh.SetItemAttribute(sh.GetItemParent(sh.GetItemByDataNode(next(iter(nodes.values())))), REPORT_ATTRIBUTE,
                                study.report)
        self.log(
            f"Loaded {caseId}: {len(exam.volumes)} volume(s), {len(exam.masks)} mask(s)"
            + (" [synthetic]" if synthetic else "")
        )
        return nodes
