"""CCELLA++ Slicer module: generate synthetic biparametric prostate MRI from a report, classify studies.

Thin Slicer layer. The panel's behaviour is ``CCELLAPlusPlusLib/panel.py`` (binding-neutral: the same code drives
the PySide6 widgets of the tests), the scene work is ``CCELLAPlusPlusLib/jobs.py`` and ``scene.py``, the child
processes are ``CCELLAPlusPlusLib/process.py`` + ``CCELLACore.jobs``; the science lives in ``CCELLACore``
(installed next to this file by the extension). Only what needs Slicer is here: dialogs, slice views, sample data
registration and the dependency installer.
"""

from __future__ import annotations

import os
from pathlib import Path

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CCELLAPlusPlusLib import missing_requirements, protected_constraints, read_requirements
from CCELLAPlusPlusLib.jobs import GenerationRequest, JobSceneLogic

HOMEPAGE = "https://github.com/CCELLAPlusPlus/SlicerCCELLAPlusPlus"
#: torch version range asked from PyTorchUtils (matches pyproject.toml).
TORCH_REQUIREMENT = ">=2.8"
#: Packages Slicer ships or PyTorchUtils owns: never installed, upgraded or replaced by this module.
PROTECTED_PACKAGES = ["torch", "torchvision", "SimpleITK", "numpy", "scipy", "vtk"]
#: Three axial views side by side (AxT2 | HighB | ADC), linked.
THREE_SEQUENCE_LAYOUT_ID = 7301
THREE_SEQUENCE_LAYOUT = """
<layout type="horizontal">
""" + "".join(
    f"""  <item><view class="vtkMRMLSliceNode" singletontag="{name}">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">{label}</property>
    <property name="viewcolor" action="default">{color}</property>
  </view></item>
"""
    for name, label, color in (("Red", "R", "#F34A33"), ("Yellow", "Y", "#EDD54C"), ("Green", "G", "#6EB04B"))
) + "</layout>"
VIEWS = {"AxT2": "Red", "HighB": "Yellow", "ADC": "Green"}
#: Colour table of the saliency overlay.
SALIENCY_COLOR_NODE_ID = "vtkMRMLColorTableNodeRainbow"
SAMPLE_CATEGORY = "CCELLA++"
PHANTOM_SAMPLES = 4


def phantomCacheDir() -> Path:
    """Where the phantom sample exams are written on first use (Slicer's cache; "Clear cache" removes them)."""
    return Path(slicer.app.cachePath) / "CCELLAPlusPlus" / "phantoms"


#
# CCELLAPlusPlus
#
class CCELLAPlusPlus(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CCELLA++")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        # PyTorch (PyTorchUtils) is needed only to generate and classify; it is checked on use, not at load.
        self.parent.dependencies = []
        self.parent.contributors = ["CCELLAPlusPlus developers"]
        self.parent.helpText = _(
            "Generate synthetic biparametric prostate MRI (AxT2, HighB, ADC) from a free-text report with a latent "
            "diffusion model, and classify studies for clinically significant cancer. Every generated volume is "
            "marked synthetic. See the <a href=\"{homepage}\">documentation</a>."
        ).format(homepage=HOMEPAGE)
        self.parent.acknowledgementText = _(
            "Implements the CCELLA++ method (report-conditioned latent diffusion for prostate MRI) on MONAI."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Phantom exams (with their reports) as Slicer sample data: written by ``ccella phantoms`` on first click,
    never downloaded (the URI is a placeholder SampleData requires; the custom downloader replaces the download)."""
    import SampleData

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "CCELLAPlusPlus.png")
    for index in range(PHANTOM_SAMPLES):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=f"CCELLAPhantom{index}",
            uris=f"ccella-phantom:{index}",
            fileNames=f"ccella-phantom-{index}",
            thumbnailFileName=icon,
            customDownloader=lambda source, index=index: loadPhantomSample(index),
        )


def loadPhantomSample(index: int) -> dict:
    logic = CCELLAPlusPlusLogic()
    with slicer.util.tryWithErrorDisplay(_("Failed to write or load the phantom exam."), waitCursor=True):
        if not logic.ensureDependencies(askConfirmation=True):
            return {}
        nodes = logic.loadPhantomSample(phantomCacheDir(), index)
        showExam(nodes)
        return nodes
    return {}


# --- Slicer-only display ----------------------------------------------------------------------------------------
def showExam(nodes: dict) -> None:
    """AxT2 | HighB | ADC in three linked axial views (each keeps its own window/level)."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:  # --no-main-window
        return
    layoutNode = layoutManager.layoutLogic().GetLayoutNode()
    if not layoutNode.IsLayoutDescription(THREE_SEQUENCE_LAYOUT_ID):
        layoutNode.AddLayoutDescription(THREE_SEQUENCE_LAYOUT_ID, THREE_SEQUENCE_LAYOUT)
    layoutManager.setLayout(THREE_SEQUENCE_LAYOUT_ID)
    for role, viewName in VIEWS.items():
        node = nodes.get(role)
        sliceWidget = layoutManager.sliceWidget(viewName)
        if node is None or sliceWidget is None:
            continue
        composite = sliceWidget.mrmlSliceCompositeNode()
        composite.SetBackgroundVolumeID(node.GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)
        composite.SetHotLinkedControl(True)
        sliceWidget.mrmlSliceNode().SetOrientation("Axial")
        sliceWidget.sliceLogic().FitSliceToAll()


def showSaliency(axt2Node, saliencyNode) -> None:
    """The saliency volume over AxT2, semi-transparent, in a colour table."""
    display = saliencyNode.GetDisplayNode()
    if display is not None and slicer.mrmlScene.GetNodeByID(SALIENCY_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(SALIENCY_COLOR_NODE_ID)
    slicer.util.setSliceViewerLayers(background=axt2Node, foreground=saliencyNode, foregroundOpacity=0.4, fit=True)


class SlicerHost:
    """The panel's Slicer services (see ``CCELLAPlusPlusLib/panel.py``)."""

    QTimer = qt.QTimer

    def __init__(self, logic: "CCELLAPlusPlusLogic"):
        self.logic = logic

    def choose_file(self, title: str, filters: str) -> str:
        return qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), title, "", filters) or ""

    def choose_directory(self, title: str) -> str:
        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title) or ""

    def confirm(self, message: str) -> bool:
        return bool(slicer.util.confirmYesNoDisplay(message))

    def show_error(self, message: str) -> None:
        slicer.util.errorDisplay(message)

    def open_file(self, path) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    def ensure_dependencies(self) -> bool:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages CCELLA++ needs."), waitCursor=True):
            return self.logic.ensureDependencies(askConfirmation=True)
        return False

    def show_exam(self, nodes: dict) -> None:
        showExam(nodes)

    def show_saliency(self, axt2Node, saliencyNode) -> None:
        showSaliency(axt2Node, saliencyNode)


#
# CCELLAPlusPlusWidget
#
class CCELLAPlusPlusWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui and hands it to :class:`CCELLAPlusPlusLib.panel.CCELLAPanel`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CCELLAPlusPlusLogic | None = None
        self.panel = None

    def setup(self) -> None:
        from CCELLAPlusPlusLib.panel import CCELLAPanel

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CCELLAPlusPlus.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = CCELLAPlusPlusLogic()
        self.panel = CCELLAPanel(self.ui, self.logic, SlicerHost(self.logic), phantom_cache=phantomCacheDir())
        self.logic.logCallback = self.panel.log
        self.panel.setup()
        # The Classify volume lists follow the scene (volumes loaded from DICOM, files or sample data).
        self._refreshPending = False
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent, slicer.mrmlScene.EndCloseEvent):
            self.addObserver(slicer.mrmlScene, event, self.onSceneChanged)
        self.layout.addStretch(1)

    def onSceneChanged(self, *_args) -> None:
        if not self._refreshPending:  # one refresh per burst of node events
            self._refreshPending = True
            qt.QTimer.singleShot(200, self._refresh)

    def _refresh(self) -> None:
        self._refreshPending = False
        if self.panel is not None:
            self.panel.refreshVolumes()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.panel is not None:
            self.panel.timer.stop()
            self.panel.onCancel()  # never leave a child running after the module closes


#
# CCELLAPlusPlusLogic
#
class CCELLAPlusPlusLogic(JobSceneLogic, ScriptedLoadableModuleLogic):
    """Headless logic: no widget access, no popup unless ``askConfirmation``; reports through ``logCallback``.

    Generation, classification, saving and studies come from :class:`CCELLAPlusPlusLib.jobs.JobSceneLogic`
    (tested outside Slicer with slicer-core); :meth:`generate` and :meth:`classify` are the blocking forms for
    scripts (``Slicer --no-main-window --python-script``).
    """

    def __init__(self, logCallback=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        JobSceneLogic.__init__(self, logCallback)

    @staticmethod
    def requirementsPath() -> Path:
        return Path(os.path.dirname(__file__)) / "Resources" / "requirements.txt"

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> dict:
        """Generate one exam and wait for it (the GUI uses ``startGeneration`` and polls instead)."""
        generation = self.startGeneration(request)
        try:
            generation.job.wait(timeout=timeout)
        except Exception:
            generation.cleanup()
            raise
        return self.loadGeneration(generation)

    def classify(self, nodes: dict, modelDir: str, timeout: float | None = None):
        """Classify AxT2/HighB/ADC nodes and wait; returns a ``ClassificationResult``."""
        classification = self.startClassification(nodes, modelDir)
        try:
            classification.job.wait(timeout=timeout)
        except Exception:
            classification.cleanup()
            raise
        return self.loadClassification(classification)

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what generation and classification need, on first use (never at import).

        torch comes only from the PyTorch extension (PyTorchUtils picks the CUDA build); the other packages come
        from ``Resources/requirements.txt`` through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or
        ``slicer.util.pip_install`` after a confirmation (Slicer 5.10), with a constraints file that pins the
        packages Slicer ships to their installed versions so that pip can neither upgrade nor replace them.

        Returns:
            True when everything is installed; False when the user declined.
        """
        requirements = read_requirements(self.requirementsPath())
        if not missing_requirements(["torch" + TORCH_REQUIREMENT]) and not missing_requirements(requirements):
            return True  # already done: no import, no dialog
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("This module needs the PyTorch extension: install it from the Extensions Manager.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log(_("Installing PyTorch through the PyTorch extension..."))
            torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                self.log(_("PyTorch installation declined."))
                return False
        self.log(_("PyTorch {version}").format(version=torchLogic.torch.__version__))

        try:  # Slicer >= 5.12: asks, shows progress, offers a restart, skips under --testing
            from slicer import packaging as slicerPackaging
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None and hasattr(slicerPackaging, "pip_ensure"):
            slicerPackaging.pip_ensure(
                slicerPackaging.load_requirements(str(self.requirementsPath())),
                requester="CCELLAPlusPlus",
                skip_packages=PROTECTED_PACKAGES,
            )
        else:
            missing = missing_requirements(requirements)
            if missing:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("CCELLA++ needs these Python packages, which will be downloaded and installed now:\n{packages}")
                    .format(packages="\n".join(missing))
                ):
                    self.log(_("Installation of {count} package(s) declined.").format(count=len(missing)))
                    return False
                self.log(_("Installing {count} package(s)...").format(count=len(missing)))
                constraints = Path(slicer.util.tempDirectory()) / "ccella-constraints.txt"
                constraints.write_text("\n".join(protected_constraints(PROTECTED_PACKAGES)) + "\n", encoding="utf-8")
                slicer.util.pip_install(["--prefer-binary", "--constraint", str(constraints), *missing])
        stillMissing = missing_requirements(requirements)
        if stillMissing:
            self.log(_("Still missing: {packages}").format(packages=", ".join(stillMissing)))
        return not stillMissing


#
# CCELLAPlusPlusTest
#
class CCELLAPlusPlusTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (``slicer_add_python_unittest``); the same checks run with slicer-core in pytest."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        for test in (self.test_ExamToSceneGeometry, self.test_LoadStudyFromManifest, self.test_GenerateEndToEnd,
                     self.test_CancelLeavesSceneUnchanged, self.test_ClassifyEndToEnd):
            self.setUp()
            test()

    #: Report used by the end-to-end tests (a phantom-world report; the demo model was trained on such reports).
    REPORT = ("MRI prostate. Findings: 15 mm lesion in the left peripheral zone, mid gland, hypointense on T2 with "
              "restricted diffusion. Impression: PI-RADS 4.")

    def test_GenerateEndToEnd(self) -> None:
        """The bundled demo model in a PythonSlicer child (2 steps on the CPU: minutes at most), then the scene."""
        import json

        from CCELLAPlusPlusLib.jobs import PROBABILITY_ATTRIBUTE, SETTINGS_ATTRIBUTE
        from CCELLAPlusPlusLib.scene import REPORT_ATTRIBUTE, SYNTHETIC_ATTRIBUTE

        self.delayDisplay("Generate with the demo model")
        logic = CCELLAPlusPlusLogic()
        if not logic.ensureDependencies(askConfirmation=False):
            self.delayDisplay("Skipped: the Python packages CCELLA++ needs are not installed")
            return
        first = logic.generate(GenerationRequest(report=self.REPORT, steps=2, seed=0, device="cpu"), timeout=1800)
        self.assertEqual(sorted(first["nodes"]), ["ADC", "AxT2", "HighB"])
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(sh.GetItemAttribute(first["folder"], REPORT_ATTRIBUTE), self.REPORT)
        self.assertEqual(json.loads(sh.GetItemAttribute(first["folder"], SETTINGS_ATTRIBUTE))["steps"], 2)
        self.assertTrue(sh.GetItemAttribute(first["folder"], PROBABILITY_ATTRIBUTE))
        for node in first["nodes"].values():
            self.assertEqual(node.GetAttribute(SYNTHETIC_ATTRIBUTE), "true")
        showExam(first["nodes"])
        second = logic.generate(GenerationRequest(report=self.REPORT, steps=2, seed=1, device="cpu"), timeout=1800)
        self.assertNotEqual(second["folder"], first["folder"])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), 6)
        saved = logic.saveExam(second["nodes"], Path(slicer.util.tempDirectory()) / "ccella-saved", "NRRD")
        self.assertEqual(len(saved), 4)
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self) -> None:
        import time

        from CCELLAPlusPlusLib.process import JobFailed

        self.delayDisplay("Cancel a generation")
        logic = CCELLAPlusPlusLogic()
        if not logic.ensureDependencies(askConfirmation=False):
            self.delayDisplay("Skipped: the Python packages CCELLA++ needs are not installed")
            return
        before = slicer.mrmlScene.GetNumberOfNodes()
        generation = logic.startGeneration(GenerationRequest(report=self.REPORT, steps=1000, device="cpu"))
        deadline = time.monotonic() + 600
        while not any(e.kind == "progress" for e in generation.job.poll()):
            self.assertLess(time.monotonic(), deadline)
            slicer.app.processEvents()
            time.sleep(0.05)
        generation.job.cancel()
        with self.assertRaises(JobFailed):
            logic.loadGeneration(generation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertFalse(generation.work_dir.exists())
        self.delayDisplay("Test passed")

    def test_ClassifyEndToEnd(self) -> None:
        """Classify a phantom study with the classifier in $CCELLA_CLASSIFIER_MODEL (none ships yet): without one,
        check that the panel's logic says so plainly instead of failing."""
        from CCELLACore.errors import CCELLAError
        from CCELLAPlusPlusLib.jobs import CLASSIFIER_PROBABILITY_ATTRIBUTE, classifier_status

        self.delayDisplay("Classify a phantom study")
        logic = CCELLAPlusPlusLogic()
        if not logic.ensureDependencies(askConfirmation=False):
            self.delayDisplay("Skipped: the Python packages CCELLA++ needs are not installed")
            return
        nodes = logic.loadPhantomSample(Path(slicer.util.tempDirectory()) / "ccella-phantoms", 0)
        modelDir = os.environ.get("CCELLA_CLASSIFIER_MODEL", "")
        ok, message = classifier_status(modelDir or None)
        if not ok:
            self.assertTrue(message.startswith(("No classifier", "Classifier model folder", modelDir)))
            with self.assertRaises(CCELLAError):
                logic.startClassification(nodes, modelDir)
            self.delayDisplay(f"No classifier model: {message}")
            return
        result = logic.classify(nodes, modelDir, timeout=1800)
        self.assertTrue(0.0 <= result.probability <= 1.0)
        self.assertEqual(nodes["AxT2"].GetAttribute(CLASSIFIER_PROBABILITY_ATTRIBUTE), f"{result.probability:.4f}")
        self.assertIsNotNone(result.saliency_node)
        showSaliency(nodes["AxT2"], result.saliency_node)
        self.delayDisplay("Test passed")

    @staticmethod
    def _obliqueExam():
        import numpy as np

        from CCELLACore.data.study import Exam
        from CCELLACore.data.volume import Volume

        a, b = 0.3, -0.2
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        rng = np.random.default_rng(0)
        grid = dict(spacing=(0.6, 0.8, 3.0), origin=(12.0, -30.0, 5.0), direction=rz @ rx)
        volumes = {
            "AxT2": Volume(rng.random((12, 10, 6)).astype(np.float32) * 500, **grid),
            "ADC": Volume(rng.random((12, 10, 6)).astype(np.float32) * 2500, **grid),
        }
        gland = np.zeros((12, 10, 6), np.uint8)
        gland[3:8, 2:7, 1:4] = 2
        return Exam(volumes=volumes, masks={"gland": Volume(gland, **grid)}, case_id="slicertest")

    def test_ExamToSceneGeometry(self) -> None:
        import numpy as np

        from CCELLAPlusPlusLib.scene import SYNTHETIC_ATTRIBUTE, exam_to_scene, scene_to_exam

        self.delayDisplay("Exam to scene geometry")
        exam = self._obliqueExam()
        nodes = exam_to_scene(exam, "slicertest", synthetic=True)
        for role, volume in [*exam.volumes.items(), *exam.masks.items()]:
            matrix = vtk.vtkMatrix4x4()
            nodes[role].GetIJKToRASMatrix(matrix)
            np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), volume.affine_ras, atol=1e-9)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes[role]), volume.array.transpose(2, 1, 0))
            self.assertEqual(nodes[role].GetAttribute(SYNTHETIC_ATTRIBUTE), "true")
        self.assertTrue(nodes["gland"].IsA("vtkMRMLLabelMapVolumeNode"))
        back = scene_to_exam(nodes)
        for role, volume in exam.volumes.items():
            self.assertTrue(back.volumes[role].same_grid(volume, atol=1e-6))
        self.delayDisplay("Test passed")

    def test_LoadStudyFromManifest(self) -> None:
        import numpy as np

        from CCELLACore.data.manifest import write_manifest
        from CCELLACore.data.study import Study
        from CCELLACore.data.volume import write_volume

        self.delayDisplay("Load study from manifest")
        exam = self._obliqueExam()
        folder = Path(slicer.util.tempDirectory())
        images = {name: write_volume(vol, folder / f"{name}.nrrd") for name, vol in exam.volumes.items()}
        masks = {"gland": write_volume(exam.masks["gland"], folder / "gland.nrrd")}
        manifest = write_manifest([Study("slicertest", "p0", images, masks=masks)], folder / "manifest.csv")
        messages = []
        logic = CCELLAPlusPlusLogic(logCallback=messages.append)
        self.assertEqual(logic.listCases(manifest), ["slicertest"])
        nodes = logic.loadStudyFromManifest(manifest, "slicertest")
        self.assertEqual(sorted(nodes), ["ADC", "AxT2", "gland"])
        matrix = vtk.vtkMatrix4x4()
        nodes["ADC"].GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), exam.volumes["ADC"].affine_ras, atol=1e-5)
        self.assertTrue(any("slicertest" in m for m in messages))
        self.delayDisplay("Test passed")
