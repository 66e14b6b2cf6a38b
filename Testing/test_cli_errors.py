"""Bad input: one clear message, exit code 2, no traceback, no partial outputs, inputs untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dareg.cli import ExitCode, main

from cli_helpers import Case, folder_listing, write_case


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return write_case(tmp_path_factory.mktemp("case"))


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def run_failing(args, capsys, out, expected: str) -> str:
    before = folder_listing(out)
    code = main(args)
    captured = capsys.readouterr()
    assert code == ExitCode.USER_ERROR == 2
    assert "Traceback" not in captured.err
    assert captured.err.startswith("dareg: error:")
    assert expected.lower() in captured.err.lower(), captured.err
    assert folder_listing(out) == before, "a failed run left files behind"
    return captured.err


def replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_missing_file(case, tmp_path, capsys):
    out = tmp_path / "out"
    args = replace_arg(case.args(out), "--moving", str(tmp_path / "nope.nii.gz"))
    run_failing(args, capsys, out, "not found")


def test_unreadable_file(case, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not an image" * 10)
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--fixed", str(broken)), capsys, out, "cannot")


@pytest.mark.parametrize("dimension, what", [(2, "2-D"), (4, "4-D")])
def test_wrong_dimensionality(case, tmp_path, capsys, dimension, what):
    path = tmp_path / f"image{dimension}d.nii.gz"
    if dimension == 2:
        image = sitk.GetImageFromArray(np.zeros((40, 50), np.float32))
    else:
        volume = sitk.GetImageFromArray(np.zeros((10, 12, 14), np.float32))
        image = sitk.JoinSeries([volume, volume, volume])  # a time series: x, y, z, t
    sitk.WriteImage(image, str(path))
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--fixed", str(path)), capsys, out, what)


def test_nan_voxels(case, tmp_path, capsys):
    image = sitk.ReadImage(str(case.moving))
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(bad, str(path))
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--moving", str(path)), capsys, out, "NaN")


def test_no_physical_overlap(case, tmp_path, capsys):
    image = sitk.ReadImage(str(case.moving))
    image.SetOrigin((5000.0, 0.0, 0.0))
    path = tmp_path / "far.nii.gz"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "out"
    args = replace_arg(case.args(out, segs=False), "--moving", str(path))
    run_failing(args, capsys, out, "do not overlap")


def test_liver_label_absent(case, tmp_path, capsys):
    out = tmp_path / "out"
    run_failing(case.args(out) + ["--liver-label", "77"], capsys, out, "available labels: 1, 2")


def test_empty_mask(case, tmp_path, capsys):
    image = sitk.ReadImage(str(case.fixed))
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    path = tmp_path / "empty_seg.nii.gz"
    sitk.WriteImage(empty, str(path))
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--fixed-seg", str(path)), capsys, out, "segmentation is empty")


def test_all_foreground_mask(case, tmp_path, capsys):
    image = sitk.ReadImage(str(case.fixed))
    full = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    full.CopyInformation(image)
    path = tmp_path / "full_seg.nii.gz"
    sitk.WriteImage(full, str(path))
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--fixed-seg", str(path)), capsys, out, "covers the whole image")


def test_segmentation_outside_its_image(case, tmp_path, capsys):
    labels = sitk.ReadImage(str(case.fixed_seg))
    labels.SetOrigin((0.0, 9000.0, 0.0))
    path = tmp_path / "shifted_seg.nii.gz"
    sitk.WriteImage(labels, str(path))
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--fixed-seg", str(path)), capsys, out, "does not overlap")


def test_unwritable_output_folder(case, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    run_failing(case.args(out), capsys, out, "cannot write")
    assert blocker.read_text() == "not a folder"


def test_unknown_model(case, tmp_path, capsys):
    out = tmp_path / "out"
    run_failing(replace_arg(case.args(out), "--model", "no-such-model"), capsys, out, "no-such-model")


def test_mismatched_landmark_counts(case, tmp_path, capsys):
    short = tmp_path / "short.csv"
    lines = case.landmarks_moving.read_text().splitlines()
    short.write_text("\n".join(lines[:3]) + "\n")
    out = tmp_path / "out"
    args = case.args(out) + ["--landmarks-fixed", str(case.landmarks_fixed), "--landmarks-moving", str(short)]
    run_failing(args, capsys, out, "correspond")


def test_inputs_untouched_and_real_process_exit_code(case, tmp_path):
    """The installed entry point, as a real process: exit 2, message, no traceback; inputs unchanged."""
    inputs = [case.fixed, case.moving, case.fixed_seg, case.moving_seg]
    before = digest(inputs)
    out = tmp_path / "out"
    args = (
        replace_arg(case.args(out), "--liver-label", "77")
        if "--liver-label" in case.args(out)
        else case.args(out) + ["--liver-label", "77"]
    )
    completed = subprocess.run(
        [sys.executable, "-m", "dareg", *args], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and "dareg: error:" in completed.stderr
    assert digest(inputs) == before
    assert folder_listing(out) == []
