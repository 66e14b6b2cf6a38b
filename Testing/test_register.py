"""The registration pipeline end to end: accuracy on known deformations, physical correctness on
oblique/anisotropic grids, one transform that SimpleITK, ANTs and Slicer's MRML apply identically,
warnings when registration makes things worse, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from dareg import io
from dareg.assessment import worse_warnings
from dareg.cli import main
from dareg.phantom import make_phantom, make_synthetic_pair
from dareg.register import RegistrationOptions, register

from cli_helpers import FAST_ARGS, write_case
from conftest import rotation_matrix


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory):
    """Fixed on an oblique left-handed grid, moving on a different oblique, anisotropic grid."""
    fixed_direction = rotation_matrix([1.0, 2.0, 0.5], 25.0) @ np.diag([1.0, -1.0, 1.0])
    reference = sitk.Image([56, 60, 40], sitk.sitkFloat32)
    reference.SetSpacing((4.2, 3.4, 5.0))
    moving_direction = rotation_matrix([0.2, -0.4, 1.0], 15.0)
    reference.SetDirection(tuple(moving_direction.ravel()))
    centre = moving_direction @ (np.array([55, 59, 39]) * np.array([4.2, 3.4, 5.0]) / 2)
    reference.SetOrigin(tuple(-centre))
    return write_case(
        tmp_path_factory.mktemp("oblique"), direction=fixed_direction, moving_reference=reference
    )


@pytest.fixture(scope="module")
def oblique_run(oblique_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("oblique_out")
    args = oblique_case.args(out) + [
        "--landmarks-fixed",
        str(oblique_case.landmarks_fixed),
        "--landmarks-moving",
        str(oblique_case.landmarks_moving),
    ]
    args[args.index("--optimize") + 1] = "40"
    args[args.index("--grid") + 1] = "64"
    assert main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_registration_improves_dice_and_tre_on_oblique_grids(oblique_run):
    _, document = oblique_run
    before, after = document["metrics"]["unregistered"], document["metrics"]["registered"]
    assert after["labels"]["liver"]["dice"] > before["labels"]["liver"]["dice"] + 0.1
    assert after["landmark_tre"]["mean"] < 0.5 * before["landmark_tre"]["mean"]
    assert after["ncc"] > before["ncc"]
    assert after["jacobian"]["fraction_nonpositive"] == 0.0
    assert document["warnings"] == []


def test_outputs_are_consistent_with_the_transform(oblique_case, oblique_run):
    """warped = moving(T(x)) and warped labels keep label ids, all on the fixed grid."""
    out, document = oblique_run
    fixed = io.read_image(oblique_case.fixed)
    moving = io.read_image(oblique_case.moving)
    transform = io.read_transform(out / "transform.nii.gz")
    warped = io.read_image(out / document["files"]["warped_image"])
    assert warped.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(warped.GetDirection(), fixed.GetDirection(), atol=1e-5)
    expected = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected), atol=0.5)
    warped_labels = io.read_label_map(out / document["files"]["warped_segmentation"])
    moving_labels = io.read_label_map(oblique_case.moving_seg)
    assert set(warped_labels.label_ids()) <= set(moving_labels.label_ids())
    assert warped_labels.names == moving_labels.names
    mapped = io.read_landmarks(out / document["files"]["mapped_landmarks"])
    fixed_points = io.read_landmarks(oblique_case.landmarks_fixed)
    # the file stores the field as float32: agreement to well under a micrometre, not to the last bit
    np.testing.assert_allclose(mapped, [transform.TransformPoint(tuple(p)) for p in fixed_points], atol=1e-3)


def test_transform_file_agrees_in_simpleitk_ants_and_slicer(oblique_case, oblique_run):
    """The same transform.nii.gz through three independent readers."""
    ants = pytest.importorskip("ants")
    slicer = pytest.importorskip("slicer")
    out, _ = oblique_run
    path = out / "transform.nii.gz"
    transform = io.read_transform(path)
    fixed = io.read_image(oblique_case.fixed)
    moving = io.read_image(oblique_case.moving)
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    by_ants = (
        ants.apply_transforms(
            ants.image_read(str(oblique_case.fixed)),
            ants.image_read(str(oblique_case.moving)),
            [str(path)],
            interpolator="linear",
        )
        .numpy()
        .transpose(2, 1, 0)
    )
    assert np.percentile(np.abs(by_ants - by_sitk), 99.9) < 1e-3 * np.ptp(by_sitk)

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    grid_transform = node.GetTransformFromParent()
    grid_transform.SetInterpolationModeToLinear()  # Slicer's default is cubic; ITK and ANTs are linear
    rng = np.random.default_rng(0)
    corners = np.array(
        [
            fixed.TransformContinuousIndexToPhysicalPoint(tuple(c))
            for c in rng.uniform(0, 1, (200, 3)) * (np.array(fixed.GetSize()) - 1)
        ]
    )
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    by_slicer = np.array([grid_transform.TransformPoint(tuple(p * lps_to_ras)) for p in corners]) * lps_to_ras
    by_itk = np.array([transform.TransformPoint(tuple(p)) for p in corners])
    assert np.abs(by_slicer - by_itk).max() < 1e-2  # mm; float32 storage of the field and header


def test_real_ct_with_known_deformation_improves_dice_and_tre(shared_data, tmp_path):
    """Acceptance: the shared TotalSegmentator CT, warped by a known deformation, registered."""
    fixed = io.read_image(shared_data / "example_ct.nii.gz")
    labels = io.read_label_map(shared_data / "example_ct_seg.nii.gz", reference=fixed)
    pair = make_synthetic_pair(
        fixed,
        labels.image,
        seed=3,
        landmark_labels=(5,),
        max_deformation_mm=8.0,
        max_rotation_deg=5.0,
        max_translation_mm=10.0,
    )
    io.write_image(pair.moving_image, tmp_path / "moving.nii.gz")
    io.write_label_map(io.LabelMap(pair.moving_labels, {}), tmp_path / "moving_seg.nii.gz")
    io.write_landmarks(pair.fixed_landmarks, tmp_path / "fixed.csv")
    io.write_landmarks(pair.moving_landmarks, tmp_path / "moving.csv")
    out = tmp_path / "out"
    code = main(
        [
            "register",
            "--fixed",
            str(shared_data / "example_ct.nii.gz"),
            "--moving",
            str(tmp_path / "moving.nii.gz"),
            "--fixed-seg",
            str(shared_data / "example_ct_seg.nii.gz"),
            "--moving-seg",
            str(tmp_path / "moving_seg.nii.gz"),
            "--liver-label",
            "5",
            "--labels",
            "5",
            "63",
            "64",
            "--landmarks-fixed",
            str(tmp_path / "fixed.csv"),
            "--landmarks-moving",
            str(tmp_path / "moving.csv"),
            "--model",
            "none",
            "--grid",
            "96",
            "--optimize",
            "40",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads((out / "metrics.json").read_text())
    before, after = document["metrics"]["unregistered"], document["metrics"]["registered"]
    print(
        "liver DSC",
        before["labels"]["5"]["dice"],
        "->",
        after["labels"]["5"]["dice"],
        "landmark TRE",
        before["landmark_tre"]["mean"],
        "->",
        after["landmark_tre"]["mean"],
    )
    assert after["labels"]["5"]["dice"] > before["labels"]["5"]["dice"] + 0.05
    assert after["landmark_tre"]["mean"] < 0.5 * before["landmark_tre"]["mean"]
    assert after["labels"]["5"]["centroid_tre"] < before["labels"]["5"]["centroid_tre"]


def test_same_seed_same_result():
    phantom = make_phantom(size=(48, 40, 32), spacing=(5.0, 5.0, 6.0), seed=4)
    pair = make_synthetic_pair(phantom.image, phantom.labels, seed=4)
    options = RegistrationOptions(model="none", optimize_steps=5, grid_shape=(32, 32, 32))
    seg = io.LabelMap(phantom.labels, dict(phantom.names))
    moving_seg = io.LabelMap(pair.moving_labels, dict(phantom.names))
    first = register(phantom.image, pair.moving_image, seg, moving_seg, options=options)
    second = register(phantom.image, pair.moving_image, seg, moving_seg, options=options)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(first.field), sitk.GetArrayFromImage(second.field), atol=1e-6
    )


def test_images_only_registration_runs_without_segmentations(tmp_path):
    case = write_case(tmp_path / "case", seed=1)
    out = tmp_path / "out"
    assert main(case.args(out, segs=False)) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert "labels" not in document["metrics"]["registered"]
    assert document["metrics"]["registered"]["ncc"] > document["metrics"]["unregistered"]["ncc"]
    assert "warped_segmentation" not in document["files"]


def test_worse_results_become_warnings():
    block = {"ncc": 0.9, "labels": {"liver": {"dice": 0.9}}, "landmark_tre": {"mean": 2.0}}
    worse = {
        "ncc": 0.7,
        "labels": {"liver": {"dice": 0.6}},
        "landmark_tre": {"mean": 5.0},
        "jacobian": {"fraction_nonpositive": 0.02},
    }
    warnings = worse_warnings({"unregistered": block, "registered": worse})
    assert len(warnings) == 4
    assert any("NCC" in w for w in warnings) and any("liver" in w for w in warnings)
    assert any("TRE" in w for w in warnings) and any("folds" in w for w in warnings)
    assert (
        worse_warnings(
            {"unregistered": block, "registered": {**block, "jacobian": {"fraction_nonpositive": 0}}}
        )
        == []
    )


def test_summary_printed_and_progress_lines(tmp_path, capsys):
    case = write_case(tmp_path / "case", seed=2)
    out = tmp_path / "out"
    assert main(case.args(out) + ["--progress-lines"]) == 0
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("PROGRESS ")]
    fractions = [float(line.split()[1]) for line in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "DSC" in printed and "\nliver " in printed and "outputs:" in printed and str(out) in printed
    assert FAST_ARGS[0] == "--grid"
