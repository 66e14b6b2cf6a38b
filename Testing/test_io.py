"""dareg.io: every format round-trips with oblique, anisotropic geometry; bad input gives DaregError.

Independent checks: geometry and values against the in-memory originals, NIfTI headers through
nibabel, DICOM spacing against the slices' own tags, displacement fields through ANTs and 3D Slicer's
MRML storage node, nearest-neighbour resampling against a numpy index computation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy import ndimage

from dareg import io
from dareg.errors import DaregError

from conftest import make_image, rotation_matrix

SPACING = (0.8, 1.3, 2.5)
ORIGIN = (-120.5, 33.25, 401.0)
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def random_image(oblique_direction, shape=(9, 11, 13), seed=0, dtype=np.float32) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = (rng.normal(size=shape) * 300).astype(dtype)
    return make_image(array, spacing=SPACING, origin=ORIGIN, direction=oblique_direction)


def random_field(reference: sitk.Image, seed=1, sigma=0.0, scale=3.0) -> sitk.Image:
    """A (z, y, x, 3) LPS-mm vector field on ``reference``'s grid, optionally smoothed."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=reference.GetSize()[::-1] + (3,))
    if sigma:
        vectors = ndimage.gaussian_filter(vectors, (sigma, sigma, sigma, 0))
        vectors /= np.abs(vectors).max()
    field = sitk.GetImageFromArray(vectors * scale, isVector=True)
    field.CopyInformation(reference)
    return field


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image, atol: float) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), rtol=0, atol=atol)


def geometry_tolerance(path: Path) -> float:
    """NIfTI headers store geometry in float32; the other formats keep it exactly (to print precision)."""
    return 1e-4 if path.name.endswith((".nii", ".nii.gz")) else 1e-9


def snapshot(image: sitk.Image) -> tuple:
    return (sitk.GetArrayFromImage(image).copy(), image.GetSize(), image.GetOrigin(), image.GetDirection())


def assert_unchanged(image: sitk.Image, before: tuple) -> None:
    array, size, origin, direction = before
    assert (image.GetSize(), image.GetOrigin(), image.GetDirection()) == (size, origin, direction)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("suffix", io.IMAGE_SUFFIXES)
def test_image_round_trip(tmp_path, oblique_direction, suffix):
    image = random_image(oblique_direction)
    before = snapshot(image)
    path = tmp_path / "nested" / f"ct{suffix}"
    io.write_image(image, path)
    read = io.read_image(path)
    assert read.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(read, image, geometry_tolerance(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), before[0])
    assert_unchanged(image, before)
    # only the file (and its data companion for .mhd/.nhdr) remains: no staging leftovers
    assert all(name.startswith("ct.") for name in (p.name for p in path.parent.iterdir()))


def test_read_image_casts_integers_to_float32(tmp_path, oblique_direction):
    image = random_image(oblique_direction, dtype=np.int16)
    io.write_image(image, tmp_path / "ct.nrrd")
    read = io.read_image(tmp_path / "ct.nrrd")
    assert read.GetPixelID() == sitk.sitkFloat32
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), expected)


@pytest.mark.shared_data
def test_read_real_dicom_series(shared_data):
    folder = shared_data / "example_ct_dicom"
    image = io.read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetPixelID() == sitk.sitkFloat32
    # independent spacing: PixelSpacing of one slice, slice distance from two slices' positions
    headers = []
    for name in sorted(p for p in folder.iterdir() if p.is_file())[:2]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        reader.ReadImageInformation()
        headers.append(reader)
    row_spacing, column_spacing = map(float, headers[0].GetMetaData("0028|0030").split("\\"))
    positions = [np.array(list(map(float, h.GetMetaData("0020|0032").split("\\")))) for h in headers]
    np.testing.assert_allclose(image.GetSpacing()[:2], (column_spacing, row_spacing), rtol=1e-6)
    np.testing.assert_allclose(image.GetSpacing()[2], np.linalg.norm(positions[1] - positions[0]), rtol=1e-4)


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, prefix: str) -> None:
    """One CT slice file per z index, with the tags GDCM needs to rebuild the 3-D geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}",
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_round_trip_and_largest_series(tmp_path, caplog):
    direction = rotation_matrix([0.4, 1.0, 0.3], 22.0)  # DICOM frames are right-handed
    rng = np.random.default_rng(3)
    image = make_image(
        rng.integers(-1000, 2000, size=(6, 10, 12)).astype(np.int16),
        spacing=SPACING,
        origin=ORIGIN,
        direction=direction,
    )
    write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.2", "a")
    write_dicom_series(image[:, :, :3], tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.3", "b")
    with caplog.at_level(logging.WARNING, logger="dareg.io"):
        read = io.read_image(tmp_path / "dicom")
    assert "2 DICOM series" in caplog.text
    assert_same_geometry(read, image, atol=1e-6)
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), expected)


def test_read_image_errors(tmp_path, oblique_direction):
    def expect(path, match):
        with pytest.raises(DaregError, match=match):
            io.read_image(path)

    expect(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    expect(tmp_path / "corrupt.nii.gz", "damaged")
    (tmp_path / "empty_folder").mkdir()
    expect(tmp_path / "empty_folder", "No DICOM series")
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    expect(tmp_path / "flat.nrrd", "2-D")
    sitk.WriteImage(sitk.Image([8, 8, 1], sitk.sitkFloat32), str(tmp_path / "one_slice.nii.gz"))
    expect(tmp_path / "one_slice.nii.gz", "2-D")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "series.nii.gz"))
    expect(tmp_path / "series.nii.gz", "4-D")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "vectors.mha"))
    expect(tmp_path / "vectors.mha", "3 components")
    for bad in (np.nan, np.inf):
        image = random_image(oblique_direction)
        array = sitk.GetArrayFromImage(image)
        array[2, 3, 4] = bad
        broken = sitk.GetImageFromArray(array)
        broken.CopyInformation(image)
        sitk.WriteImage(broken, str(tmp_path / "broken.nrrd"))
        expect(tmp_path / "broken.nrrd", "NaN or infinite")


# -------------------------------------------------------------------------------------------- label maps


def label_array(shape=(10, 12, 14)) -> np.ndarray:
    """Two boxes (ids 1 and 3) and a sphere (id 7) on background 0."""
    labels = np.zeros(shape, np.uint16)
    labels[1:4, 2:6, 3:9] = 1
    labels[5:9, 1:5, 2:6] = 3
    z, y, x = np.indices(shape)
    labels[(z - 6) ** 2 + (y - 8) ** 2 + (x - 10) ** 2 <= 6] = 7
    return labels


def test_label_map_resolve_and_mask(oblique_direction):
    labels = make_image(label_array(), spacing=SPACING, origin=ORIGIN, direction=oblique_direction)
    label_map = io.LabelMap(labels, {1: "Liver", 3: "portal vein", 9: "tumour"})
    assert label_map.label_ids() == [1, 3, 7]
    assert label_map.resolve("liver") == 1
    assert label_map.resolve("  PORTAL VEIN ") == 3
    assert label_map.resolve(7) == 7
    assert label_map.resolve("7") == 7
    assert label_map.resolve(np.int64(3)) == 3
    assert label_map.resolve("Tumour") == 9  # named but empty: resolvable, emptiness is the caller's call
    listing = r"Available labels: 1 \(Liver\), 3 \(portal vein\), 7, 9 \(tumour\)"
    with pytest.raises(DaregError, match=listing):
        label_map.resolve("spleen")
    with pytest.raises(DaregError, match="not found"):
        label_map.resolve(2)
    mask = label_map.mask([1, 7])
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(mask, labels, atol=0)
    array = label_array()
    expected = ((array == 1) | (array == 7)).astype(np.uint8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_plain_label_map_round_trip(tmp_path, oblique_direction, suffix):
    labels = make_image(label_array(), spacing=SPACING, origin=ORIGIN, direction=oblique_direction)
    before = snapshot(labels)
    path = tmp_path / f"labels{suffix}"
    io.write_label_map(io.LabelMap(labels), path)
    read = io.read_label_map(path)
    assert read.image.GetPixelID() == sitk.sitkUInt16
    assert read.names == {}
    assert_same_geometry(read.image, labels, geometry_tolerance(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), label_array())
    assert_unchanged(labels, before)


def test_float_label_file_with_integer_values_is_accepted(tmp_path, oblique_direction):
    labels = make_image(
        label_array().astype(np.float32), spacing=SPACING, origin=ORIGIN, direction=oblique_direction
    )
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    read = io.read_label_map(tmp_path / "labels.nrrd")
    assert read.image.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), label_array())


def test_read_label_map_errors(tmp_path, oblique_direction):
    def expect(path, match):
        with pytest.raises(DaregError, match=match):
            io.read_label_map(path)

    expect(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "corrupt.nrrd").write_text("NRRD0004\ntype: nonsense\n")
    expect(tmp_path / "corrupt.nrrd", "damaged")
    (tmp_path / "corrupt.seg.nrrd").write_text("not a segmentation")
    expect(tmp_path / "corrupt.seg.nrrd", r"\.seg\.nrrd")
    fractional = make_image(label_array().astype(np.float32) * 0.5, direction=oblique_direction)
    sitk.WriteImage(fractional, str(tmp_path / "probabilities.nrrd"))
    expect(tmp_path / "probabilities.nrrd", "non-integer")
    negative = make_image(label_array().astype(np.int16) - 1)
    sitk.WriteImage(negative, str(tmp_path / "negative.nrrd"))
    expect(tmp_path / "negative.nrrd", "non-negative")
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp_path / "flat.nrrd"))
    expect(tmp_path / "flat.nrrd", "2-D")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkUInt8), str(tmp_path / "stack.nii.gz"))
    expect(tmp_path / "stack.nii.gz", "4-D")


def nearest_lookup(labels: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Nearest-neighbour resampling by explicit index arithmetic: the independent check of resampling."""
    axes = [np.arange(n) for n in reference.GetSize()]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    ref_matrix = np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    points = index @ ref_matrix.T + np.asarray(reference.GetOrigin())
    lab_matrix = np.asarray(labels.GetDirection()).reshape(3, 3) @ np.diag(labels.GetSpacing())
    continuous = np.linalg.solve(lab_matrix, (points - np.asarray(labels.GetOrigin())).T).T
    nearest = np.rint(continuous).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.asarray(labels.GetSize())), axis=1)
    array = sitk.GetArrayViewFromImage(labels)
    values = np.zeros(len(index), dtype=array.dtype)
    values[inside] = array[nearest[inside, 2], nearest[inside, 1], nearest[inside, 0]]
    return values.reshape(reference.GetSize()).transpose(2, 1, 0)


def test_label_map_is_resampled_onto_reference(tmp_path, oblique_direction):
    reference = make_image(
        np.zeros((14, 16, 18), np.float32),
        spacing=(0.6, 0.9, 1.7),
        origin=ORIGIN,
        direction=oblique_direction,
    )
    coarse_origin = np.asarray(ORIGIN) + oblique_direction @ np.array([0.913, -0.377, 0.271])
    labels = make_image(
        label_array(),
        spacing=SPACING,
        origin=coarse_origin,
        direction=rotation_matrix([0.2, -1.0, 0.6], 17.0) @ oblique_direction,
    )
    io.write_label_map(io.LabelMap(labels), tmp_path / "labels.nrrd")
    file_digest = digest(tmp_path / "labels.nrrd")
    read = io.read_label_map(tmp_path / "labels.nrrd", reference=reference)
    assert_same_geometry(read.image, reference, atol=0)
    expected = nearest_lookup(labels, reference)
    assert len(np.unique(expected)) == 4  # all labels reach the reference grid: the check has teeth
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), expected)
    assert digest(tmp_path / "labels.nrrd") == file_digest


def test_label_map_on_rounded_reference_grid_keeps_voxels(tmp_path, oblique_direction):
    reference = make_image(
        np.zeros((10, 12, 14), np.float32), spacing=SPACING, origin=ORIGIN, direction=oblique_direction
    )
    labels = make_image(
        label_array(), spacing=SPACING, origin=np.asarray(ORIGIN) + 2e-6, direction=oblique_direction
    )
    io.write_label_map(io.LabelMap(labels), tmp_path / "labels.nii.gz")
    read = io.read_label_map(tmp_path / "labels.nii.gz", reference=reference)
    assert_same_geometry(read.image, reference, atol=0)  # header rounding removed, exactly the reference
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), label_array())


def test_label_map_without_overlap_is_rejected(tmp_path, oblique_direction):
    reference = random_image(oblique_direction)
    labels = make_image(
        label_array(),
        spacing=SPACING,
        origin=np.asarray(ORIGIN) + [500.0, 0.0, 0.0],
        direction=oblique_direction,
    )
    io.write_label_map(io.LabelMap(labels), tmp_path / "far.nrrd")
    with pytest.raises(DaregError, match="does not overlap its image"):
        io.read_label_map(tmp_path / "far.nrrd", reference=reference)


def test_seg_nrrd_round_trip_with_names(tmp_path, oblique_direction):
    labels = make_image(label_array(), spacing=SPACING, origin=ORIGIN, direction=oblique_direction)
    names = {1: "liver", 3: "portal vein", 7: "tumour", 12: "empty segment"}
    path = tmp_path / "out" / "segmentation.seg.nrrd"
    io.write_label_map(io.LabelMap(labels, names), path)
    # independent reader: slicerio sees one segment per id, with its name and label value
    segments = slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]
    assert {s["labelValue"]: s["name"] for s in segments} == names
    read = io.read_label_map(path)
    assert read.names == names
    assert_same_geometry(read.image, labels, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), label_array())
    assert read.resolve("Tumour") == 7


def test_seg_nrrd_with_overlapping_segments(tmp_path, oblique_direction):
    shape_ijk = (14, 12, 10)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = oblique_direction @ np.diag(SPACING)
    ijk_to_lps[:3, 3] = ORIGIN
    i, j, k = np.indices(shape_ijk)
    liver = (i < 9) & (j < 8)
    vessel = (i >= 4) & (i < 12) & (k < 5)  # overlaps the liver: Slicer puts it on a second layer
    kidney = (j >= 9) & (k >= 6)
    segmentation = slicerio.create_segmentation(shape_ijk, ijk_to_lps)
    for name, mask in (("liver", liver), ("vessel", vessel), ("kidney", kidney)):
        slicerio.add_segment(segmentation, mask, {"id": name, "name": name})
    assert segmentation["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "overlap.seg.nrrd"), segmentation)

    read = io.read_label_map(tmp_path / "overlap.seg.nrrd")
    ids = {name: read.resolve(name) for name in ("liver", "vessel", "kidney")}
    assert len(set(ids.values())) == 3  # label values repeated across layers got distinct ids
    expected = np.zeros(shape_ijk, np.uint16)
    for name, mask in (("liver", liver), ("vessel", vessel), ("kidney", kidney)):
        expected[mask] = ids[name]  # later segments win the shared voxels
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read.image), expected.transpose(2, 1, 0))
    expected_geometry = make_image(
        np.zeros(shape_ijk[::-1]), spacing=SPACING, origin=ORIGIN, direction=oblique_direction
    )
    assert_same_geometry(read.image, expected_geometry, atol=1e-9)


# ------------------------------------------------------------------------------------ displacement fields


@pytest.mark.parametrize("float64", [False, True])
def test_nifti_displacement_field_round_trip_and_header(tmp_path, oblique_direction, float64):
    field = random_field(random_image(oblique_direction))
    before = snapshot(field)
    path = tmp_path / "field.nii.gz"
    io.write_displacement_field(field, path, float64=float64)
    assert_unchanged(field, before)

    read = io.read_displacement_field(path)
    assert read.GetPixelID() == sitk.sitkVectorFloat64
    assert_same_geometry(read, field, atol=1e-5)
    stored = np.float64 if float64 else np.float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), before[0].astype(stored).astype(np.float64))

    nifti = nib.load(path)
    header = nifti.header
    size = field.GetSize()
    assert int(header["intent_code"]) == 1006
    assert nifti.shape == (*size, 1, 3)
    assert header.get_data_dtype() == stored
    ras_affine = np.eye(4)
    ras_affine[:3, :3] = np.diag(LPS_TO_RAS) @ oblique_direction @ np.diag(SPACING)
    ras_affine[:3, 3] = LPS_TO_RAS * ORIGIN
    np.testing.assert_allclose(nifti.get_qform(), ras_affine, atol=1e-4)
    np.testing.assert_allclose(nifti.get_sform(), ras_affine, atol=1e-4)
    on_disk = np.asarray(nifti.dataobj)[:, :, :, 0, :]  # (x, y, z, 3)
    np.testing.assert_allclose(on_disk, before[0].transpose(2, 1, 0, 3) * LPS_TO_RAS, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".tfm"])
def test_itk_transform_file_displacement_round_trip(tmp_path, oblique_direction, suffix):
    field = random_field(random_image(oblique_direction, shape=(4, 5, 6)))
    before = snapshot(field)
    io.write_displacement_field(field, tmp_path / f"field{suffix}")
    assert_unchanged(field, before)
    read = io.read_displacement_field(tmp_path / f"field{suffix}")
    assert_same_geometry(read, field, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), before[0])


def test_read_transform_maps_voxel_centres_by_their_vectors(tmp_path, oblique_direction):
    field = random_field(random_image(oblique_direction))
    io.write_displacement_field(field, tmp_path / "field.nii.gz", float64=True)
    transform = io.read_transform(tmp_path / "field.nii.gz")
    assert isinstance(transform, sitk.DisplacementFieldTransform)
    vectors = sitk.GetArrayFromImage(field)
    for index in [(1, 2, 3), (7, 4, 2), (12, 10, 8)]:
        point = np.asarray(field.TransformIndexToPhysicalPoint(index))
        expected = point + vectors[index[2], index[1], index[0]]
        np.testing.assert_allclose(transform.TransformPoint(point.tolist()), expected, atol=1e-4)


def test_read_transform_affine_and_displacement_errors(tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rotation_matrix([1.0, 0.0, 1.0], 10.0).ravel().tolist())
    affine.SetTranslation((1.0, -2.0, 3.0))
    sitk.WriteTransform(affine, str(tmp_path / "affine.tfm"))
    read = io.read_transform(tmp_path / "affine.tfm")
    assert isinstance(read, sitk.AffineTransform)
    np.testing.assert_allclose(read.TransformPoint((4.0, 5.0, 6.0)), affine.TransformPoint((4.0, 5.0, 6.0)))
    with pytest.raises(DaregError, match="not a displacement field"):
        io.read_displacement_field(tmp_path / "affine.tfm")
    with pytest.raises(DaregError, match="not found"):
        io.read_transform(tmp_path / "missing.h5")
    (tmp_path / "corrupt.h5").write_bytes(b"garbage")
    with pytest.raises(DaregError, match="damaged"):
        io.read_transform(tmp_path / "corrupt.h5")
    sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkFloat32), str(tmp_path / "scalar.nii.gz"))
    with pytest.raises(DaregError, match="not a 3-D displacement field"):
        io.read_displacement_field(tmp_path / "scalar.nii.gz")


def test_ants_applies_written_field_as_sitk_does(tmp_path, oblique_direction):
    ants = pytest.importorskip("ants")
    fixed = make_image(
        np.zeros((18, 20, 22), np.float32),
        spacing=(1.1, 0.9, 2.2),
        origin=ORIGIN,
        direction=oblique_direction,
    )
    rng = np.random.default_rng(5)
    moving_array = ndimage.gaussian_filter(rng.normal(size=(24, 26, 28)), 2.0).astype(np.float32) * 1000
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((10.5, 9.5, 8.5)))
    moving_direction = rotation_matrix([0.3, -1.0, 0.2], 12.0)
    moving_spacing = np.array([1.2, 1.0, 1.8])
    moving_origin = centre - moving_direction @ (moving_spacing * (np.array([28, 26, 24]) - 1) / 2)
    moving = make_image(
        moving_array, spacing=moving_spacing, origin=moving_origin, direction=moving_direction
    )
    field = random_field(fixed, seed=6, sigma=3.0, scale=4.0)

    io.write_image(fixed, tmp_path / "fixed.nii.gz")
    io.write_image(moving, tmp_path / "moving.nii.gz")
    io.write_displacement_field(field, tmp_path / "field.nii.gz")
    warped_ants = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(tmp_path / "field.nii.gz")],
        interpolator="linear",
    ).numpy()  # (x, y, z)

    # the in-memory field, rounded to float32 as stored: ANTs must reproduce it from the file alone
    rounded = sitk.Cast(sitk.Cast(field, sitk.sitkVectorFloat32), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(rounded)
    warped_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    unwarped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    value_range = np.ptp(moving_array)
    # ITK and ANTs may treat points in the last half voxel of the moving image differently
    interior = (slice(2, -2),) * 3
    difference = np.abs(warped_ants.transpose(2, 1, 0) - warped_sitk)[interior].max()
    assert difference < 1e-4 * value_range, difference
    assert np.abs(unwarped - warped_sitk)[interior].max() > 0.05 * value_range  # the field matters


def test_slicer_storage_node_maps_points_as_sitk(tmp_path, oblique_direction):
    slicer = pytest.importorskip("slicer")
    field = random_field(random_image(oblique_direction), seed=7, sigma=1.5, scale=5.0)
    io.write_displacement_field(field, tmp_path / "field.nii.gz", float64=True)
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "field.nii.gz"))
    assert storage.ReadData(node)
    from_parent = node.GetTransformFromParent()
    # Slicer interpolates grids cubically by default; voxel centres are exact either way, and linear
    # mode makes in-between points comparable with ITK's linear interpolation.
    from_parent.SetInterpolationModeToLinear()
    expected_transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    for index in [(2, 3, 4), (6, 5, 3), (10.3, 4.6, 2.2), (3.7, 8.1, 6.9)]:
        point = np.asarray(field.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        expected = np.asarray(expected_transform.TransformPoint(point.tolist()))
        slicer_ras = from_parent.TransformPoint((point * LPS_TO_RAS).tolist())
        np.testing.assert_allclose(np.asarray(slicer_ras) * LPS_TO_RAS, expected, atol=1e-4)
        assert np.linalg.norm(expected - point) > 0.1  # a real displacement, not identity


def test_write_displacement_field_rejects_bad_input(tmp_path, oblique_direction):
    with pytest.raises(ValueError, match="3 components"):
        io.write_displacement_field(random_image(oblique_direction), tmp_path / "field.nii.gz")
    with pytest.raises(DaregError, match="unsupported file type"):
        io.write_displacement_field(random_field(random_image(oblique_direction)), tmp_path / "field.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- landmarks


def test_landmarks_csv_round_trip_and_columns(tmp_path):
    rng = np.random.default_rng(8)
    points = rng.normal(size=(5, 3)) * 100
    before = points.copy()
    io.write_landmarks(points, tmp_path / "points.csv")
    np.testing.assert_array_equal(io.read_landmarks(tmp_path / "points.csv"), before)
    np.testing.assert_array_equal(points, before)
    (tmp_path / "other.csv").write_text("Label, Z ,X,y,name\n1,3.5,1.5,-2,a\n\n2,6,4,5.25,b\n")
    expected = [[1.5, -2.0, 3.5], [4.0, 5.25, 6.0]]
    np.testing.assert_array_equal(io.read_landmarks(tmp_path / "other.csv"), expected)


def markups_document(points: np.ndarray, system: str | None) -> dict:
    markup = {
        "type": "Fiducial",
        "controlPoints": [{"label": f"F-{i}", "position": list(p)} for i, p in enumerate(points.tolist())],
    }
    if system is not None:
        markup["coordinateSystem"] = system
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
        "Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [markup],
    }


@pytest.mark.parametrize("system", ["LPS", "RAS", None])
def test_landmarks_markups_json(tmp_path, system):
    lps = np.array([[10.0, -20.5, 30.25], [-1.0, 2.0, -3.0]])
    on_disk = lps * LPS_TO_RAS if system == "RAS" else lps  # the schema's default is LPS
    (tmp_path / "points.mrk.json").write_text(json.dumps(markups_document(on_disk, system)))
    np.testing.assert_array_equal(io.read_landmarks(tmp_path / "points.mrk.json"), lps)


def test_landmark_errors(tmp_path):
    def expect(name, content, match):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(DaregError, match=match):
            io.read_landmarks(path)

    expect("missing.csv", None, "not found")
    expect("no_header.csv", "1,2,3\n", "header row")
    expect("empty.csv", "", "header row")
    expect("only_header.csv", "x,y,z\n", "no points")
    expect("text.csv", "x,y,z\n1,two,3\n", "line 2")
    expect("short.csv", "x,y,z\n1,2\n", "line 2")
    expect("points.txt", "x,y,z\n1,2,3\n", "Unsupported landmark file")
    expect("broken.mrk.json", "{not json", "not a valid 3D Slicer")
    expect("nomarkups.mrk.json", "{}", "not a valid 3D Slicer")
    undefined = markups_document(np.zeros((1, 3)), "LPS")
    undefined["markups"][0]["controlPoints"][0]["positionStatus"] = "undefined"
    expect("undefined.mrk.json", json.dumps(undefined), "no defined position")
    expect("none.mrk.json", json.dumps(markups_document(np.zeros((0, 3)), "LPS")), "no points")


# ------------------------------------------------------------------------------------- JSON and atomicity


def test_write_json_converts_numpy_and_nan(tmp_path):
    data = {
        "dice": np.float32(0.5),
        "n": np.int64(3),
        "tre": np.array([1.0, np.nan]),
        "hd": float("inf"),
        np.int64(2): [np.bool_(True), tmp_path / "x"],
    }
    io.write_json(data, tmp_path / "report" / "metrics.json")
    text = (tmp_path / "report" / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == {"dice": 0.5, "n": 3, "tre": [1.0, None], "hd": None, "2": [True, str(tmp_path / "x")]}


def test_atomic_path_leaves_nothing_on_failure_and_keeps_old_file(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError, match="interrupted"):
        with io.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as temporary:
            temporary.write_text("new but broken")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_failing_writer_leaves_nothing(tmp_path, monkeypatch, oblique_direction):
    def disk_full(filename, segmentation):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", disk_full)
    labels = make_image(label_array(), spacing=SPACING, origin=ORIGIN, direction=oblique_direction)
    with pytest.raises(DaregError, match="No space left"):
        io.write_label_map(io.LabelMap(labels, {1: "liver"}), tmp_path / "seg.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destinations(tmp_path, oblique_direction):
    image = random_image(oblique_direction)
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(DaregError, match="cannot be created or written"):
        io.write_image(image, tmp_path / "a_file" / "ct.nii.gz")
    with pytest.raises(DaregError, match="unsupported file type"):
        io.write_image(image, tmp_path / "ct.png")
    with pytest.raises(DaregError, match="unsupported file type"):
        io.write_landmarks(np.zeros((2, 3)), tmp_path / "points.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path, oblique_direction):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DaregError, match="cannot be created or written"):
            io.write_json({"a": 1}, folder / "x.json")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)
