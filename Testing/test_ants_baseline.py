"""`dareg ants`: ANTs SyN on the same inputs as `dareg register`, written as the same kind of outputs.

Checks: SyN improves Dice and TRE on a known synthetic deformation; the written transform.nii.gz
reproduces ANTs' own warp (`ants.apply_transforms` on its composite, an independent path); the sign
and direction of the transform on a pure translation; same seed -> same result, another seed ->
another result; metrics.json has register's schema; a bad input exits 2 and writes nothing.
Real antspyx throughout (skipped where it is not installed); ANTs works at 4 mm here to stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dareg import io, outputs
from dareg.baseline import COMPOSITE_FILE, AntsOptions, ants_register
from dareg.cli import ExitCode, main
from dareg.phantom import make_phantom

from cli_helpers import FAST_ARGS, SMALL, folder_listing, write_case

ants = pytest.importorskip("ants")

SPACING = ["--spacing", "4"]


def ants_args(case, out, *extra: str) -> list[str]:
    return [
        "ants",
        "--fixed",
        str(case.fixed),
        "--moving",
        str(case.moving),
        "--fixed-seg",
        str(case.fixed_seg),
        "--moving-seg",
        str(case.moving_seg),
        "--landmarks-fixed",
        str(case.landmarks_fixed),
        "--landmarks-moving",
        str(case.landmarks_moving),
        "--out",
        str(out),
        *SPACING,
        *extra,
    ]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"), seed=0)


@pytest.fixture(scope="module")
def cli_run(case, tmp_path_factory):
    """The installed entry point as a real process, as 3D Slicer runs it."""
    out = tmp_path_factory.mktemp("cli_out")
    completed = subprocess.run(
        [sys.executable, "-m", "dareg", *ants_args(case, out, "--progress-lines")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out, json.loads((out / "metrics.json").read_text()), completed.stdout


@pytest.fixture(scope="module")
def api_run(case, tmp_path_factory):
    """The same run through the API, keeping ANTs' own files; then written like the CLI does."""
    workdir = tmp_path_factory.mktemp("ants_files")
    out = tmp_path_factory.mktemp("api_out")
    result = run_api(case, AntsOptions(spacing_mm=4.0), workdir=workdir)
    outputs.write_result(result, out, segmentation_name="warped_moving_seg.seg.nrrd", run_info={})
    return out, workdir


def run_api(case, options: AntsOptions, **kwargs):
    fixed, moving = io.read_image(case.fixed), io.read_image(case.moving)
    return ants_register(
        fixed,
        moving,
        io.read_label_map(case.fixed_seg, reference=fixed),
        io.read_label_map(case.moving_seg, reference=moving),
        options=options,
        fixed_landmarks=io.read_landmarks(case.landmarks_fixed),
        moving_landmarks=io.read_landmarks(case.landmarks_moving),
        **kwargs,
    )


def test_syn_improves_dice_and_tre_on_a_known_deformation(cli_run):
    _, document, _ = cli_run
    metrics = document["metrics"]
    before, initial, after = metrics["unregistered"], metrics["initial"], metrics["registered"]
    assert document["method"] == "ants-SyN"
    assert after["labels"]["liver"]["dice"] > before["labels"]["liver"]["dice"] + 0.1
    assert after["labels"]["liver"]["dice"] > initial["labels"]["liver"]["dice"]
    assert after["landmark_tre"]["mean"] < 0.5 * before["landmark_tre"]["mean"]
    assert after["landmark_tre"]["mean"] < initial["landmark_tre"]["mean"]
    assert after["jacobian"]["fraction_nonpositive"] == 0.0
    assert document["warnings"] == []
    assert document["timings_s"]["ANTs SyN"] > 0


def test_progress_lines_and_nothing_else_from_ants_on_stdout(cli_run):
    out, _, stdout = cli_run
    lines = stdout.splitlines()
    progress = [float(line.split()[1]) for line in lines if line.startswith("PROGRESS ")]
    assert progress == sorted(progress) and progress[-1] == 1.0
    summary_start = next(i for i, line in enumerate(lines) if not line.startswith("PROGRESS "))
    assert lines[summary_start].split() == ["unregistered,", "initial,", "registered"]
    assert "method: ants-SyN" in stdout and str(out) in stdout


def test_written_transform_reproduces_ants_own_warp(case, api_run):
    """transform.nii.gz through SimpleITK == ANTs applying its own composite (independent reader)."""
    out, workdir = api_run
    fixed, moving = io.read_image(case.fixed), io.read_image(case.moving)
    transform = io.read_transform(out / "transform.nii.gz")
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    by_ants = (
        ants.apply_transforms(
            ants.image_read(str(case.fixed)),
            ants.image_read(str(case.moving)),
            [str(workdir / COMPOSITE_FILE)],
            interpolator="linear",
        )
        .numpy()
        .transpose(2, 1, 0)
    )
    assert np.percentile(np.abs(by_ants - by_sitk), 99.9) < 1e-3 * np.ptp(by_sitk)
    # the warped CT in the output folder is the same warp (rounded to integer HU)
    warped = sitk.GetArrayFromImage(io.read_image(out / "warped_moving.nii.gz")).astype(float)
    inside = by_ants != 0.0
    assert np.percentile(np.abs(warped - by_ants)[inside], 99.9) < 1e-3 * np.ptp(by_sitk) + 0.5


def test_same_seed_same_result_other_seed_other_result(case, cli_run, api_run):
    """CLI (child process) and API runs with seed 0 agree exactly; seed 1 gives another field."""
    first = sitk.GetArrayFromImage(io.read_displacement_field(cli_run[0] / "transform.nii.gz"))
    second = sitk.GetArrayFromImage(io.read_displacement_field(api_run[0] / "transform.nii.gz"))
    np.testing.assert_array_equal(first, second)
    other = sitk.GetArrayFromImage(run_api(case, AntsOptions(spacing_mm=4.0, seed=1)).field)
    assert np.abs(other - first).max() > 1e-3


def translated_case(folder, shift_mm: np.ndarray):
    """Moving = fixed moved by ``shift_mm``: whatever lies at p in fixed lies at p + shift in moving."""
    phantom = make_phantom(seed=1, **SMALL)
    moving, moving_labels = sitk.Image(phantom.image), sitk.Image(phantom.labels)
    for image in (moving, moving_labels):
        image.SetOrigin(tuple(np.add(phantom.image.GetOrigin(), shift_mm)))
    liver = np.argwhere(sitk.GetArrayViewFromImage(phantom.labels) == 1)[::997][:, ::-1]
    points = np.array([phantom.image.TransformIndexToPhysicalPoint(tuple(map(int, p))) for p in liver])
    folder.mkdir()
    paths = {
        name: folder / name for name in ("f.nii.gz", "m.nii.gz", "fs.nii.gz", "ms.nii.gz", "f.csv", "m.csv")
    }
    io.write_image(phantom.image, paths["f.nii.gz"])
    io.write_image(moving, paths["m.nii.gz"])
    io.write_label_map(io.LabelMap(phantom.labels, dict(phantom.names)), paths["fs.nii.gz"])
    io.write_label_map(io.LabelMap(moving_labels, dict(phantom.names)), paths["ms.nii.gz"])
    io.write_landmarks(points, paths["f.csv"])
    io.write_landmarks(points + shift_mm, paths["m.csv"])
    return paths, points


def test_pure_translation_maps_p_to_p_plus_t(tmp_path):
    """From the identity (--init none), ANTs alone must find T(p) = p + t, not p - t."""
    shift = np.array([9.0, -6.0, 5.0])
    paths, points = translated_case(tmp_path / "case", shift)
    out = tmp_path / "out"
    args = ["ants", "--fixed", str(paths["f.nii.gz"]), "--moving", str(paths["m.nii.gz"])]
    args += ["--fixed-seg", str(paths["fs.nii.gz"]), "--moving-seg", str(paths["ms.nii.gz"])]
    args += ["--landmarks-fixed", str(paths["f.csv"]), "--landmarks-moving", str(paths["m.csv"])]
    assert main([*args, "--init", "none", *SPACING, "--out", str(out)]) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["metrics"]["unregistered"]["landmark_tre"]["mean"] == pytest.approx(np.linalg.norm(shift))
    assert document["metrics"]["initial"]["landmark_tre"]["max"] < 1.0  # ANTs' affine stage, sign included
    mapped = io.read_landmarks(out / "landmarks_fixed_in_moving.csv")
    np.testing.assert_allclose(mapped - points, np.broadcast_to(shift, points.shape), atol=1.0)
    transform = io.read_transform(out / "transform.nii.gz")
    displacement = np.array([np.subtract(transform.TransformPoint(tuple(p)), p) for p in points])
    np.testing.assert_allclose(np.median(displacement, axis=0), shift, atol=0.5)


def key_tree(value):
    """The nested key structure of a JSON document (values dropped)."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    return None


def test_metrics_json_has_the_schema_of_register(case, cli_run, tmp_path):
    out = tmp_path / "register_out"
    landmarks = [
        "--landmarks-fixed",
        str(case.landmarks_fixed),
        "--landmarks-moving",
        str(case.landmarks_moving),
    ]
    assert main(case.args(out) + landmarks) == 0
    dareg_document = json.loads((out / "metrics.json").read_text())
    ants_document = cli_run[1]
    for document in (dareg_document, ants_document):
        document["run"].pop("options")  # each method's own settings
        document.pop("timings_s")  # each method's own stages
    assert key_tree(ants_document) == key_tree(dareg_document)
    # one measurement for every method: the same pair gives the same "unregistered" numbers
    before_dareg, before_ants = (
        dareg_document["metrics"]["unregistered"],
        ants_document["metrics"]["unregistered"],
    )
    for key in ("ncc", "ssim"):
        assert before_ants[key] == pytest.approx(before_dareg[key], rel=1e-4)
    for name, values in before_dareg["labels"].items():
        assert before_ants["labels"][name] == pytest.approx(values, rel=1e-4, nan_ok=True)
    assert before_ants["landmark_tre"] == pytest.approx(before_dareg["landmark_tre"], rel=1e-6)
    assert dareg_document["method"] == "dareg" and ants_document["method"] == "ants-SyN"
    assert ants_document["run"]["command"] == "ants"
    assert FAST_ARGS[-1] == "none"  # the register run above is the model-free pipeline


def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(ants_args(case, out, "--liver-label", "77"))
    captured = capsys.readouterr()
    assert code == ExitCode.USER_ERROR == 2
    assert captured.err.startswith("dareg: error:") and "Traceback" not in captured.err
    assert "77" in captured.err
    assert folder_listing(out) == []
