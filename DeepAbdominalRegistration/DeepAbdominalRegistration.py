"""3D Slicer module: deep-learning deformable registration of abdominal CT (the engine is ``dareg``)."""

import tempfile
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from DeepAbdominalRegistrationLib import dependencies, layout
from DeepAbdominalRegistrationLib.process import ProcessStatus
from DeepAbdominalRegistrationLib.request import RegistrationRequest, validate
from DeepAbdominalRegistrationLib.run import RegistrationRun
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_FOLDER = Path(__file__).resolve().parent
REQUIREMENTS_FILE = MODULE_FOLDER / "Resources" / "requirements.txt"


#
# DeepAbdominalRegistration
#


class DeepAbdominalRegistration(ScriptedLoadableModule):
    """Module metadata; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Abdominal Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepAbdominalRegistration developers"]
        self.parent.helpText = _("""
Deformable registration of two abdominal CT scans of the same patient (liver surgery planning) with a
deep-learning model, optionally refined by instance optimisation and compared with ANTs SyN.
<p>Select the fixed and moving volumes and, ideally, their segmentations with a liver segment (the
liver drives the region of interest and the initial alignment; other segments present in both, or the
listed vessel segments, guide the optimisation and are evaluated). Register runs in a background
process; the panel stays usable and Register turns into Cancel.</p>
<p>Results: a grid transform (a resampling transform fixed &rarr; moving, Slicer's "FromParent"
direction, the ITK/ANTs convention; linear interpolation as in the engine) that is applied to the moving
volume so it displays aligned without being resampled; the moving volume and segmentation resampled into
the fixed volume's grid as new nodes; a table of DSC / HD95 / centroid TRE per segment, landmark TRE,
folding and runtime before and after registration (and for ANTs SyN); and a side-by-side compare layout.</p>
<p>The same engine runs from the command line: <code>dareg register --help</code>.</p>
""")
        self.parent.acknowledgementText = _("""
This module re-implements and extends the method of: J. P&eacute;rez de Frutos, A. Pedersen,
E. Pelanis, D. Bouget, S. Survarachakan, T. Lang&oslash;, O.-J. Elle, F. Lindseth. <i>Learning deep
abdominal CT registration through adaptive loss weighting and synthetic data generation.</i>
PLOS ONE 18(2): e0282110, 2023 (the DDMR framework). Registration baseline: ANTs SyN (antspyx).
""")


#
# DeepAbdominalRegistrationParameterNode
#


@parameterNodeWrapper
class DeepAbdominalRegistrationParameterNode:
    """The module's parameters; the .ui binds each to its widget by SlicerParameterName.

    liverSegmentName - segment that drives the region of interest (same name in both, any case).
    vesselSegmentNames - comma-separated segments that guide optimisation; empty = every shared segment.
    model - "default", "none", a bundled model name or a model folder.
    device - "auto", "cpu" or "gpu".
    optimizeSteps - instance-optimisation steps (0 = network only).
    roiMarginMm - margin around the liver masks of the region that is registered.
    runAntsComparison - also run ANTs SyN and show both in the results table.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    liverSegmentName: str = "liver"
    vesselSegmentNames: str = ""
    model: str = "default"
    device: str = "auto"
    optimizeSteps: Annotated[int, WithinRange(0, 500)] = 50
    roiMarginMm: Annotated[float, WithinRange(0.0, 100.0)] = 40.0
    runAntsComparison: bool = False
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode


#
# DeepAbdominalRegistrationWidget
#


class ProcessingState(IntEnum):
    """What the panel is doing; decides the Register/Cancel button and which sections are editable."""

    IDLE = 0
    INSTALLING = 1
    RUNNING = 2
    CANCELLING = 3


MAX_LOG_LINES = 5000
POLL_INTERVAL_MS = 200


class DeepAbdominalRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._state = ProcessingState.IDLE
        self._run = None
        self._dependenciesChecked = set()  # runAntsComparison values already checked this session
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepAbdominalRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepAbdominalRegistrationLogic()
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItems(self.logic.availableModels())
        self.ui.logTextEdit.setMaximumBlockCount(MAX_LOG_LINES)
        self.ui.progressBar.setRange(0, 100)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.showCompareLayoutButton.connect("clicked(bool)", self.onShowCompareLayoutButton)

        self.initializeParameterNode()
        self._setState(ProcessingState.IDLE)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._timer.stop()
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: DeepAbdominalRegistrationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable Register only for a runnable request; the tooltip says what is missing otherwise."""
        if self._state != ProcessingState.IDLE:
            return
        problem = self.logic.problemWith(self._parameterNode) if self._parameterNode else _("No parameters.")
        self.ui.registerButton.enabled = problem is None
        self.ui.registerButton.toolTip = problem or _("Register the moving volume to the fixed volume.")

    def _setState(self, state: ProcessingState) -> None:
        self._state = state
        idle = state == ProcessingState.IDLE
        texts = {
            ProcessingState.IDLE: _("Register"),
            ProcessingState.INSTALLING: _("Installing Python packages..."),
            ProcessingState.RUNNING: _("Cancel"),
            ProcessingState.CANCELLING: _("Cancelling..."),
        }
        self.ui.registerButton.text = texts[state]
        self.ui.registerButton.enabled = state == ProcessingState.RUNNING
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.methodCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            section.enabled = idle
        if idle:
            self._checkCanApply()

    def onRegisterButton(self) -> None:
        if self._state == ProcessingState.RUNNING:
            self._setState(ProcessingState.CANCELLING)
            self.logic.cancel()
            return
        if not self._ensureDependencies():
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        with slicer.util.tryWithErrorDisplay(_("Could not start the registration."), waitCursor=True):
            self._run = self.logic.registerUsingParameterNode(
                self._parameterNode,
                progressCallback=self._onProgress,
                logCallback=self._onLog,
                completionCallback=self._onFinished,
            )
            self._setState(ProcessingState.RUNNING)
            self._timer.start()

    def _ensureDependencies(self) -> bool:
        """First Register of the session: install missing packages after one confirmation."""
        withAnts = self._parameterNode.runAntsComparison
        if withAnts in self._dependenciesChecked or True in self._dependenciesChecked:
            return True
        self._setState(ProcessingState.INSTALLING)
        slicer.app.processEvents()  # show the state before the (blocking) check and installation
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
                outcome = self.logic.ensureDependencies(withAnts, confirm=self._confirmInstall)
        finally:
            self._setState(ProcessingState.IDLE)
        if outcome == dependencies.Outcome.DECLINED:
            return False
        self._dependenciesChecked.add(withAnts)
        if outcome == dependencies.Outcome.RESTART_NEEDED:
            if slicer.util.confirmYesNoDisplay(
                _("Packages were updated. Restart 3D Slicer now to use them?")
            ):
                slicer.util.restart()
            return False
        return True

    @staticmethod
    def _confirmInstall(question: str, details: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(question, detailedText=details)

    def _onTimer(self) -> None:
        if self._run is not None:
            self._run.poll()

    def _onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = stage

    def _onLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _onFinished(self, run: RegistrationRun) -> None:
        self._timer.stop()
        self._setState(ProcessingState.IDLE)
        if run.status == ProcessStatus.SUCCEEDED:
            self._showResults(run)
        elif run.status == ProcessStatus.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
        else:
            self.ui.statusLabel.text = _("Failed (see the log).")
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(
                _("Registration failed:") + "\n" + run.error_message,
                detailedText=_("Temporary files kept for debugging in:") + f"\n{run.work_dir}",
            )

    def _showResults(self, run: RegistrationRun) -> None:
        nodes = run.result
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = (
            _("Done.") if not nodes.warnings else _("Done, with warnings (see the log).")
        )
        for warning in nodes.warnings:
            self._onLog(_("WARNING: ") + warning)
        self._parameterNode.outputTransform = nodes.transform
        self._parameterNode.outputVolume = nodes.volume
        self._parameterNode.outputSegmentation = nodes.segmentation
        self.ui.resultsTableView.setMRMLTableNode(nodes.table)
        self.ui.resultsCollapsibleButton.collapsed = False
        slicer.util.setSliceViewerLayers(
            background=run.request.fixed_volume, foreground=run.request.moving_volume, foregroundOpacity=0.5
        )

    def onShowCompareLayoutButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not show the compare layout."), waitCursor=True):
            table = self.ui.resultsTableView.mrmlTableNode()
            if table is None:
                raise ValueError(_("Run a registration first: the compare layout shows its results."))
            self.logic.showCompareLayout(table)
            slicer.util.resetSliceViews()


#
# DeepAbdominalRegistrationLogic
#


def _request(
    *,
    fixedVolume,
    movingVolume,
    fixedSegmentation,
    movingSegmentation,
    liverSegmentName: str,
    vesselSegmentNames: Sequence[str],
    model: str,
    device: str,
    optimizeSteps: int,
    roiMarginMm: float,
    runAntsComparison: bool,
    outputTransform,
    outputVolume,
    outputSegmentation,
    fixedLandmarks=None,
    movingLandmarks=None,
    gridSize: int = 128,
) -> RegistrationRequest:
    """The Lib's request from the Logic's (Slicer-style camelCase) arguments; names are stripped."""
    return RegistrationRequest(
        fixed_volume=fixedVolume,
        moving_volume=movingVolume,
        fixed_segmentation=fixedSegmentation,
        moving_segmentation=movingSegmentation,
        liver_segment_name=liverSegmentName.strip(),
        vessel_segment_names=tuple(n.strip() for n in vesselSegmentNames if n.strip()),
        model=model,
        device=device,
        optimize_steps=int(optimizeSteps),
        roi_margin_mm=float(roiMarginMm),
        run_ants_comparison=bool(runAntsComparison),
        output_transform=outputTransform,
        output_volume=outputVolume,
        output_segmentation=outputSegmentation,
        fixed_landmarks=fixedLandmarks,
        moving_landmarks=movingLandmarks,
        grid_size=int(gridSize),
    )


def _pipInstall(arguments: list[str]) -> None:
    """``pip install arguments`` into Slicer's Python, without a second confirmation where Slicer's
    installer would ask again (the user already confirmed the whole list once)."""
    import inspect

    installer = getattr(getattr(slicer, "packaging", None), "pip_install", None)
    if installer is not None and "interactive" in inspect.signature(installer).parameters:
        installer(arguments, interactive=False)
    else:
        slicer.util.pip_install(arguments)


class DeepAbdominalRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration without any GUI: usable from the Python console, scripts and tests.

    The work is done by the headless engine ``dareg`` in a background process; this class only builds
    the request, starts a :class:`RegistrationRun` and keeps the one that is running (one at a time).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.workFolder: Path | None = None  # None: Slicer's temporary folder
        self.keepTemporaryFiles = False
        self._run: RegistrationRun | None = None

    def getParameterNode(self):
        return DeepAbdominalRegistrationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run is not None and not self._run.finished

    def register(
        self,
        fixedVolume: vtkMRMLScalarVolumeNode,
        movingVolume: vtkMRMLScalarVolumeNode,
        fixedSegmentation: vtkMRMLSegmentationNode | None = None,
        movingSegmentation: vtkMRMLSegmentationNode | None = None,
        *,
        liverSegmentName: str = "liver",
        vesselSegmentNames: Sequence[str] = (),
        model: str = "default",
        device: str = "auto",
        optimizeSteps: int = 50,
        roiMarginMm: float = 40.0,
        runAntsComparison: bool = False,
        outputTransform: vtkMRMLTransformNode | None = None,
        outputVolume: vtkMRMLScalarVolumeNode | None = None,
        outputSegmentation: vtkMRMLSegmentationNode | None = None,
        fixedLandmarks: vtkMRMLMarkupsFiducialNode | None = None,
        movingLandmarks: vtkMRMLMarkupsFiducialNode | None = None,
        gridSize: int = 128,
        waitForCompletion: bool = False,
        progressCallback: Callable[[float, str], None] | None = None,
        logCallback: Callable[[str], None] | None = None,
        completionCallback: Callable[[RegistrationRun], None] | None = None,
    ) -> RegistrationRun:
        """Register ``movingVolume`` to ``fixedVolume``; returns the run (``status``, ``result``...).

        :param fixedSegmentation, movingSegmentation: optional; both should hold a ``liverSegmentName``
            segment (case-insensitive). Segments are matched between the two by name.
        :param vesselSegmentNames: segments that guide the optimisation (empty: every shared segment).
        :param outputTransform, outputVolume, outputSegmentation: nodes to fill; None creates new nodes.
        :param fixedLandmarks, movingLandmarks: corresponding points for the landmark TRE (optional).
        :param gridSize: model grid per axis when no model fixes it (smaller is faster; tests use 32).
        :param waitForCompletion: block until done; a failed run then raises ``RuntimeError``.
            Otherwise the caller must call ``run.poll()`` periodically (the widget uses a QTimer).
        :param progressCallback: ``(fraction, stage)``; ``logCallback``: each output line;
            ``completionCallback``: the run, once finished (succeeded, failed or cancelled).
        :raises ValueError: invalid inputs (nothing is started and the scene is not changed).
        """
        if self.isRunning:
            raise RuntimeError(_("A registration is already running; cancel it or wait for it to finish."))
        request = _request(
            fixedVolume=fixedVolume,
            movingVolume=movingVolume,
            fixedSegmentation=fixedSegmentation,
            movingSegmentation=movingSegmentation,
            liverSegmentName=liverSegmentName,
            vesselSegmentNames=vesselSegmentNames,
            model=model,
            device=device,
            optimizeSteps=optimizeSteps,
            roiMarginMm=roiMarginMm,
            runAntsComparison=runAntsComparison,
            outputTransform=outputTransform,
            outputVolume=outputVolume,
            outputSegmentation=outputSegmentation,
            fixedLandmarks=fixedLandmarks,
            movingLandmarks=movingLandmarks,
            gridSize=gridSize,
        )
        run = RegistrationRun(
            request,
            scene=slicer.mrmlScene,
            work_root=self._workRoot(),
            module_folder=MODULE_FOLDER,
            on_progress=progressCallback,
            on_log=logCallback,
            on_finished=completionCallback,
            keep_files=self.keepTemporaryFiles,
        )
        run.start()
        self._run = run
        if waitForCompletion:
            run.wait()
            if run.status == ProcessStatus.FAILED:
                raise RuntimeError(run.error_message)
        return run

    def registerUsingParameterNode(self, parameterNode, **kwargs) -> RegistrationRun:
        """:meth:`register` with the inputs and settings of ``parameterNode``; ``kwargs`` as for register
        (``waitForCompletion``, ``gridSize``, the callbacks)."""
        return self.register(**self._arguments(parameterNode), **kwargs)

    @staticmethod
    def _arguments(parameterNode) -> dict:
        return {
            "fixedVolume": parameterNode.fixedVolume,
            "movingVolume": parameterNode.movingVolume,
            "fixedSegmentation": parameterNode.fixedSegmentation,
            "movingSegmentation": parameterNode.movingSegmentation,
            "liverSegmentName": parameterNode.liverSegmentName,
            "vesselSegmentNames": parameterNode.vesselSegmentNames.split(","),
            "model": parameterNode.model,
            "device": parameterNode.device,
            "optimizeSteps": parameterNode.optimizeSteps,
            "roiMarginMm": parameterNode.roiMarginMm,
            "runAntsComparison": parameterNode.runAntsComparison,
            "outputTransform": parameterNode.outputTransform,
            "outputVolume": parameterNode.outputVolume,
            "outputSegmentation": parameterNode.outputSegmentation,
        }

    def problemWith(self, parameterNode) -> str | None:
        """Why the parameter node's request cannot run (the widget's Register tooltip), or None."""
        try:
            validate(_request(**self._arguments(parameterNode)))
        except ValueError as error:
            return str(error)
        return None

    def cancel(self) -> None:
        """Cancel the running registration (kills its process tree; the scene is left unchanged)."""
        if self._run is not None:
            self._run.cancel()

    def ensureDependencies(self, runAntsComparison: bool, confirm: Callable[[str, str], bool]):
        """Install missing Python packages after ``confirm(question, details)``; never in testing mode.

        :returns: a :class:`DeepAbdominalRegistrationLib.dependencies.Outcome`.
        """
        return dependencies.ensure(
            REQUIREMENTS_FILE,
            with_ants=runAntsComparison,
            confirm=confirm,
            install=_pipInstall,
            testing=slicer.app.testingEnabled(),
        )

    def missingDependencies(self, runAntsComparison: bool) -> list:
        """Requirements of ``Resources/requirements.txt`` not satisfied in this Python (nothing imported)."""
        requirements = dependencies.read_requirements(REQUIREMENTS_FILE)
        return dependencies.missing_requirements(requirements, with_ants=runAntsComparison)

    @staticmethod
    def availableModels() -> list[str]:
        """Model choices: "default", "none" and the bundled models (the registry imports no TensorFlow)."""
        try:
            from dareg.models.registry import list_bundled_models
        except ImportError:  # engine dependencies not installed yet
            return ["default", "none"]
        return ["default", "none", *list_bundled_models()]

    def showCompareLayout(self, tableNode: vtkMRMLTableNode) -> list[str]:
        """Fixed / deep / SyN side by side for the results referenced by ``tableNode``; returns view names."""
        layoutNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        return layout.show_compare_layout(slicer.mrmlScene, layoutNode, tableNode)

    def _workRoot(self) -> Path:
        if self.workFolder is not None:
            return Path(self.workFolder)
        return Path(slicer.app.temporaryPath or tempfile.gettempdir()) / "DeepAbdominalRegistration"


#
# DeepAbdominalRegistrationTest
#


class DeepAbdominalRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test on a small synthetic phantom pair (generated, no download); about a minute on 2 CPU cores.

    Run in Slicer with "Reload and Test" or ctest (slicer_add_python_unittest); the project's pytest
    suite also runs it headless.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_RegisterWithExplicitArguments()
        self.setUp()
        self.test_RegisterWithParameterNode()

    def _requireDependencies(self, logic) -> None:
        missing = logic.missingDependencies(False)
        if missing:
            self.skipTest("Python packages missing: " + ", ".join(m.describe() for m in missing))

    def _loadNode(self, path: Path, nodeClass: str, storageClass: str):
        node = slicer.mrmlScene.AddNewNodeByClass(nodeClass, path.name.split(".")[0])
        storage = getattr(slicer, storageClass)()
        storage.SetFileName(str(path))
        self.assertTrue(storage.ReadData(node), f"could not read {path}")
        node.CreateDefaultDisplayNodes()
        return node

    def _phantomPair(self, folder: Path) -> tuple:
        """A phantom CT, a moving CT made from it by a known smooth deformation, and both segmentations."""
        from dareg import io
        from dareg.phantom import make_phantom, make_synthetic_pair

        phantom = make_phantom(size=(60, 50, 40), spacing=(4.0, 4.0, 4.8), seed=1)
        pair = make_synthetic_pair(phantom.image, phantom.labels, seed=1)
        io.write_image(phantom.image, folder / "fixed.nii.gz")
        io.write_image(pair.moving_image, folder / "moving.nii.gz")
        io.write_label_map(io.LabelMap(phantom.labels, dict(phantom.names)), folder / "fixed_seg.seg.nrrd")
        io.write_label_map(
            io.LabelMap(pair.moving_labels, dict(phantom.names)), folder / "moving_seg.seg.nrrd"
        )
        volumes = [
            self._loadNode(
                folder / f"{n}.nii.gz", "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode"
            )
            for n in ("fixed", "moving")
        ]
        segmentations = [
            self._loadNode(
                folder / f"{n}_seg.seg.nrrd", "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode"
            )
            for n in ("fixed", "moving")
        ]
        return (*volumes, *segmentations)

    def _checkResult(self, run, fixed, moving) -> None:
        self.assertEqual(run.status, ProcessStatus.SUCCEEDED, run.error_message)
        result = run.result
        self.assertTrue(result.transform.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(moving.GetParentTransformNode(), result.transform)
        self.assertEqual(result.volume.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertIsNotNone(result.segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver"))
        table = result.table.GetTable()
        measures = [table.GetValueByName(r, "Measure").ToString() for r in range(table.GetNumberOfRows())]
        row = measures.index("liver DSC")
        before, after = (table.GetValueByName(row, c).ToDouble() for c in ("Unregistered", "Deep"))
        self.assertGreater(after, before, "registration should improve the liver overlap of the phantom pair")

    def test_RegisterWithExplicitArguments(self) -> None:
        self.delayDisplay("Registration with explicit arguments")
        logic = DeepAbdominalRegistrationLogic()
        self._requireDependencies(logic)
        with tempfile.TemporaryDirectory() as folder:
            fixed, moving, fixedSeg, movingSeg = self._phantomPair(Path(folder))
            run = logic.register(
                fixed,
                moving,
                fixedSeg,
                movingSeg,
                model="none",
                optimizeSteps=5,
                gridSize=32,
                waitForCompletion=True,
            )
        self._checkResult(run, fixed, moving)
        self.delayDisplay("Test passed")

    def test_RegisterWithParameterNode(self) -> None:
        self.delayDisplay("Registration through the parameter node")
        logic = DeepAbdominalRegistrationLogic()
        self._requireDependencies(logic)
        with tempfile.TemporaryDirectory() as folder:
            fixed, moving, fixedSeg, movingSeg = self._phantomPair(Path(folder))
            parameterNode = logic.getParameterNode()
            parameterNode.fixedVolume = fixed
            parameterNode.movingVolume = moving
            parameterNode.fixedSegmentation = fixedSeg
            parameterNode.movingSegmentation = movingSeg
            parameterNode.liverSegmentName = "LIVER"
            parameterNode.model = "none"
            parameterNode.optimizeSteps = 5
            self.assertIsNone(logic.problemWith(parameterNode))
            run = logic.registerUsingParameterNode(parameterNode, gridSize=32, waitForCompletion=True)
        self._checkResult(run, fixed, moving)
        self.delayDisplay("Test passed")
