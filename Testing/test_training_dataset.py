"""Training datasets (dareg.training.dataset and ``dareg prepare``): subject files, split, streaming.

Real CT tests read the TotalSegmentator examples from ../shared (listed in a CSV in tmp_path, never
copied) and are skipped when ../shared is absent; everything else uses small phantoms written to tmp_path.
Oracles are independent of the code under test: liver centroids and HU from SimpleITK on the source files,
one-hot encodings against the stored label arrays, split sizes counted by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dareg import io
from dareg.cli import main
from dareg.errors import DaregError
from dareg.geometry import normalisation_config, normalize_ct
from dareg.phantom import make_phantom
from dareg.training import dataset as ds

GRID = 32
TOTALSEG_NAMES = {0: "background", 1: "parenchyma", 2: "vessels"}
REAL_SUBJECTS = {  # id: (image, label map) in ../shared/data/totalsegmentator
    "ct": ("example_ct.nii.gz", "example_ct_seg.nii.gz"),
    "ct_sm": ("example_ct_sm.nii.gz", "example_ct_sm_seg.nii.gz"),
    "dicom": ("example_ct_dicom", "example_ct_dicom_seg.nii.gz"),
}
#: Small phantom geometry (x, y, z): a subject prepares in a fraction of a second.
SMALL_PHANTOM = {"size": (64, 56, 44), "spacing": (3.75, 3.6, 4.4)}


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_phantom_pair(folder: Path, name: str, *, seed: int = 0) -> tuple[Path, Path]:
    """A phantom CT and its label map (phantom ids: liver 1, portal vein 2, ...) as NIfTI files."""
    phantom = make_phantom(seed=seed, **SMALL_PHANTOM)
    image, labels = folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz"
    io.write_image(phantom.image, image)
    io.write_label_map(io.LabelMap(phantom.labels), labels)
    return image, labels


def physical_centroid(mask: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """LPS centroid (mm) of a (z, y, x) boolean mask on ``reference``'s grid."""
    index = np.argwhere(mask).mean(axis=0)[::-1]
    return np.asarray(reference.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def box_corners(low, high) -> list[list]:
    """The 8 corners of an axis-aligned box (x, y, z)."""
    return [
        [(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]]
        for a in (0, 1)
        for b in (0, 1)
        for c in (0, 1)
    ]


def edge_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS mm) bounds of an axis-aligned image's voxel-edge box."""
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint(c)
        for c in box_corners([-0.5] * 3, [n - 0.5 for n in size])
    ]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def read_skipped(dataset_dir: Path) -> dict[str, str]:
    with (dataset_dir / ds.SKIPPED_FILE).open(newline="") as file:
        return {row["id"]: row["reason"] for row in csv.DictReader(file)}


# ---------------------------------------------------------------------------------------------------------
# Real CTs through the command line
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory) -> tuple[Path, int, str]:
    """The three TotalSegmentator examples (NIfTI, NIfTI, DICOM series) prepared by ``dareg prepare``."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA} (it lives beside the repository in ../shared)"
        )
    folder = tmp_path_factory.mktemp("real")
    rows = [
        {"id": sid, "image": str(SHARED_DATA / image), "labels": str(SHARED_DATA / labels)}
        for sid, (image, labels) in REAL_SUBJECTS.items()
    ]
    listing = write_csv(folder / "subjects.csv", rows)
    out = folder / "dataset"
    argv = ["prepare", "--inputs", str(listing), "--out", str(out), "--grid", str(GRID)]
    code = main([*argv, "--val-fraction", "0.34", "--test-fraction", "0.34", "--seed", "7"])
    return out, code, str(SHARED_DATA)


@pytest.mark.shared_data
@pytest.mark.parametrize("subject_id", sorted(REAL_SUBJECTS))
def test_real_ct_subject_file(real_dataset, subject_id):
    """Shapes, ranges, label ids, attributes; the liver lands where the source label map has it."""
    out, code, shared = real_dataset
    assert code == 0
    subject = ds.read_subject(out / f"{subject_id}.h5")
    image_path, labels_path = (Path(shared) / name for name in REAL_SUBJECTS[subject_id])

    assert subject.image.shape == subject.labels.shape == (GRID,) * 3
    assert subject.image.dtype == np.float32 and subject.labels.dtype == np.uint8
    assert 0.0 <= subject.image.min() < 0.1 and 0.9 < subject.image.max() <= 1.0
    assert set(np.unique(subject.labels)) == {0, 1, 2}  # liver and the portal vein / IVC are in every ROI
    attrs = subject.attrs
    assert attrs["format_version"] == ds.SUBJECT_FORMAT_VERSION
    assert attrs["label_names"] == TOTALSEG_NAMES and attrs["label_ids"] == (1, 2)
    assert attrs["label_mapping"] == {5: 1, 63: 2, 64: 2}
    assert (attrs["source_image"], attrs["source_labels"]) == (str(image_path), str(labels_path))
    assert attrs["normalisation"] == normalisation_config()
    # ~1 mm isotropic intermediate grid over the same box as the model grid
    extent_mm = np.asarray(attrs["spacing_mm"]) * GRID
    assert np.allclose(attrs["isotropic_shape"], extent_mm, atol=1.0)

    ct = io.read_image(image_path)
    source_labels = sitk.ReadImage(str(labels_path))  # on its own grid (flipped y axis for the DICOM)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(source_labels == 5, sitk.sitkUInt8))
    grid = ds.subject_grid(subject).reference_image()
    # The liver's centroid, from the source file, is the parenchyma's centroid in the model grid.
    liver_centroid = np.asarray(stats.GetCentroid(1))
    assert np.linalg.norm(physical_centroid(subject.labels == 1, grid) - liver_centroid) < 2.0

    # The grid's box (voxel edges) holds the liver's box + 40 mm, as far as the CT reaches.
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    liver_corners = [
        source_labels.TransformIndexToPhysicalPoint(corner)
        for corner in box_corners((x0, y0, z0), (x0 + sx - 1, y0 + sy - 1, z0 + sz - 1))
    ]
    ct_low, ct_high = edge_box(ct)
    want_low = np.maximum(np.min(liver_corners, axis=0) - 40.0, ct_low)
    want_high = np.minimum(np.max(liver_corners, axis=0) + 40.0, ct_high)
    grid_low, grid_high = edge_box(grid)
    tolerance = 0.51 * np.asarray(ct.GetSpacing())  # the ROI snaps to the CT's voxel centres
    assert np.all(grid_low <= want_low + tolerance) and np.all(grid_high >= want_high - tolerance)
    assert np.all(grid_low >= ct_low - 1e-3) and np.all(grid_high <= ct_high + 1e-3)

    # Image and labels agree with a plain, direct resampling of the sources onto the stored grid (no
    # anti-aliasing, no 1 mm step: an independent path; a flipped or shifted array would not agree).
    identity = sitk.Transform()
    direct_hu = sitk.Resample(ct, grid, identity, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    direct = normalize_ct(sitk.GetArrayFromImage(direct_hu))
    assert np.corrcoef(direct.ravel(), subject.image.ravel())[0, 1] > 0.85
    assert np.abs(direct - subject.image).mean() < 0.1
    direct_ids = sitk.GetArrayFromImage(
        sitk.Resample(source_labels, grid, identity, sitk.sitkNearestNeighbor)
    )
    for label, source_ids, minimum in ((1, [5], 0.95), (2, [63, 64], 0.8)):
        expected, found = np.isin(direct_ids, source_ids), subject.labels == label
        assert 2 * (expected & found).sum() / (expected.sum() + found.sum()) > minimum

    # Intensities: the parenchyma's mean equals the source liver's mean HU through the CT window.
    fitted = io.read_label_map(labels_path, reference=ct)
    liver_hu = sitk.GetArrayViewFromImage(ct)[sitk.GetArrayViewFromImage(fitted.image) == 5].mean()
    assert abs(subject.image[subject.labels == 1].mean() - normalize_ct(np.array([liver_hu]))[0]) < 0.05


@pytest.mark.shared_data
def test_real_ct_split_and_report(real_dataset, capsys):
    out, code, _ = real_dataset
    assert code == 0
    split = ds.load_split(out)
    assert {key: len(paths) for key, paths in split.items()} == {"train": 1, "val": 1, "test": 1}
    assert sorted(p.stem for paths in split.values() for p in paths) == sorted(REAL_SUBJECTS)
    info = ds.load_dataset_info(out)
    assert info["grid_shape"] == [GRID] * 3 and info["label_names"] == TOTALSEG_NAMES
    assert info["seed"] == 7
    assert read_skipped(out) == {}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{sid}.h5" for sid in REAL_SUBJECTS] + [ds.SPLIT_FILE, ds.SKIPPED_FILE]
    )  # no temporary files left behind


# ---------------------------------------------------------------------------------------------------------
# Bad subjects and bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_broken_subjects_are_skipped_and_reported(tmp_path, capsys):
    """Unreadable file, no liver, a label map of another place: skipped with reasons; the rest succeed."""
    good_image, good_labels = write_phantom_pair(tmp_path, "good", seed=1)
    other_image, _ = write_phantom_pair(tmp_path, "other", seed=2)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    phantom_labels = sitk.ReadImage(str(good_labels))
    no_liver = tmp_path / "no_liver_seg.nii.gz"
    sitk.WriteImage(sitk.ChangeLabel(phantom_labels, {1: 0}), str(no_liver))
    elsewhere = tmp_path / "elsewhere_seg.nii.gz"
    moved = sitk.Image(phantom_labels)
    moved.SetOrigin(tuple(np.asarray(moved.GetOrigin()) + [0.0, 0.0, 150.0]))  # mostly beyond the CT
    sitk.WriteImage(moved, str(elsewhere))
    listing = write_csv(
        tmp_path / "subjects.csv",
        [
            {"id": "good", "image": good_image.name, "labels": good_labels.name},  # relative to the CSV
            {"id": "broken", "image": broken.name, "labels": good_labels.name},
            {"id": "no_liver", "image": other_image.name, "labels": no_liver.name},
            {"id": "elsewhere", "image": other_image.name, "labels": elsewhere.name},
        ],
    )
    out = tmp_path / "dataset"
    args = ["prepare", "--inputs", str(listing), "--out", str(out), "--grid", str(GRID)]
    code = main([*args, "--label-map", "phantom", "--liver-label", "1"])

    assert code == 0
    stderr = capsys.readouterr().err
    reasons = read_skipped(out)
    assert set(reasons) == {"broken", "no_liver", "elsewhere"}
    assert "Cannot read image" in reasons["broken"]
    assert "No liver" in reasons["no_liver"]
    assert "does not match the image" in reasons["elsewhere"]
    for subject_id in reasons:
        assert f"skipped {subject_id}:" in stderr
    assert [p.name for paths in ds.load_split(out).values() for p in paths] == ["good.h5"]
    good = ds.read_subject(out / "good.h5")
    assert set(np.unique(good.labels)) == {0, 1, 2} and good.attrs["label_mapping"] == {
        1: 1,
        2: 2,
        3: 2,
        4: 1,
        9: 2,
    }
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]


def test_no_subjects_exit_code_2(tmp_path, capsys):
    empty, out = tmp_path / "empty", tmp_path / "dataset"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["prepare", "--inputs", str(empty), "--out", str(out)]) == 2
    assert "No subjects found" in capsys.readouterr().err
    assert not out.exists()


def test_no_usable_subject_exit_code_2(tmp_path, capsys):
    (tmp_path / "a.nii.gz").write_bytes(b"garbage")
    (tmp_path / "a_seg.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "dataset"
    assert main(["prepare", "--inputs", str(tmp_path), "--out", str(out)]) == 2
    assert "No usable subject among 1 (a: Cannot read" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "40"], "multiple of 16"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "sum to less than 1"),
        (["--label-map", "no_such_map"], "neither a preset"),
    ],
)
def test_bad_options_exit_code_2(tmp_path, capsys, argv, message):
    write_phantom_pair(tmp_path, "a")
    assert main(["prepare", "--inputs", str(tmp_path), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_labels_outside_the_map_name_the_subject(tmp_path):
    """A dataset prepared with more labels than training expects fails before the first item."""
    (tmp_path / "in").mkdir()
    write_phantom_pair(tmp_path / "in", "subject_a")
    out = tmp_path / "dataset"
    args = ["prepare", "--inputs", str(tmp_path / "in"), "--out", str(out), "--grid", str(GRID)]
    assert main([*args, "--label-map", "identity", "--liver-label", "1", "--val-fraction", "0"]) == 0
    paths = ds.load_split(out)["train"]
    assert ds.read_subject(paths[0]).attrs["label_ids"] == tuple(range(1, 11))  # phantom ids kept
    with pytest.raises(DaregError, match=r"Subject subject_a .* label ids \[3, 4, 5, 6, 7, 8, 9, 10\]"):
        ds.iter_training_arrays(paths, num_labels=2)
    with pytest.raises(DaregError, match="subject_a"):
        ds.training_arrays(paths, num_labels=2)
    # Labels changed behind the attributes' back are caught while streaming.
    with h5py.File(paths[0], "r+") as file:
        file["labels"][0, 0, 0] = 12
    stream = ds.iter_training_arrays(paths, num_labels=10)
    with pytest.raises(DaregError, match=r"Subject subject_a .* \[12\]"):
        next(stream)


# ---------------------------------------------------------------------------------------------------------
# Finding subjects
# ---------------------------------------------------------------------------------------------------------


def test_folder_pairing_rule(tmp_path):
    for name in [
        "A.nii.gz",
        "A_seg.nii.gz",
        "B.nrrd",
        "B.seg.nrrd",
        "C_labels.nii.gz",
        "D.mha",
        "E_seg.nii.gz",
    ]:
        (tmp_path / name).touch()
    for name in ["F.nii.gz", "F.nrrd", "F_seg.nii.gz", "notes.txt", ".hidden.nii.gz", ".hidden_seg.nii.gz"]:
        (tmp_path / name).touch()
    (tmp_path / "C").mkdir()  # a DICOM series folder
    (tmp_path / "out").mkdir()  # the output folder is never an input
    found, skipped = ds.find_subjects([tmp_path], exclude=tmp_path / "out")
    assert {s.subject_id: (s.image.name, s.labels.name) for s in found} == {
        "A": ("A.nii.gz", "A_seg.nii.gz"),
        "B": ("B.nrrd", "B.seg.nrrd"),
        "C": ("C", "C_labels.nii.gz"),
    }
    reasons = {s.subject_id: s.reason for s in skipped}
    assert set(reasons) == {"D", "E", "F"}
    assert "no label file" in reasons["D"] and "no image" in reasons["E"] and "several" in reasons["F"]


def test_csv_listing(tmp_path):
    (tmp_path / "sub").mkdir()
    rows = [
        {"image": "sub/x 1.nii.gz", "labels": "sub/x 1_seg.nii.gz", "id": ""},
        {"image": "/abs/y.nrrd", "labels": "/abs/y.seg.nrrd", "id": "patient/7"},
        {"image": "/abs/z.nrrd", "labels": "", "id": "z"},
        {"image": "/abs/other.nrrd", "labels": "/abs/other_seg.nrrd", "id": "patient_7"},
    ]
    found, skipped = ds.find_subjects([write_csv(tmp_path / "list.csv", rows)])
    assert [(s.subject_id, s.image, s.labels) for s in found] == [
        ("x_1", tmp_path / "sub/x 1.nii.gz", tmp_path / "sub/x 1_seg.nii.gz"),
        ("patient_7", Path("/abs/y.nrrd"), Path("/abs/y.seg.nrrd")),
    ]
    reasons = [(s.subject_id, s.reason) for s in skipped]
    assert reasons[0][0] == "z" and "empty" in reasons[0][1]
    assert reasons[1][0] == "patient_7" and "ids must be unique" in reasons[1][1]
    write_csv(tmp_path / "bad.csv", [{"path": "a.nii.gz", "seg": "a_seg.nii.gz"}])
    with pytest.raises(DaregError, match="needs the columns 'image' and 'labels'"):
        ds.find_subjects([tmp_path / "bad.csv"])


# ---------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------


def test_split_is_seeded_and_respects_fractions():
    ids = [f"s{i:02d}" for i in range(20)]
    split = ds.make_split(ids, seed=3, val_fraction=0.1, test_fraction=0.15)
    assert {k: len(v) for k, v in split.items()} == {"train": 15, "val": 2, "test": 3}
    assert sorted(sum(split.values(), [])) == ids  # every subject in exactly one set
    assert split == ds.make_split(ids[::-1], seed=3, val_fraction=0.1, test_fraction=0.15)
    others = [ds.make_split(ids, seed=s, val_fraction=0.1, test_fraction=0.15) for s in range(4, 8)]
    assert any(other["test"] != split["test"] for other in others)


@pytest.mark.parametrize(
    "n, fractions, sizes",
    [
        (10, (0.1, 0.1), (8, 1, 1)),
        (3, (0.1, 0.1), (1, 1, 1)),  # a positive fraction gets at least one subject...
        (2, (0.1, 0.1), (1, 1, 0)),  # ...but training keeps one
        (1, (0.1, 0.1), (1, 0, 0)),
        (7, (0.0, 0.0), (7, 0, 0)),
        (100, (0.125, 0.2), (67, 13, 20)),
    ],
)
def test_split_sizes(n, fractions, sizes):
    assert ds.split_sizes(n, *fractions) == sizes


def test_split_fraction_errors():
    with pytest.raises(DaregError, match="sum to less than 1"):
        ds.split_sizes(10, 0.5, 0.5)
    with pytest.raises(DaregError, match=">= 0"):
        ds.split_sizes(10, -0.1, 0.1)


def test_load_split_errors(tmp_path):
    with pytest.raises(DaregError, match="not found"):
        ds.load_split(tmp_path / "missing")
    with pytest.raises(DaregError, match="no split.json"):
        ds.load_split(tmp_path)
    (tmp_path / ds.SPLIT_FILE).write_text(json.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(DaregError, match="lists no subjects"):
        ds.load_split(tmp_path)
    (tmp_path / ds.SPLIT_FILE).write_text(json.dumps({"train": ["gone.h5"], "val": [], "test": []}))
    with pytest.raises(DaregError, match="missing.*gone.h5"):
        ds.load_split(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Subject files
# ---------------------------------------------------------------------------------------------------------


def subject_attrs(**extra) -> dict:
    return {
        "spacing_mm": (2.0, 3.0, 4.0),
        "origin_lps": (10.0, -20.0, 30.0),
        "direction": (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
        "label_names": {0: "background", 1: "parenchyma", 2: "vessels"},
        "source_image": "a.nii.gz",
        "source_labels": "a_seg.nii.gz",
        **extra,
    }


def test_subject_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (16, 8, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (16, 8, 4)).astype(np.uint8)
    path = tmp_path / "s.h5"
    ds.write_subject(path, image, labels, attrs=subject_attrs(note={"kind": "x"}))
    subject = ds.read_subject(path)
    np.testing.assert_array_equal(subject.image, image)
    np.testing.assert_array_equal(subject.labels, labels)
    assert subject.attrs == {
        **subject_attrs(note={"kind": "x"}),
        "format_version": ds.SUBJECT_FORMAT_VERSION,
        "label_ids": (1, 2),
    }
    grid = ds.subject_grid(subject)
    assert grid.shape == (16, 8, 4) and grid.spacing == (4.0, 3.0, 2.0)  # ITK order (x, y, z)
    assert grid.origin == (10.0, -20.0, 30.0) and grid.direction == subject_attrs()["direction"]


def test_subject_file_errors(tmp_path):
    image, labels = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ds.write_subject(tmp_path / "a.h5", image + 2, labels, attrs=subject_attrs())
    with pytest.raises(ValueError, match="missing"):
        ds.write_subject(tmp_path / "a.h5", image, labels, attrs={})
    with pytest.raises(TypeError):  # h5py refuses the attribute halfway through the write
        ds.write_subject(tmp_path / "a.h5", image, labels, attrs=subject_attrs(bad=object()))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DaregError, match="damaged or not HDF5"):
        ds.read_subject(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["image"] = image
    with pytest.raises(DaregError, match="not a dareg subject file"):
        ds.read_subject(tmp_path / "other.h5")
    ds.write_subject(tmp_path / "new.h5", image, labels, attrs=subject_attrs())
    with h5py.File(tmp_path / "new.h5", "r+") as file:
        file.attrs["format_version"] = ds.SUBJECT_FORMAT_VERSION + 1
    with pytest.raises(DaregError, match="newer"):
        ds.read_subject(tmp_path / "new.h5")


# ---------------------------------------------------------------------------------------------------------
# Label mappings
# ---------------------------------------------------------------------------------------------------------


def test_label_mapping_file_with_segment_names(tmp_path):
    mapping_file = tmp_path / "map.yaml"
    mapping_file.write_text(
        "labels:\n  1: {name: parenchyma, source: [LIVER, 4]}\n  2: {name: vessels, source: [portal_vein]}\n"
    )
    mapping = ds.load_label_mapping(mapping_file)
    array = np.array([[[0, 1, 2, 3, 4, 9]]], dtype=np.uint16)
    label_map = io.LabelMap(sitk.GetImageFromArray(array), {1: "liver", 2: "portal_vein", 3: "hepatic_veins"})
    lut, names = mapping.lookup(label_map)
    assert lut[array].tolist() == [[[0, 1, 2, 0, 1, 0]]]
    assert names == {0: "background", 1: "parenchyma", 2: "vessels"}
    assert ds.load_label_mapping("totalsegmentator") is ds.TOTALSEGMENTATOR


@pytest.mark.parametrize(
    "text, message",
    [
        ("labels:\n  0: {name: a, source: [1]}\n", "1..255"),
        ("labels:\n  1: {name: a, source: [1], colour: red}\n", "exactly the keys"),
        ("labels:\n  1: {name: a, source: [5]}\n  2: {name: b, source: [5]}\n", "two labels"),
        ("labels:\n  1: {name: a, source: []}\n", "'source' a list"),
        ("mapping:\n  1: {name: a, source: [1]}\n", "one 'labels' mapping"),
        ("labels: [unclosed\n", "cannot be read"),
    ],
)
def test_label_mapping_file_errors(tmp_path, text, message):
    (tmp_path / "map.yaml").write_text(text)
    with pytest.raises(DaregError, match=message):
        ds.load_label_mapping(tmp_path / "map.yaml")


def test_identity_mapping_refuses_ids_beyond_uint8():
    label_map = io.LabelMap(sitk.GetImageFromArray(np.array([[[0, 300]]], dtype=np.uint16)))
    with pytest.raises(DaregError, match="at most 255"):
        ds.IDENTITY.lookup(label_map)


# ---------------------------------------------------------------------------------------------------------
# Phantom datasets and streaming
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> Path:
    return ds.make_phantom_dataset(
        tmp_path_factory.mktemp("phantoms"), n_subjects=10, grid_shape=(GRID,) * 3, seed=5
    )


def test_phantom_dataset_layout(phantom_dataset, tmp_path):
    split = ds.load_split(phantom_dataset)
    assert {key: len(paths) for key, paths in split.items()} == {"train": 8, "val": 1, "test": 1}
    subjects = [ds.read_subject(p) for paths in split.values() for p in paths]
    assert all(set(np.unique(s.labels)) == {0, 1, 2} for s in subjects)
    spacings = np.array([s.attrs["spacing_mm"] for s in subjects])
    assert np.ptp(spacings, axis=0).min() > 0.1  # subjects vary in geometry, not only in anatomy
    assert len({s.image.tobytes() for s in subjects}) == 10
    info = ds.load_dataset_info(phantom_dataset)
    assert info["label_names"] == TOTALSEG_NAMES and info["grid_shape"] == [GRID] * 3
    np.testing.assert_allclose(info["spacing_mm"], spacings.mean(axis=0))
    again = ds.make_phantom_dataset(tmp_path, n_subjects=2, grid_shape=(GRID,) * 3, seed=5)  # same seeds
    first_again = ds.read_subject(again / "phantom_000.h5")
    np.testing.assert_array_equal(
        first_again.image, ds.read_subject(phantom_dataset / "phantom_000.h5").image
    )


def test_phantom_dataset_streams_one_hot(phantom_dataset):
    paths = ds.load_split(phantom_dataset)["train"]
    dataset = ds.training_arrays(paths, num_labels=2)
    image_spec, label_spec = dataset.element_spec
    assert tuple(image_spec.shape) == (GRID, GRID, GRID, 1) and tuple(label_spec.shape) == (
        GRID,
        GRID,
        GRID,
        3,
    )
    items = [(image.numpy(), labels.numpy()) for image, labels in dataset]
    assert len(items) == len(paths)
    for path, (image, one_hot) in zip(paths, items, strict=True):  # seed None: the given order
        subject = ds.read_subject(path)
        assert image.dtype == one_hot.dtype == np.float32
        np.testing.assert_array_equal(image[..., 0], subject.image)
        assert set(np.unique(one_hot)) == {0.0, 1.0} and np.all(one_hot.sum(axis=-1) == 1.0)
        np.testing.assert_array_equal(one_hot.argmax(axis=-1), subject.labels)


def test_streaming_order_is_seeded_per_epoch(phantom_dataset):
    paths = ds.load_split(phantom_dataset)["train"]
    by_image = {ds.read_subject(p).image.tobytes(): p.name for p in paths}

    def names(stream, count):
        return [by_image[next(stream)[0][..., 0].tobytes()] for _ in range(count)]

    two_epochs = names(ds.iter_training_arrays(paths, num_labels=2, seed=1, repeat=True), 2 * len(paths))
    epoch_0, epoch_1 = two_epochs[: len(paths)], two_epochs[len(paths) :]
    assert sorted(epoch_0) == sorted(epoch_1) == sorted(p.name for p in paths)
    assert epoch_0 != epoch_1  # reshuffled every epoch...
    assert names(ds.iter_training_arrays(paths, num_labels=2, seed=1), len(paths)) == epoch_0  # ...seeded
    resumed = ds.iter_training_arrays(paths, num_labels=2, seed=1, first_epoch=1)
    assert names(resumed, len(paths)) == epoch_1  # a resumed run sees the epoch it resumes
    assert [paths[i].name for i in ds.epoch_order(len(paths), 1, 0)] == epoch_0
    single = ds.iter_training_arrays(paths[:2], num_labels=2)
    assert len(list(single)) == 2  # no repeat: one pass


def test_streaming_errors(phantom_dataset, tmp_path):
    paths = ds.load_split(phantom_dataset)["train"]
    with pytest.raises(DaregError, match="positive integer"):
        ds.iter_training_arrays(paths, num_labels=0)
    with pytest.raises(DaregError, match="No subject files"):
        ds.iter_training_arrays([], num_labels=2)
    other = ds.make_phantom_dataset(tmp_path, n_subjects=1, grid_shape=(16, 32, 32), seed=0)
    with pytest.raises(DaregError, match="same --grid"):
        ds.iter_training_arrays([paths[0], other / "phantom_000.h5"], num_labels=2)
