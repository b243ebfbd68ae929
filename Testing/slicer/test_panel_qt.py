"""The panel's behaviour in real Qt (PySide6, offscreen) on the real .ui, with a real MRML scene and real child
jobs: buttons enable and disable, progress shows, Cancel leaves the scene unchanged, failures reach the user, and
results are listed. Also renders docs/slicer_panel.png, the README's screenshot, from that same .ui."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

from CCELLAPlusPlusLib.jobs import JobSceneLogic  # noqa: E402
from CCELLAPlusPlusLib.panel import CCELLAPanel  # noqa: E402
from conftest_helpers import REPORT  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "CCELLAPlusPlus" / "Resources" / "UI" / "CCELLAPlusPlus.ui"
SCREENSHOT = REPO / "docs" / "slicer_panel.png"


class Host:
    """What Slicer provides to the panel (dialogs, views, installer), answered without a person."""

    QTimer = QTimer

    def __init__(self):
        self.errors: list[str] = []
        self.confirmations: list[str] = []
        self.confirm_answer = False
        self.shown: list[dict] = []
        self.file_answer = ""
        self.directory_answer = ""
        self.opened: list[Path] = []

    def choose_file(self, title, filters):
        return self.file_answer

    def choose_directory(self, title):
        return self.directory_answer

    def confirm(self, message):
        self.confirmations.append(message)
        return self.confirm_answer

    def show_error(self, message):
        self.errors.append(message)

    def open_file(self, path):
        self.opened.append(Path(path))

    def ensure_dependencies(self):
        return True  # the test environment has them

    def show_exam(self, nodes):
        self.shown.append(nodes)

    def show_saliency(self, axt2, saliency):
        self.shown.append({"saliency": saliency})


class Ui:
    """``slicer.util.childWidgetVariables`` for PySide6: every named widget of the .ui as an attribute."""

    def __init__(self, root):
        self.root = root
        for element in ET.parse(UI_FILE).getroot().iter("widget"):
            name = element.get("name")
            setattr(self, name, root if name == root.objectName() else root.findChild(QtWidgets.QWidget, name))
            assert getattr(self, name) is not None, name


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(slicer.mrmlScene)
    yield slicer.mrmlScene
    colors.SetMRMLScene(None)
    slicer.mrmlScene.Clear(True)


@pytest.fixture
def panel(app, tmp_path):
    root = QUiLoader().load(str(UI_FILE))
    root.resize(440, 960)
    host = Host()
    panel = CCELLAPanel(Ui(root), JobSceneLogic(), host, phantom_cache=tmp_path / "phantoms")
    panel.logic.logCallback = panel.log
    panel.setup()
    root.show()
    yield panel
    panel.onCancel()
    root.close()


def _run_until(app, condition, timeout=300.0):
    """Let the Qt event loop run (the panel's timer polls the child) until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def _volume_count():
    return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


def test_buttons_follow_the_inputs(panel):
    ui = panel.ui
    assert not ui.generateButton.isEnabled() and not ui.cancelButton.isEnabled()  # no report yet
    ui.reportTextEdit.setPlainText(REPORT)
    assert ui.generateButton.isEnabled()
    ui.reportTextEdit.setPlainText("")
    ui.unconditionalCheckBox.setChecked(True)
    assert ui.generateButton.isEnabled() and not ui.reportTextEdit.isEnabled()
    assert not ui.saveButton.isEnabled() and not ui.showLogButton.isEnabled()
    # The bundled demo model's own samplers and defaults, read from the folder (never hard-coded).
    assert ui.samplerComboBox.count() == 1 + len(panel.model_info.samplers) >= 2
    assert ui.samplerComboBox.itemText(0).startswith("model default (")
    assert "demo_model" in ui.modelInfoLabel.text()
    # A folder that is not a model: the panel says why and Generate is off.
    ui.modelPathLineEdit.setText("/no/such/model")
    panel.onModelChanged()
    assert not ui.generateButton.isEnabled() and "model folder not found" in ui.modelInfoLabel.text()
    panel.onUseDemoModel()
    assert ui.generateButton.isEnabled()
    # Classify: no volumes chosen -> disabled; the status names the bundled classifier, or says plainly there is none.
    assert not ui.classifyButton.isEnabled()
    assert ui.classifierStatusLabel.text().startswith(("No classifier", "Classifier: demo_classifier"))
    assert ui.deviceStatusLabel.text()


def test_bad_settings_are_reported_not_run(panel):
    panel.ui.reportTextEdit.setPlainText(REPORT)
    panel.ui.spacingLineEdit.setText("1 2")
    panel.ui.generateButton.click()
    assert panel.generation is None and "spacing must be three" in panel.host.errors[-1]


def test_generate_shows_progress_and_lists_results(app, panel, trained):
    ui = panel.ui
    ui.reportTextEdit.setPlainText(REPORT)
    ui.modelPathLineEdit.setText(str(trained))
    panel.onModelChanged()
    ui.stepsSpinBox.setValue(3)
    ui.deviceComboBox.setCurrentIndex(2)  # CPU
    ui.generateButton.click()
    assert panel.generation is not None
    assert not ui.generateButton.isEnabled() and ui.cancelButton.isEnabled() and not ui.settingsGroupBox.isEnabled()
    bar = []  # every value the progress bar took, with its range: one per sampling step
    ui.progressBar.valueChanged.connect(lambda value: bar.append((value, ui.progressBar.maximum())))
    _run_until(app, lambda: panel.generation is None)
    assert not panel.host.errors, panel.host.errors
    assert [v for v in bar if v[1] == 3] == [(1, 3), (2, 3), (3, 3)]
    assert "Generating (seed 0, device cpu)" in ui.logTextEdit.toPlainText()
    assert ui.resultsListWidget.count() == 1 and "Synthetic exam 1 (seed 0)" in ui.resultsListWidget.item(0).text()
    assert "predicted P(csPCa)" in ui.resultsListWidget.item(0).text()
    assert ui.stageLabel.text().startswith("Done in")
    assert ui.generateButton.isEnabled() and not ui.cancelButton.isEnabled() and ui.saveButton.isEnabled()
    assert sorted(panel.host.shown[-1]) == ["ADC", "AxT2", "HighB"]
    # The Classify lists follow: the new exam's folder fills the three boxes.
    assert ui.studyComboBox.count() == 2
    ui.studyComboBox.setCurrentIndex(1)
    panel.onStudyChosen()
    assert ui.axt2ComboBox.currentText().endswith("AxT2 (synthetic)")
    # Another seed: a second exam beside the first.
    ui.seedSpinBox.setValue(1)
    ui.generateButton.click()
    _run_until(app, lambda: panel.generation is None)
    assert ui.resultsListWidget.count() == 2 and "seed 1" in ui.resultsListWidget.item(1).text()
    assert _volume_count() == 6
    # Save and the log, one click each.
    panel.host.directory_answer = str(trained.parent / "saved_from_panel")
    ui.saveButton.click()
    assert (trained.parent / "saved_from_panel" / "axt2.nii.gz").is_file()
    ui.showLogButton.click()
    assert panel.host.opened and panel.host.opened[-1].is_file()
    _write_screenshot(app, panel)


def _write_screenshot(app, panel):
    """The README's screenshot, from this very panel (a generated exam listed). Rewritten when missing or when
    CCELLA_UPDATE_SCREENSHOT=1; otherwise the committed one must match the panel's size."""
    ui = panel.ui
    ui.modelPathLineEdit.setText("")  # show the bundled model's name, not a test folder
    ui.reportTextEdit.setPlainText(
        "MRI prostate without contrast. Findings: 14 mm lesion in the left peripheral zone, mid gland, markedly "
        "hypointense on T2 with restricted diffusion (PI-RADS 4). Impression: PI-RADS 4, targeted biopsy advised.")
    panel.onModelChanged()
    ui.tabWidget.setCurrentIndex(0)
    app.processEvents()
    image = panel.ui.root.grab().toImage()
    if not SCREENSHOT.is_file() or os.environ.get("CCELLA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert image.save(str(SCREENSHOT))
    from PySide6.QtGui import QImage

    committed = QImage(str(SCREENSHOT))
    assert (committed.width(), committed.height()) == (image.width(), image.height()), (
        "docs/slicer_panel.png is out of date: rerun with CCELLA_UPDATE_SCREENSHOT=1")


def test_cancel_stops_the_child_and_leaves_the_scene_unchanged(app, panel, trained):
    ui = panel.ui
    ui.reportTextEdit.setPlainText(REPORT)
    ui.modelPathLineEdit.setText(str(trained))
    panel.onModelChanged()
    ui.stepsSpinBox.setValue(1000)  # far more than the test waits for
    ui.deviceComboBox.setCurrentIndex(2)
    before = _volume_count()
    ui.generateButton.click()
    generation = panel.generation
    _run_until(app, lambda: ui.stageLabel.text().startswith("Sampling: step"))
    ui.cancelButton.click()
    _run_until(app, lambda: panel.generation is None, timeout=30)
    assert ui.stageLabel.text().startswith("Cancelled") and not panel.host.errors
    assert _volume_count() == before and ui.resultsListWidget.count() == 0
    assert generation.job.process.poll() is not None and not generation.work_dir.exists()
    assert ui.generateButton.isEnabled() and not ui.cancelButton.isEnabled()


def test_cuda_failure_offers_the_cpu(app, panel, trained):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ui = panel.ui
    ui.unconditionalCheckBox.setChecked(True)
    ui.modelPathLineEdit.setText(str(trained))
    panel.onModelChanged()
    ui.stepsSpinBox.setValue(2)
    ui.deviceComboBox.setCurrentIndex(1)  # CUDA, which this machine lacks
    panel.host.confirm_answer = False
    ui.generateButton.click()
    _run_until(app, lambda: panel.generation is None)
    assert "Run on the CPU instead?" in panel.host.confirmations[-1]
    assert "CUDA is not available" in panel.host.errors[-1] and "Log: " in panel.host.errors[-1]
    assert ui.resultsListWidget.count() == 0 and ui.stageLabel.text().startswith("Failed")
    # Yes: the same request runs again on the CPU.
    panel.host.confirm_answer = True
    ui.generateButton.click()
    _run_until(app, lambda: panel.generation is None and ui.resultsListWidget.count() == 1)
    assert ui.deviceComboBox.currentText() == "CPU" and len(panel.host.errors) == 1
