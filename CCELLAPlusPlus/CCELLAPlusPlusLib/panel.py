"""The Generate / Classify / Study panel's behaviour, independent of the Qt binding.

The same class drives the widgets Slicer builds from ``Resources/UI/CCELLAPlusPlus.ui`` (PythonQt) and the ones
PySide6's ``QUiLoader`` builds from the same file in the tests. It only calls methods both bindings share (PythonQt
turns Qt properties into attributes, PySide6 keeps getter methods: :func:`_get` reads either). Everything only
Slicer has -- dialogs, views, the dependency installer -- comes from a ``host`` object:

- ``host.QTimer``: the binding's timer class (polls the child job every 100 ms);
- ``host.choose_file(title, filters)``, ``host.choose_directory(title)``: a path, or "" when cancelled;
- ``host.confirm(message) -> bool``, ``host.show_error(message)``, ``host.open_file(path)``;
- ``host.ensure_dependencies() -> bool``: install what generation needs, on first use (Slicer: PyTorchUtils and
  pip_ensure; False when the user declines);
- ``host.show_exam(nodes)``, ``host.show_saliency(axt2_node, saliency_node)``: linked slice views (Slicer only).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

from CCELLACore.data.study import SEQUENCES
from CCELLACore.errors import CCELLAError

from .jobs import GenerationRequest, JobSceneLogic, classifier_status
from .process import JobFailed
from .scene import REPORT_ATTRIBUTE

__all__ = ["CCELLAPanel", "format_duration", "parse_spacing", "gpu_summary", "POLL_INTERVAL_MS", "DEVICES"]

POLL_INTERVAL_MS = 100
#: Device combo box rows -> the job's --device value.
DEVICES = ("auto", "cuda", "cpu")


def _get(widget, name: str):
    value = getattr(widget, name)
    return value() if callable(value) else value


def _connect(widget, signal: str, signature: str, slot) -> None:
    bound = getattr(widget, signal, None)
    if bound is not None and hasattr(bound, "connect"):
        bound.connect(slot)
    else:  # older PythonQt: string signatures only
        widget.connect(signature, slot)


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1 min 15 s"``; None -> ``""``."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def parse_spacing(text: str) -> tuple[float, float, float] | None:
    """``"0.5 0.5 3"`` (spaces, commas or x) -> (0.5, 0.5, 3.0); empty -> None (the model's spacing)."""
    cleaned = text.replace(",", " ").replace("x", " ").replace("×", " ").split()
    if not cleaned:
        return None
    try:
        values = tuple(float(v) for v in cleaned)
    except ValueError:
        raise ValueError(f"spacing must be three numbers in mm, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing must be three positive numbers in mm, got {text!r}")
    return values  # type: ignore[return-value]


def gpu_summary(timeout: float = 5.0) -> str:
    """One line about the NVIDIA GPUs from ``nvidia-smi`` (no torch needed), for the device choice."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "No NVIDIA GPU found: generation runs on the CPU (slower)."
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi did not answer: Auto checks the GPU when generation starts."
    lines = []
    for row in out.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) == 3:
            name, free, total = parts[0], float(parts[1]) / 1024, float(parts[2]) / 1024
            lines.append(f"{name}: {free:.1f} GiB free of {total:.1f} GiB")
    if not lines:
        return "No NVIDIA GPU found: generation runs on the CPU (slower)."
    return "GPU " + "; ".join(lines) + ". Free memory is checked again before each run; Auto falls back to the CPU."


class CCELLAPanel:
    """Behaviour of the CCELLA++ panel.

    Args:
        ui: an object whose attributes are the .ui's named widgets (``slicer.util.childWidgetVariables`` or
            :func:`ui_namespace` for PySide6).
        logic: the headless scene logic (:class:`~.jobs.JobSceneLogic`).
        host: Slicer-only services (see the module docstring).
        phantom_cache: where "Phantom examples" writes its exams.
    """

    def __init__(self, ui, logic: JobSceneLogic, host, phantom_cache: str | Path | None = None):
        self.ui, self.logic, self.host = ui, logic, host
        self.phantom_cache = Path(phantom_cache) if phantom_cache else None
        self.generation = None
        self.classification = None
        self.results: list[dict] = []
        self.model_info = None
        self.model_error = ""
        self.last_log: Path | None = None
        self._sampler_choices: list[str | None] = [None]
        self._volume_choices: list = []
        self._study_choices: list[int] = []
        self._loaded_study_report = ""
        self._started = 0.0
        self.timer = host.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        _connect(self.timer, "timeout", "timeout()", self.onPoll)

    # ------------------------------------------------------------------------------------------- wiring
    def setup(self) -> None:
        ui = self.ui
        for name, slot in [
            ("loadReportButton", self.onLoadReport), ("modelBrowseButton", self.onBrowseModel),
            ("modelDemoButton", self.onUseDemoModel), ("generateButton", self.onGenerate),
            ("cancelButton", self.onCancel), ("saveButton", self.onSave), ("showLogButton", self.onShowLog),
            ("classifierBrowseButton", self.onBrowseClassifier), ("refreshVolumesButton", self.refreshVolumes),
            ("classifyButton", self.onClassify), ("classifyCancelButton", self.onCancel),
            ("manifestBrowseButton", self.onBrowseManifest), ("loadStudyButton", self.onLoadStudy),
            ("phantomSamplesButton", self.onPhantomSamples), ("copyReportButton", self.onCopyStudyReport),
        ]:
            _connect(getattr(ui, name), "clicked", "clicked(bool)", lambda *_a, s=slot: s())
        _connect(ui.unconditionalCheckBox, "toggled", "toggled(bool)", lambda *_a: self.updateButtons())
        _connect(ui.reportTextEdit, "textChanged", "textChanged()", lambda *_a: self.updateButtons())
        _connect(ui.modelPathLineEdit, "editingFinished", "editingFinished()", lambda *_a: self.onModelChanged())
        _connect(ui.resultsListWidget, "currentRowChanged", "currentRowChanged(int)", lambda *_a: self.updateButtons())
        _connect(ui.classifierPathLineEdit, "editingFinished", "editingFinished()", lambda *_a: self.updateButtons())
        _connect(ui.studyComboBox, "activated", "activated(int)", lambda *_a: self.onStudyChosen())
        for combo in (ui.axt2ComboBox, ui.highbComboBox, ui.adcComboBox):
            _connect(combo, "currentIndexChanged", "currentIndexChanged(int)", lambda *_a: self.updateButtons())
        _connect(ui.caseComboBox, "currentIndexChanged", "currentIndexChanged(int)", lambda *_a: self.updateButtons())
        _connect(ui.manifestPathLineEdit, "editingFinished", "editingFinished()", lambda *_a: self.onManifestChanged())
        ui.deviceStatusLabel.setText(gpu_summary())
        self.onModelChanged()
        self.refreshVolumes()
        self.updateButtons()

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        return self.generation is not None or self.classification is not None

    def updateButtons(self) -> None:
        ui = self.ui
        generating = self.generation is not None
        unconditional = bool(ui.unconditionalCheckBox.isChecked())
        has_report = bool(ui.reportTextEdit.toPlainText().strip())
        ui.generateButton.setEnabled(not self.busy and not self.model_error and (unconditional or has_report))
        ui.generateButton.setToolTip(self.model_error or "Generate one synthetic exam in a background process.")
        ui.cancelButton.setEnabled(generating)
        ui.reportTextEdit.setEnabled(not generating and not unconditional)
        for name in ("loadReportButton", "unconditionalCheckBox", "settingsGroupBox", "modelGroupBox"):
            getattr(ui, name).setEnabled(not generating)
        ui.saveButton.setEnabled(not generating and _get(ui.resultsListWidget, "currentRow") >= 0 and bool(self.results))
        ui.showLogButton.setEnabled(self.last_log is not None)
        ok, message = classifier_status(_get(ui.classifierPathLineEdit, "text").strip() or None)
        ui.classifierStatusLabel.setText(message)
        chosen = all(self._chosen_volume(role) is not None for role in SEQUENCES)
        ui.classifyButton.setEnabled(ok and chosen and not self.busy)
        ui.classifyButton.setToolTip(message if not ok else ("Choose AxT2, HighB and ADC." if not chosen else
                                                              "Run the classifier in a background process."))
        ui.classifyCancelButton.setEnabled(self.classification is not None)
        ui.loadStudyButton.setEnabled(_get(ui.caseComboBox, "count") > 0 and not self.busy)
        ui.copyReportButton.setEnabled(bool(self._loaded_study_report) and not generating)

    # ------------------------------------------------------------------------------------------- model
    def onBrowseModel(self) -> None:
        path = self.host.choose_directory("Model folder")
        if path:
            self.ui.modelPathLineEdit.setText(path)
            self.onModelChanged()

    def onUseDemoModel(self) -> None:
        self.ui.modelPathLineEdit.setText("")
        self.onModelChanged()

    def _model_dir(self) -> Path:
        from CCELLACore.pipelines.generate_cli import DEMO_MODEL_DIR

        text = _get(self.ui.modelPathLineEdit, "text").strip()
        return Path(text) if text else DEMO_MODEL_DIR

    def onModelChanged(self) -> None:
        """Read the model folder's choices: samplers it supports and its defaults (never hard-coded here)."""
        from CCELLACore.jobs.model_info import read_model_info

        ui = self.ui
        try:
            info = read_model_info(self._model_dir())
        except CCELLAError as exc:
            self.model_info, self.model_error = None, str(exc)
            ui.modelInfoLabel.setText(str(exc))
            self.updateButtons()
            return
        self.model_info, self.model_error = info, ""
        default = info.default_sampler or "the model's own"
        self._sampler_choices = [None, *info.samplers]
        ui.samplerComboBox.clear()
        ui.samplerComboBox.addItem(f"model default ({default})")
        for name in info.samplers:
            ui.samplerComboBox.addItem(name)
        if not info.samplers:
            ui.samplerComboBox.setToolTip("The samplers are listed once PyTorch is installed (first Generate).")
        ui.stepsSpinBox.setSpecialValueText(f"model default ({info.default_steps})" if info.default_steps
                                            else "model default")
        if info.max_steps:
            ui.stepsSpinBox.setMaximum(info.max_steps)
        ui.guidanceSpinBox.setSpecialValueText(f"model default ({info.default_guidance:g})"
                                               if info.default_guidance is not None else "model default")
        ui.spacingLineEdit.setPlaceholderText("model default: " + " x ".join(f"{s:g}" for s in info.spacing))
        ui.modelInfoLabel.setText(info.describe() + (f"; model hash {info.model_hash[:12]}" if info.model_hash else ""))
        self.updateButtons()

    # ------------------------------------------------------------------------------------------- generate
    def onLoadReport(self) -> None:
        from CCELLACore.reports import read_report_file

        path = self.host.choose_file("Report", "Text files (*.txt);;All files (*)")
        if not path:
            return
        try:
            self.ui.reportTextEdit.setPlainText(read_report_file(path))
        except CCELLAError as exc:
            self.host.show_error(str(exc))
            return
        self.log(f"Report loaded from {Path(path).name}")

    def request(self) -> GenerationRequest:
        """The settings as a :class:`GenerationRequest` (0 steps / 0 guidance = the model's default)."""
        ui = self.ui
        steps = int(_get(ui.stepsSpinBox, "value"))
        guidance = float(_get(ui.guidanceSpinBox, "value"))
        text = _get(ui.modelPathLineEdit, "text").strip()
        return GenerationRequest(
            report=ui.reportTextEdit.toPlainText(),
            unconditional=bool(ui.unconditionalCheckBox.isChecked()),
            model_dir=text or None,
            sampler=self._sampler_choices[max(0, _get(ui.samplerComboBox, "currentIndex"))]
            if self._sampler_choices else None,
            steps=steps or None,
            seed=int(_get(ui.seedSpinBox, "value")),
            guidance=guidance or None,
            spacing=parse_spacing(_get(ui.spacingLineEdit, "text")),
            device=DEVICES[max(0, _get(ui.deviceComboBox, "currentIndex"))],
        )

    def onGenerate(self) -> None:
        if self.busy:
            return
        try:
            request = self.request()
            request.validate()
        except ValueError as exc:
            self.host.show_error(str(exc))
            return
        if not self.host.ensure_dependencies():
            self.log("Generation needs PyTorch and a few Python packages; installation was declined.")
            return
        self.startGeneration(request)

    def startGeneration(self, request: GenerationRequest) -> None:
        ui = self.ui
        try:
            self.generation = self.logic.startGeneration(request)
        except (ValueError, CCELLAError, OSError) as exc:
            self.host.show_error(str(exc))
            return
        self.last_log = self.generation.job.log_path
        self._started = time.monotonic()
        ui.progressBar.setRange(0, 0)  # busy until the first step
        ui.stageLabel.setText("Starting...")
        self.log(f"Generating (seed {request.seed}, device {request.device})")
        self.updateButtons()
        self.timer.start()

    def onCancel(self) -> None:
        job = self.generation or self.classification
        if job is not None:
            job.job.cancel()
            self.log("Cancelling...")

    def _show_event(self, event, bar, label) -> None:
        if event.kind == "stage":
            label.setText(event.get("label", event.get("stage", "")))
            if event.get("stage") != "sample":
                bar.setRange(0, 0)
        elif event.kind == "progress":
            total, step = int(event.get("total", 0)), int(event.get("step", 0))
            bar.setRange(0, max(total, 1))
            bar.setValue(step)
            left = format_duration(event.get("eta"))
            label.setText(f"Sampling: step {step} of {total}" + (f", about {left} left" if left else ""))
        elif event.kind in ("log", "error") and event.message:
            self.log(event.message)

    def onPoll(self) -> None:
        """Timer tick: show new events; load the result (or report the failure) once the child is done."""
        if self.generation is not None:
            job = self.generation.job
            for event in job.poll():
                self._show_event(event, self.ui.progressBar, self.ui.stageLabel)
            if job.finished:
                self.timer.stop()
                self.onGenerationFinished()
        elif self.classification is not None:
            job = self.classification.job
            for event in job.poll():
                if event.kind == "log" and event.message:
                    self.log(event.message)
            if job.finished:
                self.timer.stop()
                self.onClassificationFinished()
        else:
            self.timer.stop()

    def onGenerationFinished(self) -> None:
        ui, generation = self.ui, self.generation
        self.generation = None
        try:
            loaded = self.logic.loadGeneration(generation)
        except JobFailed as exc:
            ui.progressBar.setRange(0, 1)
            ui.progressBar.setValue(0)
            if exc.kind == "cancelled":
                ui.stageLabel.setText("Cancelled; the scene is unchanged.")
                self.log("Generation cancelled; the scene is unchanged.")
            else:
                ui.stageLabel.setText(f"Failed: {exc}")
                self.log(f"Generation failed: {exc}")
                if exc.kind in ("gpu_memory", "no_cuda") and generation.request.device != "cpu" and \
                        self.host.confirm(f"{exc}\n\n{exc.hint}\n\nRun on the CPU instead?"):
                    ui.deviceComboBox.setCurrentIndex(DEVICES.index("cpu"))
                    generation.request.device = "cpu"
                    self.updateButtons()
                    self.startGeneration(generation.request)
                    return
                self.host.show_error("Generation failed.\n\n" + generation.job.failure_message(exc))
            self.updateButtons()
            return
        except (CCELLAError, OSError, ValueError) as exc:
            ui.stageLabel.setText(f"Failed: {exc}")
            self.host.show_error(f"The generated files could not be loaded: {exc}\nLog: {generation.job.log_path}")
            self.updateButtons()
            return
        self.results.append(loaded)
        probability = loaded["probability"]
        shown = "" if math.isnan(probability) else f", predicted P(csPCa) {probability:.2f}"
        ui.resultsListWidget.addItem(f"{loaded['name']}{shown}")
        ui.resultsListWidget.setCurrentRow(len(self.results) - 1)
        ui.progressBar.setRange(0, 1)
        ui.progressBar.setValue(1)
        ui.stageLabel.setText(f"Done in {format_duration(time.monotonic() - self._started)}: {loaded['name']}")
        self.host.show_exam(loaded["nodes"])
        self.refreshVolumes()
        self.updateButtons()

    def onSave(self) -> None:
        row = _get(self.ui.resultsListWidget, "currentRow")
        if not 0 <= row < len(self.results):
            return
        folder = self.host.choose_directory("Save the exam into")
        if not folder:
            return
        fmt = _get(self.ui.saveFormatComboBox, "currentText")
        try:
            files = self.logic.saveExam(self.results[row]["nodes"], folder, fmt)
        except (OSError, CCELLAError, ValueError) as exc:
            self.host.show_error(f"Saving failed: {exc}")
            return
        self.log(f"Saved {len(files)} file(s) to {folder}")

    def onShowLog(self) -> None:
        if self.last_log is not None:
            self.host.open_file(self.last_log)

    # ------------------------------------------------------------------------------------------- classify
    def onBrowseClassifier(self) -> None:
        path = self.host.choose_directory("Classifier model folder")
        if path:
            self.ui.classifierPathLineEdit.setText(path)
            self.updateButtons()

    def refreshVolumes(self) -> None:
        """List the scene's volumes and study folders again, keeping what was chosen."""
        ui = self.ui
        keep = {role: self._chosen_volume(role) for role in SEQUENCES}
        self._volume_choices = [None, *self.logic.volumeNodes()]
        for role, combo in self._role_combos().items():
            combo.clear()
            combo.addItem("(choose a volume)")
            for node in self._volume_choices[1:]:
                combo.addItem(node.GetName())
            if keep[role] is not None and keep[role] in self._volume_choices:
                combo.setCurrentIndex(self._volume_choices.index(keep[role]))
        ui.studyComboBox.clear()
        ui.studyComboBox.addItem("(choose a study)")
        self._study_choices = []
        for item, name in self.logic.studyFolders():
            self._study_choices.append(item)
            ui.studyComboBox.addItem(name)
        self.updateButtons()

    def _role_combos(self) -> dict:
        return {"AxT2": self.ui.axt2ComboBox, "HighB": self.ui.highbComboBox, "ADC": self.ui.adcComboBox}

    def _chosen_volume(self, role: str):
        index = _get(self._role_combos()[role], "currentIndex")
        return self._volume_choices[index] if 0 < index < len(self._volume_choices) else None

    def chooseVolumes(self, nodes: dict) -> None:
        """Select these nodes (role -> node) in the AxT2 / HighB / ADC boxes."""
        for role, node in nodes.items():
            if role in SEQUENCES and node in self._volume_choices:
                self._role_combos()[role].setCurrentIndex(self._volume_choices.index(node))
        self.updateButtons()

    def onStudyChosen(self) -> None:
        index = _get(self.ui.studyComboBox, "currentIndex") - 1
        if 0 <= index < len(self._study_choices):
            self.chooseVolumes(self.logic.studyVolumes(self._study_choices[index]))

    def onClassify(self) -> None:
        if self.busy:
            return
        nodes = {role: self._chosen_volume(role) for role in SEQUENCES}
        model_dir = _get(self.ui.classifierPathLineEdit, "text").strip()
        if not self.host.ensure_dependencies():
            return
        try:
            self.classification = self.logic.startClassification(nodes, model_dir)
        except (ValueError, CCELLAError, OSError) as exc:
            self.host.show_error(str(exc))
            return
        self.last_log = self.classification.job.log_path
        self.ui.classifyProgressBar.setRange(0, 0)
        self.ui.classifyResultLabel.setText("Classifying...")
        self.updateButtons()
        self.timer.start()

    def onClassificationFinished(self) -> None:
        ui, classification = self.ui, self.classification
        self.classification = None
        ui.classifyProgressBar.setRange(0, 1)
        try:
            result = self.logic.loadClassification(classification)
        except JobFailed as exc:
            ui.classifyProgressBar.setValue(0)
            ui.classifyResultLabel.setText("Cancelled." if exc.kind == "cancelled" else f"Failed: {exc}")
            if exc.kind != "cancelled":
                self.host.show_error("Classification failed.\n\n" + classification.job.failure_message(exc))
            self.updateButtons()
            return
        except (CCELLAError, OSError) as exc:
            ui.classifyResultLabel.setText(f"Failed: {exc}")
            self.host.show_error(f"The classifier's result could not be read: {exc}")
            self.updateButtons()
            return
        self.showClassification(result, classification.axt2_node)

    def showClassification(self, result, axt2_node) -> None:
        ui = self.ui
        ui.classifyProgressBar.setValue(1)
        short_hash = f", {result.model_hash[:12]}" if result.model_hash else ""
        ui.classifyResultLabel.setText(
            f"P(clinically significant cancer) = {result.probability:.2f}\nModel: {result.model_name}{short_hash}"
            + "".join(f"\n{m}" for m in result.messages))
        if result.saliency_node is not None:
            self.host.show_saliency(axt2_node, result.saliency_node)
        self.refreshVolumes()
        self.updateButtons()

    # ------------------------------------------------------------------------------------------- study
    def onBrowseManifest(self) -> None:
        path = self.host.choose_file("Manifest", "Manifest (*.csv)")
        if path:
            self.ui.manifestPathLineEdit.setText(path)
            self.onManifestChanged()

    def onManifestChanged(self) -> None:
        ui = self.ui
        ui.caseComboBox.clear()
        path = _get(ui.manifestPathLineEdit, "text").strip()
        if path and Path(path).is_file():
            try:
                cases = self.logic.listCases(path)
            except CCELLAError as exc:
                self.host.show_error(str(exc))
                cases = []
            for case in cases:
                ui.caseComboBox.addItem(case)
            self.log(f"{len(cases)} case(s) in {Path(path).name}")
        self.updateButtons()

    def onPhantomSamples(self) -> None:
        if self.phantom_cache is None or not self.host.ensure_dependencies():
            return
        try:
            manifest = self.logic.ensurePhantomSamples(self.phantom_cache)
        except (JobFailed, CCELLAError) as exc:
            self.host.show_error(f"Could not write the phantom exams: {exc}")
            return
        self.ui.manifestPathLineEdit.setText(str(manifest))
        self.onManifestChanged()

    def onLoadStudy(self) -> None:
        path = _get(self.ui.manifestPathLineEdit, "text").strip()
        case = _get(self.ui.caseComboBox, "currentText")
        if not self.host.ensure_dependencies():  # NIfTI reading needs nibabel
            return
        try:
            nodes = self.logic.loadStudyFromManifest(path, case)
        except (CCELLAError, OSError, ValueError) as exc:
            self.host.show_error(f"Failed to load the study: {exc}")
            return
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folder = sh.GetItemParent(sh.GetItemByDataNode(next(iter(nodes.values()))))
        self._loaded_study_report = sh.GetItemAttribute(folder, REPORT_ATTRIBUTE) or ""
        self.host.show_exam({k: v for k, v in nodes.items() if k in SEQUENCES})
        self.refreshVolumes()
        self.chooseVolumes(nodes)

    def onCopyStudyReport(self) -> None:
        if self._loaded_study_report:
            self.ui.unconditionalCheckBox.setChecked(False)
            self.ui.reportTextEdit.setPlainText(self._loaded_study_report)
            self.ui.tabWidget.setCurrentIndex(0)
