"""CCELLA++ Slicer module: load biparametric prostate MRI studies (real or synthetic) from a CCELLA manifest.

Thin Qt panel over a headless logic. All conversion between CCELLACore exams and MRML nodes lives in
``CCELLAPlusPlusLib/scene.py``; the science lives in ``CCELLACore`` (installed next to this file by the extension).
"""

from __future__ import annotations

import os
from pathlib import Path

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

from CCELLAPlusPlusLib import missing_requirements, read_requirements
from CCELLAPlusPlusLib.scene import StudySceneLogic

HOMEPAGE = "https://github.com/CCELLAPlusPlus/SlicerCCELLAPlusPlus"
#: torch version range asked from PyTorchUtils (matches pyproject.toml).
TORCH_REQUIREMENT = ">=2.8"


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
            "Report-conditioned synthesis of biparametric prostate MRI (AxT2, HighB, ADC) and csPCa classification. "
            "Load a study from a CCELLA manifest to view it with correct geometry; synthetic volumes are labelled as "
            "such. See the <a href=\"{homepage}\">documentation</a>."
        ).format(homepage=HOMEPAGE)
        self.parent.acknowledgementText = _(
            "Implements the CCELLA++ method (report-conditioned latent diffusion for prostate MRI) on MONAI."
        )


#
# CCELLAPlusPlusWidget
#
class CCELLAPlusPlusWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: every action calls the logic inside ``tryWithErrorDisplay``."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CCELLAPlusPlusLogic | None = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CCELLAPlusPlus.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CCELLAPlusPlusLogic(logCallback=self.addLog)

        self.ui.manifestPathLineEdit.nameFilters = [_("Manifest") + " (*.csv)"]
        self.ui.manifestPathLineEdit.connect("currentPathChanged(QString)", self.onManifestChanged)
        self.ui.caseComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.ui.loadStudyButton.connect("clicked(bool)", self.onLoadStudy)

        self.layout.addStretch(1)
        # The path line edit restores its last path from settings (settingKey): list its cases.
        self.onManifestChanged(self.ui.manifestPathLineEdit.currentPath)

    def cleanup(self) -> None:
        self.removeObservers()

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def updateButtons(self, *_args) -> None:
        self.ui.loadStudyButton.enabled = self.ui.caseComboBox.count > 0 and self.ui.caseComboBox.currentIndex >= 0

    def onManifestChanged(self, path: str) -> None:
        self.ui.caseComboBox.clear()
        if path and os.path.isfile(path):
            with slicer.util.tryWithErrorDisplay(_("Failed to read the manifest."), waitCursor=True):
                cases = self.logic.listCases(path)
                self.ui.caseComboBox.addItems(cases)
                self.addLog(_("{count} case(s) in {file}").format(count=len(cases), file=Path(path).name))
        self.updateButtons()

    def onLoadStudy(self) -> None:
        path = self.ui.manifestPathLineEdit.currentPath
        caseId = self.ui.caseComboBox.currentText
        with slicer.util.tryWithErrorDisplay(_("Failed to load the study."), waitCursor=True):
            nodes = self.logic.loadStudyFromManifest(path, caseId)
            background = nodes.get("AxT2") or next(iter(nodes.values()))
            label = nodes.get("lesion") or nodes.get("gland")
            slicer.util.setSliceViewerLayers(background=background, label=label, fit=True, rotateToVolumePlane=True)


#
# CCELLAPlusPlusLogic
#
class CCELLAPlusPlusLogic(StudySceneLogic, ScriptedLoadableModuleLogic):
    """Headless logic: no widget access, no popup unless ``askConfirmation``; reports through ``logCallback``.

    ``loadStudyFromManifest(manifestPath, caseId)`` and ``listCases(manifestPath)`` come from
    :class:`CCELLAPlusPlusLib.scene.StudySceneLogic` (tested outside Slicer with slicer-core).
    """

    def __init__(self, logCallback=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        StudySceneLogic.__init__(self, logCallback)

    @staticmethod
    def requirementsPath() -> Path:
        return Path(os.path.dirname(__file__)) / "Resources" / "requirements.txt"

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what generation and classification need, on first use (never at import).

        torch comes only from the PyTorch extension (PyTorchUtils picks the CUDA build); the other packages come
        from ``Resources/requirements.txt`` through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or
        ``slicer.util.pip_install`` after a confirmation (Slicer 5.10).

        Returns:
            True when everything is installed; False when the user declined.
        """
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

        requirements = read_requirements(self.requirementsPath())
        # Never let pip replace Slicer's own SimpleITK/numpy or the torch build chosen by PyTorchUtils.
        protected = ["torch", "torchvision", "SimpleITK", "numpy"]
        try:  # Slicer >= 5.12: asks, shows progress, offers a restart, skips under --testing
            from slicer import packaging as slicerPackaging
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None and hasattr(slicerPackaging, "pip_ensure"):
            slicerPackaging.pip_ensure(
                slicerPackaging.load_requirements(str(self.requirementsPath())),
                requester="CCELLAPlusPlus",
                skip_packages=protected,
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
                slicer.util.pip_install(["--prefer-binary", *missing])
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
        self.setUp()
        self.test_ExamToSceneGeometry()
        self.setUp()
        self.test_LoadStudyFromManifest()

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
