"""Headless Generate / Classify logic on the MRML scene: start child jobs, load their results, save exams.

Nothing here touches a widget or opens a dialog; the panel (:mod:`.panel`) and the module's Logic call it, and the
tests drive it against a real MRML scene (slicer-core). What runs where:

- **Generate**: the report goes to a private file in a short temporary folder; the child runs
  ``python -m CCELLACore.jobs generate`` (:func:`generation_command`); on success :meth:`JobSceneLogic.loadGeneration`
  reads the files it wrote into one subject-hierarchy folder per exam, marked synthetic, with the report, seed,
  settings, model hash and predicted class as attributes. Nothing enters the scene before the job succeeds, so a
  cancelled or failed run leaves the scene as it was.
- **Classify**: the chosen scene volumes are written as NIfTI, the child runs ``ccella classify`` (contract of
  issue 17: ``classification.json`` with ``probability`` and the model's name and hash, ``saliency.nii.gz`` on the
  AxT2 grid), and :meth:`JobSceneLogic.loadClassification` shows the probability and adds the saliency volume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

from CCELLACore.data.study import SEQUENCES, Exam
from CCELLACore.errors import CCELLAError

from .process import ChildJob, JobFailed, child_environment, python_command
from .scene import (
    ATTRIBUTE_PREFIX,
    CASE_ATTRIBUTE,
    REPORT_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    StudySceneLogic,
    _item_of,
    exam_to_scene,
    node_to_volume,
    volume_to_node,
)

__all__ = [
    "GenerationRequest",
    "GenerationJob",
    "ClassificationJob",
    "ClassificationResult",
    "JobSceneLogic",
    "generation_command",
    "classify_command",
    "classifier_status",
    "guess_role",
    "REPORT_ATTRIBUTE",
    "SEED_ATTRIBUTE",
    "SETTINGS_ATTRIBUTE",
    "PREDICTED_CLASS_ATTRIBUTE",
    "PROBABILITY_ATTRIBUTE",
    "GENERATED_ATTRIBUTE",
    "CLASSIFIER_PROBABILITY_ATTRIBUTE",
    "CLASSIFIER_NAME_ATTRIBUTE",
    "CLASSIFIER_HASH_ATTRIBUTE",
    "SAVE_FORMATS",
]

#: Subject hierarchy attributes of a generated exam's folder (and of its volume nodes).
SEED_ATTRIBUTE = ATTRIBUTE_PREFIX + "seed"
SETTINGS_ATTRIBUTE = ATTRIBUTE_PREFIX + "settings"  # JSON: sampler, steps, guidance, spacing, device, ...
PREDICTED_CLASS_ATTRIBUTE = ATTRIBUTE_PREFIX + "predictedClass"  # "csPCa" or "no csPCa"
PROBABILITY_ATTRIBUTE = ATTRIBUTE_PREFIX + "predictedCsPCaProbability"
GENERATED_ATTRIBUTE = ATTRIBUTE_PREFIX + "generated"
#: Attributes a classification sets on the AxT2 node (and its study folder).
CLASSIFIER_PROBABILITY_ATTRIBUTE = ATTRIBUTE_PREFIX + "classifierCsPCaProbability"
CLASSIFIER_NAME_ATTRIBUTE = ATTRIBUTE_PREFIX + "classifierName"
CLASSIFIER_HASH_ATTRIBUTE = ATTRIBUTE_PREFIX + "classifierHash"

#: Save format -> file suffix.
SAVE_FORMATS = {"NIfTI": ".nii.gz", "NRRD": ".nrrd"}

_DEVICES = ("auto", "cuda", "cpu")


def _short_temp_dir(prefix: str) -> Path:
    # Short paths: Windows' 260-character limit and non-ASCII user folders break some readers.
    return Path(tempfile.mkdtemp(prefix=prefix))


def _logs_dir() -> Path:
    return Path(tempfile.gettempdir()) / "ccella-logs"


def _log_path(kind: str) -> Path:
    return _logs_dir() / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}.log"


# --- generation -------------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """What the Generate panel asks for; ``None`` = the model's own default.

    Attributes:
        report: the report text (ignored when ``unconditional``).
        model_dir: a model folder; ``None`` = the bundled demo model.
        spacing: output spacing (x, y, z) in mm.
        device: ``auto`` (GPU when one has enough free memory, else CPU), ``cuda`` or ``cpu``.
    """

    report: str = ""
    unconditional: bool = False
    model_dir: str | None = None
    sampler: str | None = None
    steps: int | None = None
    seed: int = 0
    guidance: float | None = None
    spacing: tuple[float, float, float] | None = None
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting and its value."""
        if not self.unconditional and not self.report.strip():
            raise ValueError("the report is empty: paste or load a report, or tick 'unconditional'")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three positive values in mm, got {self.spacing}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise ValueError(f"model folder not found: {self.model_dir}")


def generation_command(request: GenerationRequest, report_file: Path | None, out_dir: Path) -> list[str]:
    """The child's command line; the report is only ever named by its file."""
    command = [*python_command(), "-m", "CCELLACore.jobs", "generate", "--out", str(out_dir),
               "--seed", str(int(request.seed)), "--device", request.device, "--precision", request.precision]
    command += ["--unconditional"] if request.unconditional else ["--report-file", str(report_file)]
    if request.model_dir:
        command += ["--model", str(request.model_dir)]
    if request.sampler:
        command += ["--sampler", request.sampler]
    if request.steps is not None:
        command += ["--steps", str(int(request.steps))]
    if request.guidance is not None:
        command += ["--guidance", repr(float(request.guidance))]
    if request.spacing is not None:
        command += ["--spacing", *(repr(float(s)) for s in request.spacing)]
    return command


@dataclass
class GenerationJob:
    """A running generation: the child job, its private folder and what was asked."""

    job: ChildJob
    request: GenerationRequest
    work_dir: Path
    out_dir: Path

    def cleanup(self) -> None:
        """Delete the private folder (report file and outputs); the log stays for the user."""
        shutil.rmtree(self.work_dir, ignore_errors=True)


# --- classification ---------------------------------------------------------------------------------------------
def classifier_status(model_dir: str | Path | None) -> tuple[bool, str]:
    """Whether Classify can run, and a sentence saying why not (or what will run).

    Checks that this CCELLACore has ``ccella classify`` and that ``model_dir`` is a classifier model folder
    (a folder holding ``.safetensors`` weights); no folder = the bundled demo classifier where it exists.
    """
    from CCELLACore.cli import COMMANDS

    if "classify" not in COMMANDS:
        return False, ("No classifier yet: this CCELLACore has no 'ccella classify' command, and no classifier "
                       "model ships with the extension. Generation works without it.")
    if not model_dir:
        from CCELLACore.classifier.classify_cli import DEFAULT_MODEL

        if not DEFAULT_MODEL.is_dir():
            return False, ("No classifier model: choose a classifier model folder (from 'ccella train-classifier'); "
                           "this checkout has no bundled demo classifier (Training/build_demo_classifier.sh).")
        model_dir = DEFAULT_MODEL
    path = Path(model_dir)
    if not path.is_dir():
        return False, f"Classifier model folder not found: {path}"
    if not any(path.glob("*.safetensors")):
        return False, f"{path} is not a classifier model folder: it holds no .safetensors weights."
    return True, f"Classifier: {path.name}"


def classify_command(inputs: dict[str, Path], model_dir: str | Path | None, out_dir: Path) -> list[str]:
    """``ccella classify --axt2 F --highb F --adc F --out DIR [--model DIR]`` through the current interpreter (no
    model: classify's default, the bundled demo classifier)."""
    command = [*python_command(), "-m", "CCELLACore.cli", "classify"]
    for role in SEQUENCES:
        command += [f"--{role.lower()}", str(inputs[role])]
    return command + ["--out", str(out_dir)] + (["--model", str(model_dir)] if model_dir else [])


@dataclass
class ClassificationJob:
    job: ChildJob
    work_dir: Path
    out_dir: Path
    axt2_node: Any

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


@dataclass
class ClassificationResult:
    """probability: P(clinically significant cancer); saliency_node: on the AxT2 grid (None when not written)."""

    probability: float
    model_name: str
    model_hash: str
    saliency_node: Any = None
    messages: list[str] = field(default_factory=list)


def _read_classification(path: Path) -> tuple[float, str, str]:
    """(probability, model name, model hash) from ``classification.json``; errors name the file and key."""
    if not path.is_file():
        raise CCELLAError(f"{path}: missing; the classifier wrote no result")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CCELLAError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "probability" not in data:
        raise CCELLAError(f"{path}: key 'probability' missing")
    probability = data["probability"]
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise CCELLAError(f"{path}: 'probability' must be a number in [0, 1], got {probability!r}")
    model = data.get("model")
    name = data.get("model_name") or (model.get("name") if isinstance(model, dict) else model) or ""
    model_hash = data.get("model_hash") or (model.get("hash") if isinstance(model, dict) else "") or ""
    if not name:
        raise CCELLAError(f"{path}: key 'model_name' (or 'model') missing")
    return float(probability), str(name), str(model_hash)


_ROLE_WORDS = {
    "AxT2": ("axt2", "t2w", "t2"),
    "HighB": ("highb", "hbv", "b1400", "b1500", "b1600", "b2000", "dwi", "bval"),
    "ADC": ("adc",),
}


def guess_role(name: str) -> str | None:
    """A sequence role from a volume name (DICOM series descriptions, file names): ``"t2_tse_tra"`` -> AxT2."""
    text = name.lower().replace(" ", "").replace("-", "").replace("_", "")
    for role in ("ADC", "HighB", "AxT2"):  # ADC first: "ep2d_diff_adc" also says "diff"
        if any(word in text for word in _ROLE_WORDS[role]):
            return role
    return None


# --- the logic --------------------------------------------------------------------------------------------------
class JobSceneLogic(StudySceneLogic):
    """Generate, classify and save on ``slicer.mrmlScene``; reports through ``logCallback`` (never report text)."""

    def __init__(self, logCallback=None) -> None:
        super().__init__(logCallback)

    # ------------------------------------------------------------------------------------------- generation
    def startGeneration(self, request: GenerationRequest) -> GenerationJob:
        """Start the child; returns at once (``job.job.wait()`` blocks, a GUI polls ``job.job.poll()``)."""
        request.validate()
        work_dir = _short_temp_dir("ccella-gen-")
        report_file = None
        if not request.unconditional:
            report_file = work_dir / "report.txt"
            # Private to the user: the report may be a real patient's.
            fd = os.open(report_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(request.report)
        out_dir = work_dir / "exam"
        command = generation_command(request, report_file, out_dir)
        job = ChildJob(command, _log_path("generate"), env=child_environment(request.device)).start()
        self.log(f"Generation started (seed {request.seed}); log: {job.log_path}")
        return GenerationJob(job, request, work_dir, out_dir)

    def _next_exam_number(self) -> int:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        ids = vtk.vtkIdList()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        count = sum(1 for i in range(ids.GetNumberOfIds()) if sh.GetItemAttribute(ids.GetId(i), GENERATED_ATTRIBUTE) == "true")
        return count + 1

    def loadGeneration(self, generation: GenerationJob) -> dict:
        """Put a finished generation into the scene, next to earlier ones, then delete its private folder.

        Returns:
            ``{"folder": SH item, "nodes": {"AxT2": node, ...}, "probability": float, "settings": dict,
            "name": str}``.

        Raises:
            JobFailed: the job failed or was cancelled (the scene is unchanged).
            CCELLAError: an output file is missing or unreadable (named).
        """
        try:
            result = generation.job.outcome()
            return self.loadGenerationFolder(Path(result.get("out_dir", generation.out_dir)), generation.request)
        finally:
            generation.cleanup()

    def loadGenerationFolder(self, out_dir: Path, request: GenerationRequest | None = None) -> dict:
        """Load the files ``ccella generate`` / the generate job wrote (``generation.json`` + volumes)."""
        from CCELLACore.data.volume import read_volume
        from CCELLACore.fileio import read_json

        sidecar_path = out_dir / "generation.json"
        if not sidecar_path.is_file():
            raise CCELLAError(f"{sidecar_path}: missing; the generation wrote no sidecar")
        sidecar = read_json(sidecar_path)
        files = sidecar.get("files")
        if not isinstance(files, dict) or not files:
            raise CCELLAError(f"{sidecar_path}: key 'files' missing or empty")
        volumes = {role: read_volume(out_dir / name) for role, name in files.items()}
        number = self._next_exam_number()
        seed = sidecar.get("seed", request.seed if request else "")
        name = f"Synthetic exam {number} (seed {seed})"
        exam = Exam(volumes=volumes, case_id=name)
        model_hash = str(sidecar.get("model_hash", ""))
        nodes = exam_to_scene(exam, f"Exam {number}", synthetic=True, source_model_hash=model_hash)
        probability = sidecar.get("predicted_csPCa_probability")
        probability = float(probability) if probability is not None else math.nan
        predicted = "" if math.isnan(probability) else ("csPCa" if probability >= 0.5 else "no csPCa")
        settings = {k: sidecar[k] for k in ("seed", "sampler", "steps", "guidance", "guidance_interval",
                                            "side_contrast", "side_scale", "spacing",
                                            "unconditional", "model_hash", "device", "dtype") if k in sidecar}
        report = sidecar.get("report") or ""
        attributes = {
            GENERATED_ATTRIBUTE: "true",
            REPORT_ATTRIBUTE: report,
            SEED_ATTRIBUTE: str(seed),
            SETTINGS_ATTRIBUTE: json.dumps(settings, sort_keys=True),
            PREDICTED_CLASS_ATTRIBUTE: predicted,
            PROBABILITY_ATTRIBUTE: "" if math.isnan(probability) else f"{probability:.4f}",
        }
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folder = sh.GetItemParent(sh.GetItemByDataNode(next(iter(nodes.values()))))
        for key, value in attributes.items():
            sh.SetItemAttribute(folder, key, value)
            if key != REPORT_ATTRIBUTE:  # nodes keep a pointer to the folder's report, not a copy per node
                for node in nodes.values():
                    node.SetAttribute(key, value)
        shown = "" if math.isnan(probability) else f", predicted P(csPCa) = {probability:.2f}"
        self.log(f"{name}: {', '.join(nodes)} added{shown}")
        return {"folder": folder, "nodes": nodes, "probability": probability, "settings": settings, "name": name}

    def saveExam(self, nodes: dict, out_dir: str | Path, fmt: str = "NIfTI") -> list[Path]:
        """Write each volume (``axt2.nii.gz`` ...; NRRD keeps the synthetic marking and model hash in its header)
        and ``generation.json`` with the folder's attributes when the exam was generated.

        Returns:
            The files written.
        """
        from CCELLACore.data.volume import write_volume
        from CCELLACore.fileio import atomic_write_json

        if fmt not in SAVE_FORMATS:
            raise ValueError(f"format must be one of {sorted(SAVE_FORMATS)}, got {fmt!r}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for role, node in nodes.items():
            written.append(write_volume(node_to_volume(node), out_dir / f"{role.lower()}{SAVE_FORMATS[fmt]}"))
        first = next(iter(nodes.values()))
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folder = sh.GetItemParent(sh.GetItemByDataNode(first))
        if sh.GetItemAttribute(folder, GENERATED_ATTRIBUTE) == "true":
            sidecar = {
                "synthetic": True,
                "note": "SYNTHETIC exam generated by CCELLA++ from a report; not a real patient; not for diagnosis",
                "report": sh.GetItemAttribute(folder, REPORT_ATTRIBUTE),
                "seed": sh.GetItemAttribute(folder, SEED_ATTRIBUTE),
                "settings": json.loads(sh.GetItemAttribute(folder, SETTINGS_ATTRIBUTE) or "{}"),
                "predicted_class": sh.GetItemAttribute(folder, PREDICTED_CLASS_ATTRIBUTE),
                "predicted_csPCa_probability": sh.GetItemAttribute(folder, PROBABILITY_ATTRIBUTE),
                "files": {role: p.name for role, p in zip(nodes, written)},
            }
            written.append(atomic_write_json(out_dir / "generation.json", sidecar))
        self.log(f"Saved {len(nodes)} volume(s) to {out_dir}")
        return written

    # ------------------------------------------------------------------------------------------- studies
    def studyFolders(self) -> list[tuple[int, str]]:
        """(SH item, name) of every folder that directly holds volume nodes, in scene order."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folders: dict[int, str] = {}
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            item = sh.GetItemByDataNode(node)
            if item == sh.GetInvalidItemID():
                continue
            parent = sh.GetItemParent(item)
            if parent != sh.GetSceneItemID() and parent not in folders:
                folders[parent] = sh.GetItemName(parent)
        return list(folders.items())

    def studyVolumes(self, folder: int) -> dict:
        """Sequence role -> volume node of a study folder: the CCELLA role attribute, else a guess from the name."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        ids = vtk.vtkIdList()
        sh.GetItemChildren(folder, ids, False)
        roles: dict = {}
        for i in range(ids.GetNumberOfIds()):
            node = sh.GetItemDataNode(ids.GetId(i))
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            role = node.GetAttribute(ROLE_ATTRIBUTE) or guess_role(node.GetName() or "")
            if role in SEQUENCES and role not in roles:
                roles[role] = node
        return roles

    def volumeNodes(self) -> list:
        """Scalar (not label map) volume nodes of the scene, for the Classify volume choices."""
        return [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not n.IsA("vtkMRMLLabelMapVolumeNode")]

    # ------------------------------------------------------------------------------------------- classification
    def startClassification(self, nodes: dict, model_dir: str | Path) -> ClassificationJob:
        """Export AxT2 / HighB / ADC (any geometry) as NIfTI and start ``ccella classify`` in a child."""
        ok, message = classifier_status(model_dir)
        if not ok:
            raise CCELLAError(message)
        missing = [role for role in SEQUENCES if nodes.get(role) is None]
        if missing:
            raise ValueError(f"choose a volume for {', '.join(missing)}")
        work_dir = _short_temp_dir("ccella-cls-")
        inputs = self.exportVolumes(nodes, work_dir)
        out_dir = work_dir / "out"
        job = ChildJob(classify_command(inputs, model_dir, out_dir), _log_path("classify")).start()
        self.log(f"Classification started; log: {job.log_path}")
        return ClassificationJob(job, work_dir, out_dir, nodes["AxT2"])

    def exportVolumes(self, nodes: dict, folder: str | Path) -> dict[str, Path]:
        """Write AxT2 / HighB / ADC nodes as ``axt2.nii.gz`` ... in their own geometry (parent transforms applied)."""
        from CCELLACore.data.volume import write_volume

        folder = Path(folder)
        return {role: write_volume(node_to_volume(nodes[role]), folder / f"{role.lower()}.nii.gz")
                for role in SEQUENCES if nodes.get(role) is not None}

    def loadClassification(self, classification: ClassificationJob) -> ClassificationResult:
        """Read a finished classification into the scene, then delete its folder (see :meth:`loadClassificationFolder`)."""
        try:
            classification.job.outcome()  # raises JobFailed with the child's message
            return self.loadClassificationFolder(classification.out_dir, classification.axt2_node)
        finally:
            classification.cleanup()

    def loadClassificationFolder(self, out_dir: str | Path, axt2_node) -> ClassificationResult:
        """``classification.json`` -> attributes on the AxT2 node and its folder; ``saliency.nii.gz`` -> a volume
        node (named after the AxT2 node) shown over AxT2 by the panel."""
        from CCELLACore.data.volume import read_volume

        out_dir = Path(out_dir)
        probability, name, model_hash = _read_classification(out_dir / "classification.json")
        result = ClassificationResult(probability, name, model_hash)
        attributes = {CLASSIFIER_PROBABILITY_ATTRIBUTE: f"{probability:.4f}", CLASSIFIER_NAME_ATTRIBUTE: name,
                      CLASSIFIER_HASH_ATTRIBUTE: model_hash}
        for key, value in attributes.items():
            axt2_node.SetAttribute(key, value)
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = sh.GetItemByDataNode(axt2_node)
        saliency_path = out_dir / "saliency.nii.gz"
        if saliency_path.is_file():
            saliency = read_volume(saliency_path)
            if not saliency.same_grid(node_to_volume(axt2_node)):
                result.messages.append("the saliency volume is not on the AxT2 grid; it is shown in its own geometry")
            node = volume_to_node(saliency, f"{axt2_node.GetName()} saliency")
            node.SetAttribute(ROLE_ATTRIBUTE, "saliency")
            for key, value in attributes.items():
                node.SetAttribute(key, value)
            if axt2_node.GetAttribute(CASE_ATTRIBUTE):
                node.SetAttribute(CASE_ATTRIBUTE, axt2_node.GetAttribute(CASE_ATTRIBUTE))
            if item != sh.GetInvalidItemID():
                sh.SetItemParent(_item_of(sh, node), sh.GetItemParent(item))
            result.saliency_node = node
        else:
            result.messages.append(f"{saliency_path.name} was not written; no saliency overlay")
        self.log(f"Classification ({name}): P(csPCa) = {probability:.2f}")
        for message in result.messages:
            self.log(message)
        return result

    # ------------------------------------------------------------------------------------------- sample data
    def ensurePhantomSamples(self, cache_dir: str | Path, n: int = 4, timeout: float = 600) -> Path:
        """Write ``n`` phantom exams (with reports) with ``ccella phantoms`` into ``cache_dir`` once, in a child
        process; nothing is downloaded. Returns the manifest."""
        cache_dir = Path(cache_dir)
        manifest = cache_dir / "manifest.csv"
        if manifest.is_file():
            return manifest
        command = [*python_command(), "-m", "CCELLACore.cli", "phantoms", "--institution", "1", "--n", str(n),
                   "--seed", "0", "--out", str(cache_dir), "--layouts", "none", "--no-progress"]
        self.log(f"Writing {n} phantom exams into {cache_dir} (first use only)...")
        ChildJob(command, _log_path("phantoms")).start().wait(timeout=timeout)
        if not manifest.is_file():
            raise CCELLAError(f"{manifest}: 'ccella phantoms' wrote no manifest")
        return manifest

    def loadPhantomSample(self, cache_dir: str | Path, index: int = 0) -> dict:
        """Load phantom case ``index`` (its report becomes the folder's report attribute)."""
        manifest = self.ensurePhantomSamples(cache_dir)
        cases = self.listCases(manifest)
        if not 0 <= index < len(cases):
            raise ValueError(f"phantom sample {index} does not exist ({len(cases)} cases in {manifest})")
        return self.loadStudyFromManifest(manifest, cases[index])
