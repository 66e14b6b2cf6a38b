"""The Slicer module's Logic end to end, headless: real MRML (slicer-core), real ``dareg`` processes.

What is real: the MRML scene and nodes, Slicer's storage nodes (all file I/O and RAS <-> LPS), the
segmentation and transform machinery, VTK resampling, the ``python -m dareg`` child processes, antspyx.
What is a stand-in (3D Slicer's application and Qt layer, absent from slicer-core; see
``slicer_support``): ``qt``/``ctk`` (empty modules), ``slicer.app``, ``slicer.i18n``, the
``slicer.ScriptedLoadableModule`` base classes and ``slicer.parameterNodeWrapper``. The Widget (Qt GUI,
QTimer polling, dialogs) is therefore not exercised here.

Checks:
- the imported grid transform maps fixed voxel centres exactly as SimpleITK does with the core's file
  (through the moving volume's own transform chain, oblique anisotropic grids on both sides), and MRML's
  resampling through it reproduces SimpleITK's warp of a smooth image and the core's warped CT;
- the table holds metrics.json's numbers; the warped segmentation equals the core's label map, with the
  moving segments' names and colours; user-chosen output nodes are filled; inputs stay untouched;
- a work folder with spaces and non-ASCII characters; cancel kills the process tree and changes nothing;
  a missing liver segment and a failing process give clear errors and change nothing;
- the background-process runner on its own (progress lines, exit codes, grandchildren killed);
- the compare layout through MRML; the ANTs SyN comparison; the dependency checker's pure logic;
- the module's own ScriptedLoadableModuleTest (runTest), and its metadata and parameter node.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import rotation_matrix

slicer = pytest.importorskip("slicer", reason="slicer-core (the dev extra) provides headless MRML")
import vtk  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

from dareg import io  # noqa: E402
from dareg.phantom import make_phantom, make_synthetic_pair  # noqa: E402

import slicer_support  # noqa: E402

module = slicer_support.load_module()
from DeepAbdominalRegistrationLib import dependencies, layout, process, results, run  # noqa: E402
from DeepAbdominalRegistrationLib.exchange import segment_names  # noqa: E402

ProcessStatus = process.ProcessStatus
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
FAST = {"model": "none", "optimizeSteps": 5, "gridSize": 32}
WORK_FOLDER_NAME = "work folder é ü 漢字"


# --------------------------------------------------------------------------------------------------
# The oblique case, registered once
# --------------------------------------------------------------------------------------------------


def _grid(size, spacing, direction) -> sitk.Image:
    """An empty grid of ``size``/``spacing``/``direction`` centred on the phantom's centre (0, 0, 0)."""
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((-direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)).tolist())
    return image


def _markups(points_lps: np.ndarray, name: str):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    slicer.util.updateMarkupsControlPointsFromArray(node, points_lps * LPS_TO_RAS)
    return node


def _snapshot_volume(node) -> tuple:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVolume(node).copy(), slicer.util.arrayFromVTKMatrix(matrix), node.GetName()


def _snapshot_segmentation(node) -> dict:
    """Segment id -> (name, label value, stored voxels, their geometry), as stored (no resampling)."""
    segmentation = node.GetSegmentation()
    snapshot = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        labels = node.GetBinaryLabelmapInternalRepresentation(segment_id)
        matrix = vtk.vtkMatrix4x4()
        labels.GetImageToWorldMatrix(matrix)
        voxels = vtk.util.numpy_support.vtk_to_numpy(labels.GetPointData().GetScalars()).copy()
        segment = segmentation.GetSegment(segment_id)
        snapshot[segment_id] = (
            segment.GetName(),
            segment.GetLabelValue(),
            voxels,
            labels.GetExtent(),
            slicer.util.arrayFromVTKMatrix(matrix),
        )
    return snapshot


def _scene_state() -> tuple:
    scene = slicer.mrmlScene
    ids = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    return ids, scene.GetNumberOfNodesByClass("vtkMRMLTableNode")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Fixed and moving CT on different oblique, anisotropic grids, loaded from files as Slicer loads them.

    The moving segmentation stores its segments in the reverse order (other label values) and the fixed
    one calls the liver "Liver": segments must be matched by name, ignoring case.
    """
    slicer_support.use_scene(slicer_support.new_scene())
    folder = tmp_path_factory.mktemp("inputs")
    fixed_direction = rotation_matrix([1.0, 2.0, 0.5], 14.0) @ np.diag([1.0, -1.0, 1.0])
    moving_direction = rotation_matrix([-0.5, 1.0, 2.0], 21.0)
    phantom = make_phantom(
        size=(56, 48, 36), spacing=(4.2, 3.8, 5.0), seed=1, direction=tuple(fixed_direction.ravel())
    )
    moving_grid = _grid((52, 50, 34), (4.6, 4.0, 5.4), moving_direction)
    pair = make_synthetic_pair(phantom.image, phantom.labels, seed=1, reference=moving_grid)
    fixed_names = {i: ("Liver" if n == "liver" else n) for i, n in phantom.names.items()}
    reversed_ids = sitk.Cast(11 - pair.moving_labels, sitk.sitkUInt8) * sitk.Cast(
        pair.moving_labels > 0, sitk.sitkUInt8
    )
    moving_names = {11 - i: n for i, n in phantom.names.items()}
    io.write_image(phantom.image, folder / "fixed.nrrd")
    io.write_image(pair.moving_image, folder / "moving.nii.gz")
    io.write_label_map(io.LabelMap(phantom.labels, fixed_names), folder / "fixed.seg.nrrd")
    io.write_label_map(io.LabelMap(reversed_ids, moving_names), folder / "moving.seg.nrrd")
    nodes = {
        "fixed": slicer_support.load_node(folder / "fixed.nrrd", "vtkMRMLScalarVolumeNode"),
        "moving": slicer_support.load_node(folder / "moving.nii.gz", "vtkMRMLScalarVolumeNode"),
        "fixed_seg": slicer_support.load_node(folder / "fixed.seg.nrrd", "vtkMRMLSegmentationNode"),
        "moving_seg": slicer_support.load_node(folder / "moving.seg.nrrd", "vtkMRMLSegmentationNode"),
        "fixed_points": _markups(pair.fixed_landmarks, "fixed landmarks"),
        "moving_points": _markups(pair.moving_landmarks, "moving landmarks"),
    }
    moving_segments = nodes["moving_seg"].GetSegmentation()
    colors = np.random.default_rng(0).uniform(0.1, 0.9, (moving_segments.GetNumberOfSegments(), 3))
    for index, color in enumerate(colors):  # the file has none; users' segmentations do
        moving_segments.GetNthSegment(index).SetColor(*color)
    return {"nodes": nodes, "folder": folder, "work_root": tmp_path_factory.mktemp("w") / WORK_FOLDER_NAME}


@pytest.fixture(scope="module")
def registered(case):
    """One registration into user-chosen output nodes; temporary files kept to compare with the core."""
    nodes = case["nodes"]
    fixed, moving = nodes["fixed"], nodes["moving"]
    before = {
        "fixed": _snapshot_volume(fixed),
        "moving": _snapshot_volume(moving),
        "fixed_seg": _snapshot_segmentation(nodes["fixed_seg"]),
        "moving_seg": _snapshot_segmentation(nodes["moving_seg"]),
    }
    outputs = {
        "outputTransform": slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform"),
        "outputVolume": slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my volume"),
        "outputSegmentation": slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", "my segmentation"
        ),
    }
    logic = module.DeepAbdominalRegistrationLogic()
    logic.workFolder = case["work_root"]
    logic.keepTemporaryFiles = True
    progress, log = [], []
    registration = logic.register(
        fixed,
        moving,
        nodes["fixed_seg"],
        nodes["moving_seg"],
        liverSegmentName="liver",
        fixedLandmarks=nodes["fixed_points"],
        movingLandmarks=nodes["moving_points"],
        waitForCompletion=True,
        progressCallback=lambda fraction, stage: progress.append((fraction, stage)),
        logCallback=log.append,
        **outputs,
        **FAST,
    )
    out = registration.work_dir / "deep"
    return {
        "run": registration,
        "outputs": outputs,
        "before": before,
        "progress": progress,
        "log": log,
        "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8")),
        "out": out,
    }


def _ras_to_ijk(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _ijk_to_ras(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _world_to_moving_local(moving) -> vtk.vtkGeneralTransform:
    """The transform Slicer applies to show ``moving`` in world space: world -> its local space."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, moving.GetParentTransformNode(), transform)
    return transform


def _mrml_resample(moving_image: vtk.vtkImageData, moving, fixed, background: float) -> np.ndarray:
    """``moving_image`` (on the moving volume's grid) resampled onto the fixed grid by VTK, through the
    moving volume's transform chain: fixed IJK -> RAS -> (FromParent) moving RAS -> moving IJK."""
    chain = vtk.vtkGeneralTransform()
    chain.PostMultiply()
    chain.Concatenate(slicer.util.vtkMatrixFromArray(_ijk_to_ras(fixed)))
    chain.Concatenate(_world_to_moving_local(moving))
    chain.Concatenate(slicer.util.vtkMatrixFromArray(_ras_to_ijk(moving)))
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(moving_image)
    reslice.SetResliceTransform(chain)
    reslice.SetInterpolationModeToLinear()
    reslice.SetBackgroundLevel(background)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    dims = fixed.GetImageData().GetDimensions()
    reslice.SetOutputExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reslice.Update()
    output = reslice.GetOutput()
    return vtk.util.numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(dims[::-1])


def _exported_fixed(case, registered) -> sitk.Image:
    """The fixed volume as the module exported it: the voxel grid of the fixed NODE.

    Not the original file: the fixed grid is left-handed, and Slicer's reader turns such grids
    right-handed by reversing the k axis (same physical samples, other voxel order).
    """
    image = sitk.ReadImage(str(registered["run"].work_dir / "fixed.nrrd"))
    matrix = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_ras(case["nodes"]["fixed"])  # node's IJK -> LPS
    np.testing.assert_allclose(
        np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing(), matrix[:3, :3], atol=1e-6
    )
    np.testing.assert_allclose(image.GetOrigin(), matrix[:3, 3], atol=1e-6)
    return image


def _sitk_field_transform(out: Path) -> sitk.Transform:
    return sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "transform.nii.gz"), sitk.sitkVectorFloat64)
    )


# --------------------------------------------------------------------------------------------------
# Geometry: the transform node and MRML's resampling agree with the core / SimpleITK
# --------------------------------------------------------------------------------------------------


def test_run_succeeds_with_progress_in_a_non_ascii_work_folder(registered):
    registration = registered["run"]
    assert registration.status == ProcessStatus.SUCCEEDED, registration.error_message
    assert " " in str(registration.work_dir) and "漢字" in str(registration.work_dir)
    fractions = [f for f, _ in registered["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("instance optimisation" in stage for _, stage in registered["progress"])
    assert any(line.startswith("Liver ") for line in registered["log"])  # the core's summary reached the log


def test_transform_node_maps_fixed_voxels_as_simpleitk_does(case, registered):
    fixed, moving = case["nodes"]["fixed"], case["nodes"]["moving"]
    transform_node = registered["outputs"]["outputTransform"]
    assert moving.GetParentTransformNode() is transform_node
    assert transform_node.GetTransformFromParent().GetInterpolationModeAsString() == "Linear"
    assert transform_node.GetNodeReference("spatialRegistrationFixed") is fixed
    assert transform_node.GetNodeReference("spatialRegistrationMoving") is moving

    dims = np.array(fixed.GetImageData().GetDimensions())
    ijk = np.stack(np.meshgrid(*[np.arange(0, d, 3) for d in dims], indexing="ij"), -1).reshape(-1, 3)
    ras = (_ijk_to_ras(fixed) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    chain = _world_to_moving_local(moving)
    slicer_ijk = (_ras_to_ijk(moving) @ np.c_[[chain.TransformPoint(p) for p in ras], np.ones(len(ras))].T).T[
        :, :3
    ]

    itk = _sitk_field_transform(registered["out"])
    moving_image = sitk.ReadImage(str(case["folder"] / "moving.nii.gz"))
    itk_ijk = np.array(
        [
            moving_image.TransformPhysicalPointToContinuousIndex(itk.TransformPoint(p))
            for p in (ras * LPS_TO_RAS).tolist()
        ]
    )
    displacement = np.linalg.norm(itk_ijk - ijk, axis=1)
    assert displacement.max() > 1.0  # a real deformation, not an identity that would pass trivially
    # Required: 0.1 voxel. Measured: ~1e-5; Slicer's default cubic interpolation would give ~0.05.
    assert np.abs(slicer_ijk - itk_ijk).max() < 0.01  # voxels of the moving grid


def _smooth(points_lps: np.ndarray) -> np.ndarray:
    """A smooth test function of LPS position; |gradient| <= 1/20 + 1/25 + 1/30 per mm."""
    x, y, z = points_lps.T
    return np.sin(x / 20.0) + np.cos(y / 25.0) + np.sin(z / 30.0 + 1.0)


def test_mrml_resampling_matches_simpleitk_on_a_smooth_image(case, registered):
    fixed, moving = case["nodes"]["fixed"], case["nodes"]["moving"]
    moving_itk = sitk.ReadImage(str(case["folder"] / "moving.nii.gz"))
    size = np.array(moving_itk.GetSize())
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    lps = np.array(
        [moving_itk.TransformContinuousIndexToPhysicalPoint(p) for p in ijk.astype(float).tolist()]
    )
    values = _smooth(lps).reshape(size).transpose(2, 1, 0).astype(np.float64)  # (z, y, x) = (k, j, i)
    smooth_itk = sitk.GetImageFromArray(values)
    smooth_itk.CopyInformation(moving_itk)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(
            smooth_itk,
            _exported_fixed(case, registered),
            _sitk_field_transform(registered["out"]),
            sitk.sitkLinear,
            -99.0,
        )
    )
    image = vtk.vtkImageData()
    image.SetDimensions(*size.tolist())
    image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(values.ravel(), deep=True))
    resampled = _mrml_resample(image, moving, fixed, background=-99.0)
    both = (expected != -99.0) & (resampled != -99.0)
    assert both.mean() > 0.5
    gradient_bound = 1 / 20 + 1 / 25 + 1 / 30
    assert np.abs(resampled - expected)[both].max() < 0.1 * min(moving.GetSpacing()) * gradient_bound


def test_mrml_resampling_matches_the_core_warped_volume(case, registered):
    fixed, moving = case["nodes"]["fixed"], case["nodes"]["moving"]
    warped = registered["outputs"]["outputVolume"]
    resampled = _mrml_resample(moving.GetImageData(), moving, fixed, background=np.nan)
    core = slicer.util.arrayFromVolume(warped).astype(float)
    inside = np.isfinite(resampled)
    assert inside.mean() > 0.5
    difference = np.abs(resampled[inside] - core[inside])
    # HU on a CT with ~1000 HU edges. Measured ~0.01; a cubic-interpolated transform gives ~1000.
    assert difference.max() < 1.0
    np.testing.assert_allclose(_ijk_to_ras(warped), _ijk_to_ras(fixed), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Outputs: table, segmentation, user-chosen nodes, untouched inputs
# --------------------------------------------------------------------------------------------------


def _table_rows(table_node) -> dict[str, dict[str, float]]:
    table = table_node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return {
        table.GetValue(r, 0).ToString(): {c: table.GetValueByName(r, c).ToDouble() for c in columns[1:]}
        for r in range(table.GetNumberOfRows())
    }


def test_table_holds_the_numbers_of_metrics_json(registered):
    table_node = registered["run"].result.table
    rows = _table_rows(table_node)
    metrics = registered["metrics"]
    before, after = metrics["metrics"]["unregistered"], metrics["metrics"]["registered"]
    assert "Liver" in after["labels"] and "portal_vein" in after["labels"]  # the core reports names
    for name, values in after["labels"].items():
        assert rows[f"{name} DSC"] == pytest.approx(
            {"Unregistered": before["labels"][name]["dice"], "Deep": values["dice"]}
        )
        assert rows[f"{name} HD95 (mm)"]["Deep"] == pytest.approx(values["hd95"])
        assert rows[f"{name} centroid TRE (mm)"]["Deep"] == pytest.approx(values["centroid_tre"])
    assert rows["Landmark TRE mean (mm)"] == pytest.approx(
        {"Unregistered": before["landmark_tre"]["mean"], "Deep": after["landmark_tre"]["mean"]}
    )
    assert rows["Runtime (s)"]["Deep"] == pytest.approx(metrics["timings_s"]["total"])
    assert rows["Folding voxels (%)"]["Deep"] == pytest.approx(
        100 * after["jacobian"]["fraction_nonpositive"]
    )
    assert rows["Liver DSC"]["Deep"] > rows["Liver DSC"]["Unregistered"]
    assert "SyN" not in [table_node.GetColumnName(c) for c in range(table_node.GetNumberOfColumns())]


def test_warped_segmentation_equals_the_core_label_map(case, registered):
    fixed, moving_seg = case["nodes"]["fixed"], case["nodes"]["moving_seg"]
    warped = registered["outputs"]["outputSegmentation"]
    core = io.read_label_map(
        registered["out"] / "warped_moving_seg.seg.nrrd", reference=_exported_fixed(case, registered)
    )
    core_ids = sitk.GetArrayFromImage(core.image)
    segmentation = warped.GetSegmentation()
    assert sorted(segment_names(warped)) == sorted(segment_names(moving_seg))
    compared = 0
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(warped, segmentation.GetNthSegmentID(index), fixed)
        expected = core_ids == core.resolve(segment.GetName())
        np.testing.assert_array_equal(mask > 0, expected, err_msg=segment.GetName())
        source = moving_seg.GetSegmentation().GetSegment(
            moving_seg.GetSegmentation().GetSegmentIdBySegmentName(segment.GetName())
        )
        assert segment.GetColor() == pytest.approx(source.GetColor())
        compared += int(expected.any())
    assert compared >= 5


def test_exported_segmentations_share_ids_and_keep_each_segment_voxels(case, registered):
    """The files the core got: same id for the same name (any case) in both, each segment's own voxels."""
    work_dir = registered["run"].work_dir
    for role in ("fixed", "moving"):
        exported = io.read_label_map(work_dir / f"{role}_seg.seg.nrrd")
        original = io.read_label_map(case["folder"] / f"{role}.seg.nrrd", reference=exported.image)
        exported_ids, original_ids = (sitk.GetArrayFromImage(m.image) for m in (exported, original))
        for name in ("liver", "portal_vein", "kidney_left", "body_wall"):
            expected = original_ids == original.resolve(name)
            assert expected.any()
            np.testing.assert_array_equal(exported_ids == registered["run"].label_table.id_of(name), expected)
    assert io.read_label_map(work_dir / "fixed_seg.seg.nrrd").names[1] == "Liver"
    assert io.read_label_map(work_dir / "moving_seg.seg.nrrd").names[1] == "liver"


def test_results_fill_the_chosen_output_nodes(registered):
    result, outputs = registered["run"].result, registered["outputs"]
    assert result.warnings == registered["metrics"]["warnings"]
    assert result.transform is outputs["outputTransform"]
    assert result.volume is outputs["outputVolume"]
    assert result.segmentation is outputs["outputSegmentation"]
    assert result.transform.GetName() == "my transform"
    assert result.table.GetNodeReference("deepVolume") is outputs["outputVolume"]


def test_inputs_are_untouched(case, registered):
    nodes, before = case["nodes"], registered["before"]
    for role in ("fixed", "moving"):
        array, matrix, name = _snapshot_volume(nodes[role])
        np.testing.assert_array_equal(array, before[role][0])
        np.testing.assert_array_equal(matrix, before[role][1])
        assert name == before[role][2]
    for role in ("fixed_seg", "moving_seg"):
        after = _snapshot_segmentation(nodes[role])
        assert after.keys() == before[role].keys()
        for segment_id, stored in before[role].items():
            assert after[segment_id][:2] == stored[:2] and after[segment_id][3] == stored[3]
            np.testing.assert_array_equal(after[segment_id][2], stored[2])
            np.testing.assert_array_equal(after[segment_id][4], stored[4])
    assert nodes["fixed"].GetParentTransformNode() is None
    assert nodes["fixed_seg"].GetParentTransformNode() is None


# --------------------------------------------------------------------------------------------------
# Errors and cancellation leave the scene unchanged
# --------------------------------------------------------------------------------------------------


def _run_folders(root: Path) -> set[Path]:
    return set(root.glob("run-*")) if root.is_dir() else set()


def test_missing_liver_segment_is_refused_before_anything_starts(case, registered):
    nodes = case["nodes"]
    no_liver = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no liver")
    no_liver.GetSegmentation().DeepCopy(nodes["moving_seg"].GetSegmentation())
    no_liver.GetSegmentation().RemoveSegment(no_liver.GetSegmentation().GetSegmentIdBySegmentName("liver"))
    state, folders, parent = (
        _scene_state(),
        _run_folders(case["work_root"]),
        nodes["moving"].GetParentTransformNode(),
    )
    logic = module.DeepAbdominalRegistrationLogic()
    logic.workFolder = case["work_root"]
    with pytest.raises(ValueError, match=r"no segment called 'liver'.*portal_vein"):
        logic.register(
            nodes["fixed"], nodes["moving"], nodes["fixed_seg"], no_liver, waitForCompletion=True, **FAST
        )
    assert _scene_state() == state and _run_folders(case["work_root"]) == folders
    assert nodes["moving"].GetParentTransformNode() is parent
    slicer.mrmlScene.RemoveNode(no_liver)


def test_failing_process_reports_the_core_message_and_changes_nothing(case, registered):
    nodes = case["nodes"]
    state, parent = _scene_state(), nodes["moving"].GetParentTransformNode()
    logic = module.DeepAbdominalRegistrationLogic()
    logic.workFolder = case["work_root"]
    arguments = dict(FAST, model="no-such-model")
    registration = logic.register(
        nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], **arguments
    )
    assert registration.wait(timeout_s=120) == ProcessStatus.FAILED
    assert "no-such-model" in registration.error_message and "exit code" not in registration.error_message
    assert (registration.work_dir / "fixed.nrrd").is_file()  # kept for debugging
    assert _scene_state() == state and nodes["moving"].GetParentTransformNode() is parent
    with pytest.raises(RuntimeError, match="no-such-model"):
        logic.register(nodes["fixed"], nodes["moving"], waitForCompletion=True, **arguments)
    assert _scene_state() == state


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_cancel_kills_the_process_tree_and_leaves_the_scene_unchanged(case, registered):
    nodes = case["nodes"]
    state, parent = _scene_state(), nodes["moving"].GetParentTransformNode()
    logic = module.DeepAbdominalRegistrationLogic()
    logic.workFolder = case["work_root"]
    stages = []
    registration = logic.register(
        nodes["fixed"],
        nodes["moving"],
        nodes["fixed_seg"],
        nodes["moving_seg"],
        progressCallback=lambda fraction, stage: stages.append(stage),
        **dict(FAST, optimizeSteps=500),
    )
    pid = registration.process.pid
    deadline = time.monotonic() + 120
    while not any("instance optimisation" in s for s in stages) and time.monotonic() < deadline:
        assert registration.poll() == ProcessStatus.RUNNING
        time.sleep(0.05)
    logic.cancel()
    assert registration.status == ProcessStatus.CANCELLED and not logic.isRunning
    assert not _group_alive(pid)
    assert not registration.work_dir.exists()
    assert _scene_state() == state and nodes["moving"].GetParentTransformNode() is parent


# --------------------------------------------------------------------------------------------------
# The background-process runner on its own
# --------------------------------------------------------------------------------------------------


def _python(code: str, cwd: Path) -> process.BackgroundProcess:
    progress, log = [], []
    runner = process.BackgroundProcess(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=process.process_environment([]),
        on_progress=lambda f, s: progress.append((f, s)),
        on_log=log.append,
    )
    runner.progress, runner.log = progress, log
    return runner


def test_runner_parses_progress_and_reports_failures(tmp_path):
    runner = _python(
        """
        import sys
        print("PROGRESS 0.250 stage one")
        print("PROGRESS oops not a number")
        print("Traceback: something broke é", file=sys.stderr)
        sys.exit(3)
        """,
        tmp_path,
    )
    runner.start()
    assert runner.wait(timeout_s=60) == ProcessStatus.FAILED
    assert runner.progress == [(0.25, "stage one")]
    assert "PROGRESS oops not a number" in runner.log and "Traceback: something broke é" in runner.log
    assert runner.error_message == "dareg stopped with exit code 3: Traceback: something broke é"


def test_runner_user_error_message_and_exit_codes_match_the_cli(tmp_path):
    from dareg.cli import ExitCode

    assert {c.name: c.value for c in process.ExitCode} == {c.name: c.value for c in ExitCode}
    runner = _python(
        """
        import sys
        print("usage: dareg register [-h] ...", file=sys.stderr)
        print("dareg: error: bad input", file=sys.stderr)
        sys.exit(2)
        """,
        tmp_path,
    )
    runner.start()
    assert runner.wait(timeout_s=60) == ProcessStatus.FAILED and runner.error_message == "bad input"


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_runner_cancel_kills_grandchildren(tmp_path):
    runner = _python(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
        """,
        tmp_path,
    )
    runner.start()
    while not runner.log:
        assert runner.poll() == ProcessStatus.RUNNING
        time.sleep(0.05)
    grandchild = int(runner.log[0])
    runner.cancel()
    assert runner.status == ProcessStatus.CANCELLED
    stat = Path(f"/proc/{grandchild}/stat")
    assert (
        not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"
    )  # gone or a reaped-soon zombie


def test_python_executable_outside_slicer_is_this_interpreter():
    assert process.python_executable() == sys.executable
    assert process.parse_progress("PROGRESS 1.5 done") == process.Progress(1.0, "done")


# --------------------------------------------------------------------------------------------------
# Compare layout, ANTs comparison
# --------------------------------------------------------------------------------------------------


def _composite(view_name: str):
    scene = slicer.mrmlScene
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        if node.GetLayoutName() == view_name:
            return node, slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(node)
    raise AssertionError(f"no slice node {view_name}")


def _check_compare_layout(table_node, expected_volumes: dict) -> None:
    logic = module.DeepAbdominalRegistrationLogic()
    views = logic.showCompareLayout(table_node)
    assert views == [v.name for v in layout.VIEWS[: len(expected_volumes)]]
    layout_node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout_node.GetViewArrangement() == layout.COMPARE_LAYOUT_IDS[len(views)]
    slice_ids = []
    for view, volume in zip(layout.VIEWS, expected_volumes.values(), strict=False):
        slice_node, composite = _composite(view.name)
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetLinkedControl() and slice_node.GetViewGroup() == layout.COMPARE_VIEW_GROUP
        assert slice_node.GetOrientation() == "Axial"
        slice_ids.append(slice_node.GetID())
    references = results.referenced(table_node)
    deep_display = references["deepSegmentation"].GetDisplayNode()
    assert deep_display.GetViewNodeIDs() == (slice_ids[1],) and deep_display.GetVisibility2DOutline()
    assert references["fixedSegmentation"].GetDisplayNode().GetVisibility2DOutline()


def test_compare_layout_shows_fixed_and_deep_linked(case, registered):
    expected = {"fixed": case["nodes"]["fixed"], "deep": registered["outputs"]["outputVolume"]}
    _check_compare_layout(registered["run"].result.table, expected)


def _ants_available() -> bool:
    completed = subprocess.run(
        [sys.executable, "-m", "dareg", "ants", "--help"], capture_output=True, check=False
    )
    return completed.returncode == 0 and importlib.util.find_spec("ants") is not None


@pytest.mark.slow
def test_ants_comparison_puts_syn_beside_deep(case, registered):
    if not _ants_available():
        pytest.skip("`dareg ants` or antspyx is not available")
    nodes = case["nodes"]
    logic = module.DeepAbdominalRegistrationLogic()
    logic.workFolder = case["work_root"]
    logic.keepTemporaryFiles = True
    registration = logic.register(
        nodes["fixed"],
        nodes["moving"],
        nodes["fixed_seg"],
        nodes["moving_seg"],
        runAntsComparison=True,
        waitForCompletion=True,
        **FAST,
    )
    result = registration.result
    assert nodes["moving"].GetParentTransformNode() is result.transform  # deep, not SyN, drives the display
    assert result.syn_transform.GetTransformFromParent().GetInterpolationModeAsString() == "Linear"
    syn_metrics = json.loads((registration.work_dir / "syn" / "metrics.json").read_text(encoding="utf-8"))
    rows = _table_rows(result.table)
    assert rows["Liver DSC"]["SyN"] == pytest.approx(
        syn_metrics["metrics"]["registered"]["labels"]["Liver"]["dice"]
    )
    assert rows["Runtime (s)"]["SyN"] == pytest.approx(syn_metrics["timings_s"]["total"])
    assert rows["Liver DSC"]["SyN"] > rows["Liver DSC"]["Unregistered"]
    expected = {"fixed": nodes["fixed"], "deep": result.volume, "syn": result.syn_volume}
    _check_compare_layout(result.table, expected)


# --------------------------------------------------------------------------------------------------
# The module file: self-test, metadata, parameter node, dependency checker
# --------------------------------------------------------------------------------------------------


def test_module_self_test_runs(monkeypatch):
    monkeypatch.setattr(slicer, "mrmlScene", slicer.mrmlScene)  # restored afterwards
    monkeypatch.setattr(slicer, "modules", slicer.modules)
    slicer_support.use_scene(slicer_support.new_scene())
    outcome = module.DeepAbdominalRegistrationTest("runTest").run()
    assert outcome.wasSuccessful(), outcome.errors + outcome.failures
    assert not outcome.skipped


def test_module_metadata():
    parent = type("Parent", (), {})()
    module.DeepAbdominalRegistration(parent)
    assert parent.categories == ["Registration"]
    assert "FromParent" in parent.helpText and "PLOS ONE" in parent.acknowledgementText


def test_parameter_node_has_the_contract_fields():
    fields = module.DeepAbdominalRegistrationParameterNode._fields
    assert list(fields) == [
        "fixedVolume",
        "movingVolume",
        "fixedSegmentation",
        "movingSegmentation",
        "liverSegmentName",
        "vesselSegmentNames",
        "model",
        "device",
        "optimizeSteps",
        "roiMarginMm",
        "runAntsComparison",
        "outputTransform",
        "outputVolume",
        "outputSegmentation",
    ]
    parameter_node = module.DeepAbdominalRegistrationLogic().getParameterNode()
    assert (parameter_node.liverSegmentName, parameter_node.model, parameter_node.device) == (
        "liver",
        "default",
        "auto",
    )
    assert (parameter_node.optimizeSteps, parameter_node.roiMarginMm, parameter_node.runAntsComparison) == (
        50,
        40.0,
        False,
    )
    with pytest.raises(ValueError):
        parameter_node.optimizeSteps = 501


def test_register_tooltip_says_what_is_missing(case, registered):
    logic = module.DeepAbdominalRegistrationLogic()
    parameter_node = logic.getParameterNode()
    parameter_node.fixedVolume = None
    assert logic.problemWith(parameter_node) == "Select a fixed and a moving volume."
    parameter_node.fixedVolume = case["nodes"]["fixed"]
    parameter_node.movingVolume = case["nodes"]["fixed"]
    assert "must be different" in logic.problemWith(parameter_node)
    parameter_node.movingVolume = case["nodes"]["moving"]
    parameter_node.fixedSegmentation = case["nodes"]["fixed_seg"]
    parameter_node.vesselSegmentNames = "portal_vein"
    assert "need both a fixed and a moving segmentation" in logic.problemWith(parameter_node)
    parameter_node.movingSegmentation = case["nodes"]["moving_seg"]
    parameter_node.vesselSegmentNames = "portal_vein, nonexistent"
    assert "'nonexistent'" in logic.problemWith(parameter_node)
    parameter_node.vesselSegmentNames = " portal_vein , hepatic_veins"
    assert logic.problemWith(parameter_node) is None


def test_result_file_names_match_the_core():
    from dareg import outputs

    assert (run.TRANSFORM_FILE, run.WARPED_IMAGE_FILE, run.METRICS_FILE) == (
        outputs.TRANSFORM_FILE,
        outputs.WARPED_IMAGE_FILE,
        outputs.METRICS_FILE,
    )
    assert outputs.warped_segmentation_name(Path("moving_seg.seg.nrrd")) == run.WARPED_SEGMENTATION_FILE


def _versions(installed: dict[str, str]):
    return lambda name: installed.get(name)


def test_dependencies_missing_respects_host_packages_tensorflow_and_markers():
    requirements = [
        Requirement("numpy>=1.26,<2.4"),
        Requirement("keras>=3.5,<4"),
        Requirement("tensorflow-cpu>=2.18,<2.22; sys_platform != 'nonexistent-os'"),
        Requirement("tensorflow>=2.18,<2.22; sys_platform == 'nonexistent-os'"),
        Requirement("antspyx==0.6.3"),
    ]
    slicer_python = _versions({"numpy": "2.4.6", "keras": "3.2.0", "tensorflow": "2.20.0"})
    missing = dependencies.missing_requirements(requirements, with_ants=False, version_of=slicer_python)
    assert [m.describe() for m in missing] == [
        "keras<4,>=3.5 (3.2.0 installed)"
    ]  # numpy: Slicer's; TF: GPU build
    missing = dependencies.missing_requirements(requirements, with_ants=True, version_of=_versions({}))
    assert [m.name for m in missing] == ["numpy", "keras", "tensorflow-cpu", "antspyx"]


def test_dependencies_pip_commands_protect_slicer_numpy(tmp_path):
    missing = [
        dependencies.Missing(Requirement("antspyx==0.6.3"), None),
        dependencies.Missing(Requirement("tensorflow-cpu>=2.18,<2.22; sys_platform != 'x'"), None),
    ]
    constraints = tmp_path / "constraints.txt"
    commands = dependencies.pip_commands(missing, constraints)
    assert commands[0][0] == "tensorflow-cpu<2.22,>=2.18" and commands[0][-2:] == ["-c", str(constraints)]
    assert set(dependencies.NO_DEPS_PIECES["antspyx"]) <= set(commands[0])
    assert commands[1] == ["antspyx==0.6.3", "--no-deps"]
    text = dependencies.constraints_text(_versions({"numpy": "2.4.6", "scipy": "1.17.1"}))
    assert text == "numpy==2.4.6\nscipy==1.17.1\n"


def test_dependencies_no_deps_pieces_are_antspyx_requirements_minus_numpy_scipy():
    try:
        declared = importlib.metadata.requires("antspyx")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("antspyx is not installed")
    names = {canonicalize_name(Requirement(r).name) for r in declared} - {"numpy", "scipy"}
    assert names == set(dependencies.NO_DEPS_PIECES["antspyx"])


def test_dependencies_ensure_asks_once_and_never_installs_in_testing_mode(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\nnumpy>=1.26\ndareg-no-such-package>=1.0  # trailing comment\n", encoding="utf-8"
    )
    with pytest.raises(dependencies.DependencyError, match="dareg-no-such-package"):
        dependencies.ensure(requirements, with_ants=False, confirm=None, install=None, testing=True)
    questions, installs = [], []
    outcome = dependencies.ensure(
        requirements,
        with_ants=False,
        confirm=lambda q, d: questions.append(d) or False,
        install=installs.append,
        testing=False,
    )
    assert (
        outcome == dependencies.Outcome.DECLINED
        and installs == []
        and questions == ["dareg-no-such-package>=1.0 (not installed)"]
    )
    with pytest.raises(dependencies.DependencyError, match="still missing"):
        dependencies.ensure(
            requirements, with_ants=False, confirm=lambda q, d: True, install=installs.append, testing=False
        )
    assert installs[0][0] == "dareg-no-such-package>=1.0" and installs[0][1] == "-c"


def test_dependencies_this_environment_satisfies_the_module_requirements():
    logic = module.DeepAbdominalRegistrationLogic()
    assert logic.missingDependencies(runAntsComparison=importlib.util.find_spec("ants") is not None) == []


def test_restart_needed_only_for_replaced_packages_already_imported():
    replaced = dependencies.Missing(Requirement("numpy>=99"), "2.3.5")
    new = dependencies.Missing(Requirement("numpy>=99"), None)
    assert dependencies.restart_needed([replaced], ["numpy.linalg"])
    assert not dependencies.restart_needed([replaced], ["json"])
    assert not dependencies.restart_needed([new], ["numpy"])
