"""One registration run: validate the inputs, export them, run ``dareg`` (and ``dareg ants``), import.

Lifecycle of a :class:`RegistrationRun`:

1. :meth:`~RegistrationRun.start` validates the request (a clear ``ValueError`` before anything
   starts: missing nodes, a segmentation without the liver, an input under a foreign transform...),
   creates a per-run temporary folder, writes the inputs there and starts ``dareg register`` in the
   background (:mod:`.process`);
2. :meth:`~RegistrationRun.poll`, called periodically on the main thread, forwards progress and log
   lines; when the deep registration finished it starts ``dareg ants`` if the SyN comparison was
   asked for; when everything succeeded it imports the results;
3. the run ends SUCCEEDED (results in the scene), FAILED (``error_message`` says why; the scene is as
   it was; the temporary folder is kept for debugging) or CANCELLED (process tree killed, scene
   unchanged, temporary folder removed).

Results are built as nodes outside the scene first and added only once all of them were read, so a
failure while importing also leaves the scene unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from . import exchange, results
from .process import (
    BackgroundProcess,
    ProcessStatus,
    poll_until_finished,
    process_environment,
    python_executable,
)
from .request import CREATED_BY_ATTRIBUTE, RegistrationRequest, validate

#: File names of a dareg result folder (``dareg.outputs``; a test keeps them equal).
TRANSFORM_FILE = "transform.nii.gz"
WARPED_IMAGE_FILE = "warped_moving.nii.gz"
WARPED_SEGMENTATION_FILE = "warped_moving_seg.seg.nrrd"
METRICS_FILE = "metrics.json"

#: Share of the progress bar taken by the deep registration when SyN runs after it.
_DEEP_SHARE_WITH_SYN = 0.4

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]


@dataclass
class RegistrationResultNodes:
    """The nodes a successful run created or filled (SyN ones only with the comparison)."""

    transform: object
    volume: object
    segmentation: object = None
    syn_transform: object = None
    syn_volume: object = None
    syn_segmentation: object = None
    table: object = None
    #: What the core flagged as made worse by registration (metrics.json "warnings"), SyN's prefixed.
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """Paths of the exported inputs and the label table they were written with."""

    files: dict[str, Path]
    table: exchange.LabelTable
    liver_id: int | None
    vessel_ids: list[int] = field(default_factory=list)


def _export(request: RegistrationRequest, folder: Path) -> _Inputs:
    files = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd"}
    exchange.write_volume(request.fixed_volume, files["fixed"])
    exchange.write_volume(request.moving_volume, files["moving"])
    fixed_names = exchange.segment_names(request.fixed_segmentation) if request.fixed_segmentation else []
    moving_names = exchange.segment_names(request.moving_segmentation) if request.moving_segmentation else []
    table = exchange.LabelTable.from_names(fixed_names, moving_names)
    for role, segmentation, volume in (
        ("fixed_seg", request.fixed_segmentation, request.fixed_volume),
        ("moving_seg", request.moving_segmentation, request.moving_volume),
    ):
        if segmentation is not None:
            files[role] = folder / f"{role}.seg.nrrd"
            exchange.write_segmentation(segmentation, volume, table, files[role])
    if request.fixed_landmarks is not None:
        files["landmarks_fixed"] = folder / "landmarks_fixed.csv"
        files["landmarks_moving"] = folder / "landmarks_moving.csv"
        exchange.write_landmarks(request.fixed_landmarks, files["landmarks_fixed"])
        exchange.write_landmarks(request.moving_landmarks, files["landmarks_moving"])
    has_segmentation = bool(fixed_names or moving_names)
    return _Inputs(
        files=files,
        table=table,
        liver_id=table.id_of(request.liver_segment_name) if has_segmentation else None,
        vessel_ids=[table.id_of(n) for n in request.vessel_segment_names],
    )


def _input_arguments(inputs: _Inputs) -> list[str]:
    """Arguments shared by ``dareg register`` and ``dareg ants``."""
    arguments = []
    for role, path in inputs.files.items():
        arguments += [f"--{role.replace('_', '-')}", str(path)]
    if inputs.liver_id is not None:
        arguments += ["--liver-label", str(inputs.liver_id)]
    if inputs.vessel_ids:
        arguments += ["--labels", *map(str, inputs.vessel_ids)]
    return arguments + ["--progress-lines"]


def register_command(request: RegistrationRequest, inputs: _Inputs, out_dir: Path) -> list[str]:
    """``python -m dareg register ...`` for this request."""
    return [
        python_executable(),
        "-m",
        "dareg",
        "register",
        *_input_arguments(inputs),
        "--model",
        request.model.strip(),
        "--device",
        request.device,
        "--optimize",
        str(request.optimize_steps),
        "--margin",
        str(request.roi_margin_mm),
        "--grid",
        str(request.grid_size),
        "--out",
        str(out_dir),
    ]


def ants_command(request: RegistrationRequest, inputs: _Inputs, out_dir: Path) -> list[str]:
    """``python -m dareg ants ...``: ANTs SyN on the same inputs and ROI, same kind of outputs."""
    return [
        python_executable(),
        "-m",
        "dareg",
        "ants",
        *_input_arguments(inputs),
        "--margin",
        str(request.roi_margin_mm),
        "--out",
        str(out_dir),
    ]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    title: str
    command: list[str]
    out_dir: Path
    start: float
    share: float


class RegistrationRun:
    """A registration in progress; see the module docstring.

    Parameters
    ----------
    request
        What to register.
    scene
        The MRML scene that receives the results.
    work_root
        Folder in which the run's temporary folder is created (any characters allowed).
    module_folder
        Folder that holds the ``dareg`` package; put first on the process's PYTHONPATH.
    on_progress, on_log, on_finished
        Called on the polling thread: ``on_progress(fraction, stage)``, ``on_log(line)``,
        ``on_finished(run)`` once, when the run ended (any outcome).
    keep_files
        Keep the temporary folder after a successful run too.
    """

    def __init__(
        self,
        request: RegistrationRequest,
        *,
        scene,
        work_root: Path,
        module_folder: Path,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        on_finished: Callable[[RegistrationRun], None] | None = None,
        keep_files: bool = False,
    ) -> None:
        self.request = request
        self.scene = scene
        self.work_root = Path(work_root)
        self.module_folder = Path(module_folder)
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_finished = on_finished
        self.keep_files = keep_files
        self.status = ProcessStatus.NOT_STARTED
        self.error_message = ""
        self.work_dir: Path | None = None
        self.result: RegistrationResultNodes | None = None
        self.process: BackgroundProcess | None = None
        self._inputs: _Inputs | None = None
        self._stages: list[_Stage] = []
        self._stage_index = 0

    @property
    def finished(self) -> bool:
        return self.status not in (ProcessStatus.NOT_STARTED, ProcessStatus.RUNNING)

    @property
    def label_table(self) -> exchange.LabelTable | None:
        """The segment name <-> label id table the inputs were exported with (None before start)."""
        return self._inputs.table if self._inputs is not None else None

    def start(self) -> None:
        """Validate, export the inputs and start the first process (returns at once)."""
        validate(self.request)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=self.work_root))
        try:
            self._inputs = _export(self.request, self.work_dir)
        except Exception:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            raise
        self._stages = self._plan()
        self.status = ProcessStatus.RUNNING
        self._log(f"Temporary folder: {self.work_dir}")
        self._start_stage(0)

    def _plan(self) -> list[_Stage]:
        deep_dir = self.work_dir / "deep"
        if not self.request.run_ants_comparison:
            return [
                _Stage("Deep", register_command(self.request, self._inputs, deep_dir), deep_dir, 0.0, 1.0)
            ]
        syn_dir = self.work_dir / "syn"
        deep_share = _DEEP_SHARE_WITH_SYN
        return [
            _Stage("Deep", register_command(self.request, self._inputs, deep_dir), deep_dir, 0.0, deep_share),
            _Stage(
                "SyN",
                ants_command(self.request, self._inputs, syn_dir),
                syn_dir,
                deep_share,
                1.0 - deep_share,
            ),
        ]

    def _start_stage(self, index: int) -> None:
        self._stage_index = index
        stage = self._stages[index]
        self._log(f"[{stage.title}] {' '.join(stage.command)}")
        self.process = BackgroundProcess(
            stage.command,
            cwd=self.work_dir,
            env=process_environment([self.module_folder]),
            on_progress=lambda fraction, name: self._progress(
                stage.start + stage.share * fraction, f"{stage.title}: {name}"
            ),
            on_log=self._log,
        )
        self.process.start()

    def poll(self) -> ProcessStatus:
        """Forward output; start the next stage or import the results when a stage succeeded."""
        if self.status != ProcessStatus.RUNNING:
            return self.status
        outcome = self.process.poll()
        if outcome == ProcessStatus.RUNNING:
            return self.status
        if outcome != ProcessStatus.SUCCEEDED:
            self._finish(outcome, self.process.error_message)
            return self.status
        if self._stage_index + 1 < len(self._stages):
            self._start_stage(self._stage_index + 1)
            return self.status
        self._import_results()
        return self.status

    def wait(self, timeout_s: float | None = None) -> ProcessStatus:
        """Poll until the run finished (or ``timeout_s`` passed)."""
        return poll_until_finished(self.poll, timeout_s)

    def cancel(self) -> None:
        """Kill the running process tree; the scene stays as it was and the temporary folder goes."""
        if self.status != ProcessStatus.RUNNING:
            return
        self.process.cancel()
        self._finish(ProcessStatus.CANCELLED, "Cancelled by the user.")

    def _progress(self, fraction: float, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(fraction, stage)

    def _log(self, line: str) -> None:
        if self.on_log is not None:
            self.on_log(line)

    def _import_results(self) -> None:
        self._progress(1.0, "Loading results")
        try:
            self.result = import_results(
                self.scene, self.request, self._inputs.table, [s.out_dir for s in self._stages]
            )
        except Exception as error:  # report any reading problem as a failed run; the scene is unchanged
            self._finish(ProcessStatus.FAILED, f"Could not load the results: {error}")
            return
        self._finish(ProcessStatus.SUCCEEDED, "")

    def _finish(self, status: ProcessStatus, message: str) -> None:
        self.status = status
        self.error_message = message
        if status == ProcessStatus.FAILED:
            self._log(f"Failed: {message}")
            self._log(f"Temporary files kept for debugging in {self.work_dir}")
        elif not self.keep_files:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.on_finished is not None:
            self.on_finished(self)


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """One method's results read from its output folder, as nodes outside the scene."""

    transform: object
    volume: object
    segmentation: object
    metrics: dict


def _load(out_dir: Path, request: RegistrationRequest, table: exchange.LabelTable) -> _Loaded:
    segmentation = None
    if request.moving_segmentation is not None:
        moving_labels = table.restricted_to(exchange.segment_names(request.moving_segmentation))
        segmentation = exchange.read_segmentation(
            out_dir / WARPED_SEGMENTATION_FILE, moving_labels, colors_from=request.moving_segmentation
        )
    return _Loaded(
        transform=exchange.read_transform(out_dir / TRANSFORM_FILE),
        volume=exchange.read_volume(out_dir / WARPED_IMAGE_FILE),
        segmentation=segmentation,
        metrics=results.read_metrics(out_dir / METRICS_FILE),
    )


def _place(scene, staged, target, name: str):
    """Put a staged node's content into ``target`` (a node the user chose) or add it as a new node."""
    if target is None:
        staged.SetName(scene.GenerateUniqueName(name))
        staged.SetAttribute(CREATED_BY_ATTRIBUTE, "DeepAbdominalRegistration")
        scene.AddNode(staged)
        target = staged
    elif target.IsA("vtkMRMLTransformNode"):
        target.SetAndObserveTransformFromParent(staged.GetTransformFromParent())
        target.SetAttribute(CREATED_BY_ATTRIBUTE, "DeepAbdominalRegistration")
    elif target.IsA("vtkMRMLSegmentationNode"):
        target.GetSegmentation().DeepCopy(staged.GetSegmentation())
    else:
        target.SetAndObserveImageData(staged.GetImageData())
        target.CopyOrientation(staged)
    target.CreateDefaultDisplayNodes()
    return target


def _place_method(scene, request: RegistrationRequest, loaded: _Loaded, title: str, targets: tuple) -> tuple:
    moving = request.moving_volume.GetName()
    suffix = "" if title == "Deep" else f" {title}"
    transform = _place(scene, loaded.transform, targets[0], f"{moving} registered{suffix} transform")
    transform.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), request.fixed_volume.GetID()
    )
    transform.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), request.moving_volume.GetID()
    )
    volume = _place(scene, loaded.volume, targets[1], f"{moving} registered{suffix}")
    if request.moving_volume.GetDisplayNode() is not None:
        volume.GetDisplayNode().CopyContent(request.moving_volume.GetDisplayNode())
    segmentation = None
    if loaded.segmentation is not None:
        segmentation = _place(
            scene, loaded.segmentation, targets[2], f"{moving} registered{suffix} segmentation"
        )
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(request.fixed_volume)
    return transform, volume, segmentation


def import_results(scene, request: RegistrationRequest, table: exchange.LabelTable, out_dirs: list[Path]):
    """Read every method's outputs, then add/fill the nodes, the metrics table and the moving volume's
    transform. Reading happens before the scene is touched, so a bad file leaves the scene unchanged."""
    deep = _load(out_dirs[0], request, table)
    syn = _load(out_dirs[1], request, table) if len(out_dirs) > 1 else None
    outputs = (request.output_transform, request.output_volume, request.output_segmentation)
    transform, volume, segmentation = _place_method(scene, request, deep, "Deep", outputs)
    nodes = RegistrationResultNodes(transform=transform, volume=volume, segmentation=segmentation)
    nodes.warnings = list(deep.metrics.get("warnings", []))
    if syn is not None:
        nodes.syn_transform, nodes.syn_volume, nodes.syn_segmentation = _place_method(
            scene, request, syn, "SyN", (None, None, None)
        )
        nodes.warnings += [f"SyN: {w}" for w in syn.metrics.get("warnings", [])]
    nodes.table = _metrics_table(scene, request, deep, syn, nodes)
    request.moving_volume.SetAndObserveTransformNodeID(transform.GetID())
    return nodes


def _metrics_table(scene, request, deep: _Loaded, syn: _Loaded | None, nodes: RegistrationResultNodes):
    table_node = scene.AddNewNodeByClass(
        "vtkMRMLTableNode",
        scene.GenerateUniqueName(f"{request.moving_volume.GetName()} registration metrics"),
    )
    table_node.SetAttribute(CREATED_BY_ATTRIBUTE, "DeepAbdominalRegistration")
    rows = results.metric_rows(deep.metrics, syn.metrics if syn else None)
    results.fill_table(table_node, rows, with_syn=syn is not None)
    results.set_references(
        table_node,
        {
            "fixedVolume": request.fixed_volume,
            "fixedSegmentation": request.fixed_segmentation,
            "deepVolume": nodes.volume,
            "deepSegmentation": nodes.segmentation,
            "synVolume": nodes.syn_volume,
            "synSegmentation": nodes.syn_segmentation,
        },
    )
    return table_node
