"""dareg.phantom: the procedural abdominal CT phantom and synthetic pairs with a known transform.

Anatomy is checked against anatomical plausibility (volumes in mL, patient sides in LPS, CT intensity
order) computed here from the arrays with independent tools (scipy, SimpleITK); the synthetic
transform is checked through SimpleITK's displacement-field filter and a numpy/scipy resampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dareg.errors import DaregError
from dareg.geometry import index_to_physical_matrix, physical_corners
from dareg.phantom import LABELS, Phantom, make_phantom, make_synthetic_pair

from conftest import make_image

SMALL = {"size": (48, 40, 32), "spacing": (5.0, 5.0, 6.0)}  # the default field of view, coarse and fast
TSEG_LIVER = 5  # TotalSegmentator v2 liver id


def arrays(phantom: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.labels)


def voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def physical_points(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """LPS mm (N, 3) of the voxels where the (z, y, x) ``mask`` is set."""
    matrix, origin = index_to_physical_matrix(image)
    return np.argwhere(mask)[:, ::-1].astype(float) @ matrix.T + origin


def displacement_field(transform: sitk.Transform, grid: sitk.Image) -> np.ndarray:
    """``T(y) - y`` (z, y, x, 3) at every voxel centre of ``grid`` (SimpleITK's own filter)."""
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        grid.GetSize(),
        grid.GetOrigin(),
        grid.GetSpacing(),
        grid.GetDirection(),
    )
    return sitk.GetArrayFromImage(field)


def continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """(i, j, k) continuous indices (N, 3) of LPS points (N, 3) in ``image``."""
    matrix, origin = index_to_physical_matrix(image)
    return np.linalg.solve(matrix, (points - origin).T).T


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def small_phantom() -> Phantom:
    return make_phantom(seed=1, **SMALL)


# ----------------------------------------------------------------------------------------------------
# Phantom
# ----------------------------------------------------------------------------------------------------


def test_phantom_types_and_centred_field_of_view(phantom):
    assert phantom.image.GetPixelID() == sitk.sitkFloat32
    assert phantom.labels.GetPixelID() == sitk.sitkUInt8
    assert phantom.names == LABELS and LABELS[1] == "liver"
    assert phantom.image.GetSize() == (96, 80, 64) and phantom.image.GetSpacing() == (2.5, 2.5, 3.0)
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(phantom.image, key)() == getattr(phantom.labels, key)()
    corners = physical_corners(phantom.image)
    np.testing.assert_allclose(corners.mean(axis=0), 0.0, atol=1e-9)  # patient centre = FOV centre
    extent = np.ptp(corners, axis=0) + np.asarray(phantom.image.GetSpacing())
    np.testing.assert_allclose(extent, [240.0, 200.0, 192.0])


def test_same_seed_same_phantom_other_seed_differs():
    first, again, other = (make_phantom(seed=s, **SMALL) for s in (7, 7, 8))
    np.testing.assert_array_equal(arrays(first)[0], arrays(again)[0])
    np.testing.assert_array_equal(arrays(first)[1], arrays(again)[1])
    assert (arrays(first)[1] != arrays(other)[1]).mean() > 0.01
    assert not np.allclose(arrays(first)[0], arrays(other)[0])


def test_every_label_present_with_plausible_volume(phantom):
    _, labels = arrays(phantom)
    # Adult volumes (liver ~1.5 L, kidney ~150 mL...) scaled to a trunk ~0.65x a real one in each axis
    # (volume x ~0.3), with generous margins for the seeded shape variation.
    expected_ml = {
        "liver": (300, 900),
        "portal_vein": (5, 60),
        "hepatic_veins": (2, 40),
        "tumour": (2, 40),
        "spine": (60, 400),
        "kidney_right": (20, 150),
        "kidney_left": (20, 150),
        "aorta": (20, 120),
        "ivc": (20, 120),
        "body_wall": (800, 5000),
    }
    for label, name in LABELS.items():
        volume = (labels == label).sum() * voxel_ml(phantom.labels)
        low, high = expected_ml[name]
        assert low <= volume <= high, f"{name}: {volume:.1f} mL outside [{low}, {high}]"
    # The whole liver lies inside the field of view (the registration ROI is built around it).
    liver = labels == 1
    for axis in range(3):
        assert not liver.take(0, axis=axis).any() and not liver.take(-1, axis=axis).any()


def test_anatomy_sides_in_lps(phantom):
    _, labels = arrays(phantom)
    centroid = {
        name: physical_points(phantom.labels, labels == label).mean(axis=0) for label, name in LABELS.items()
    }
    liver_x = physical_points(phantom.labels, labels == 1)[:, 0]
    assert (liver_x < 0).mean() > 0.75 and centroid["liver"][0] < -20  # patient right = -x in LPS
    assert centroid["kidney_right"][0] < -30 and centroid["kidney_left"][0] > 30
    assert centroid["aorta"][0] > centroid["ivc"][0]  # aorta on the left of the IVC
    assert abs(centroid["spine"][0]) < 3 and centroid["spine"][1] > 15  # posterior midline (+y)
    assert centroid["aorta"][1] < centroid["spine"][1]  # aorta anterior to the spine
    assert centroid["liver"][2] > centroid["kidney_right"][2]  # liver in the upper abdomen


def test_ct_intensity_order(phantom):
    image, labels = arrays(phantom)
    mean = {name: float(image[labels == label].mean()) for label, name in LABELS.items()}
    # Subcutaneous fat: the 2nd and 3rd voxel layers under the skin, found from the image alone.
    body = ndimage.binary_fill_holes(image > -500)
    fat = ndimage.binary_erosion(body, iterations=1) & ~ndimage.binary_erosion(body, iterations=3)
    fat_mean = float(image[fat].mean())
    for vessel in ("portal_vein", "hepatic_veins", "aorta", "ivc"):
        assert mean[vessel] > mean["liver"] + 50, (vessel, mean)
    assert mean["liver"] > mean["tumour"] + 20  # hypodense lesion
    assert mean["liver"] > fat_mean + 100 and fat_mean < -50
    assert 40 < mean["liver"] < 80  # contrast-enhanced parenchyma
    others = [m for name, m in mean.items() if name != "spine"]
    assert mean["spine"] > max(others) + 50  # bone brightest
    assert np.percentile(image[labels == 5], 99) > 500
    air = image[~ndimage.binary_dilation(body, iterations=2)]
    assert abs(air.mean() + 1000) < 5 and 5 < air.std() < 15  # air with ~10 HU noise


def test_vessel_trees_and_tumour_inside_liver(phantom):
    _, labels = arrays(phantom)
    portal = labels == 2
    components, count = ndimage.label(portal, structure=np.ones((3, 3, 3)))
    assert np.bincount(components.ravel())[1:].max() > 0.8 * portal.sum()  # one connected tree
    extent_mm = np.ptp(physical_points(phantom.labels, portal), axis=0)
    assert (extent_mm > 50).sum() >= 2  # branches spread through the liver, not one tube
    near_liver = ndimage.binary_dilation(labels == 1, iterations=2)
    assert near_liver[labels == 3].mean() > 0.9  # hepatic veins run inside the parenchyma
    ring = ndimage.binary_dilation(labels == 4) & (labels != 4)
    assert np.isin(labels[ring], (1, 2, 3)).mean() > 0.95  # tumour surrounded by liver


def test_same_anatomy_at_other_spacing_and_oblique_direction(oblique_direction):
    # Fields of view larger than the default so the liver is whole in the rotated grid too.
    grids = [
        {"size": (96, 84, 64), "spacing": (3.0, 3.0, 4.0)},
        {"size": (64, 56, 50), "spacing": (4.5, 4.5, 5.0)},
        {"size": (80, 72, 64), "spacing": (4.0, 3.6, 4.2), "direction": tuple(oblique_direction.ravel())},
    ]
    measures = []
    for grid in grids:
        phantom = make_phantom(seed=4, **grid)
        labels = arrays(phantom)[1]
        assert not (labels[[0, -1]] == 1).any() and not (labels[:, [0, -1]] == 1).any()
        assert not (labels[:, :, [0, -1]] == 1).any()
        liver, tumour = labels == 1, labels == 4
        measures.append(
            (
                liver.sum() * voxel_ml(phantom.labels),
                physical_points(phantom.labels, liver).mean(axis=0),
                physical_points(phantom.labels, tumour).mean(axis=0),
            )
        )
    reference = measures[0]
    for volume, liver_centroid, tumour_centroid in measures[1:]:
        assert abs(volume - reference[0]) < 0.04 * reference[0]
        assert np.linalg.norm(liver_centroid - reference[1]) < 2.0
        assert np.linalg.norm(tumour_centroid - reference[2]) < 2.0


def test_origin_moves_the_field_of_view_not_the_patient():
    centred = make_phantom(seed=2, **SMALL)
    shifted = make_phantom(seed=2, origin=(-117.5 + 20.0, -97.5, -93.0), **SMALL)  # 20 mm = 4 voxels along x
    np.testing.assert_array_equal(arrays(shifted)[1][:, :, :-4], arrays(centred)[1][:, :, 4:])


@pytest.mark.parametrize(
    "options",
    [{"size": (96, 80)}, {"spacing": (2.5, 0.0, 3.0)}, {"direction": (1, 0, 0, 0, 2, 0, 0, 0, 1)}],
)
def test_bad_phantom_geometry_is_a_user_error(options):
    with pytest.raises(DaregError):
        make_phantom(**options)


# ----------------------------------------------------------------------------------------------------
# Synthetic pairs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(small_phantom):
    return make_synthetic_pair(small_phantom.image, small_phantom.labels, seed=3, noise_hu=0.0)


def test_landmarks_are_mapped_exactly_by_s(pair):
    grid = pair.moving_labels
    index = continuous_index(grid, pair.moving_landmarks)
    np.testing.assert_allclose(index, np.round(index), atol=1e-9)  # voxel centres
    field = displacement_field(pair.moving_to_fixed, grid)
    i, j, k = np.round(index).astype(int).T
    np.testing.assert_allclose(pair.fixed_landmarks, pair.moving_landmarks + field[k, j, i], atol=1e-6)
    assert pair.moving_landmarks.shape == pair.fixed_landmarks.shape == (20, 3)
    assert np.all(sitk.GetArrayViewFromImage(grid)[k, j, i] == 1)  # inside the requested label
    spread = np.ptp(pair.moving_landmarks, axis=0)
    assert (spread > 40).all()  # spread over the liver, not clustered


def test_moving_is_fixed_resampled_through_s(small_phantom, pair):
    """Independent resampling: SimpleITK displacement field + numpy nearest / scipy linear lookup."""
    grid = pair.moving_labels
    field = displacement_field(pair.moving_to_fixed, grid)
    y = physical_points(grid, np.ones(sitk.GetArrayViewFromImage(grid).shape, bool))
    fixed_index = continuous_index(small_phantom.labels, y + field.reshape(-1, 3))
    fixed_labels = sitk.GetArrayFromImage(small_phantom.labels)
    rounded = np.round(fixed_index).astype(int)
    inside = np.all((rounded >= 0) & (rounded < np.asarray(small_phantom.labels.GetSize())), axis=1)
    expected = np.zeros(len(y), np.uint8)
    expected[inside] = fixed_labels[rounded[inside, 2], rounded[inside, 1], rounded[inside, 0]]
    moving_labels = sitk.GetArrayFromImage(pair.moving_labels).ravel()
    assert (moving_labels == expected).mean() > 0.999
    assert pair.moving_labels.GetPixelID() == small_phantom.labels.GetPixelID()
    # Intensities: moving(y) = fixed(S(y)), linear interpolation, at points well inside the fixed grid.
    fixed_image = sitk.GetArrayFromImage(small_phantom.image)
    deep = np.all((fixed_index > 1) & (fixed_index < np.asarray(small_phantom.image.GetSize()) - 2), axis=1)
    expected_hu = ndimage.map_coordinates(fixed_image, fixed_index[deep][:, ::-1].T, order=1)
    moving_hu = sitk.GetArrayFromImage(pair.moving_image).ravel()[deep]
    np.testing.assert_allclose(moving_hu, expected_hu, atol=0.05)
    assert pair.moving_image.GetPixelID() == sitk.sitkFloat32
    assert dice(fixed_labels == 1, sitk.GetArrayFromImage(pair.moving_labels) == 1) < 0.97  # it moved


def test_s_is_bspline_after_bounded_rigid(small_phantom, pair):
    composite = sitk.CompositeTransform(pair.moving_to_fixed)
    assert composite.GetNumberOfTransforms() == 2
    rigid = sitk.Euler3DTransform(composite.GetNthTransform(1))
    angles, translation = np.asarray(rigid.GetParameters()[:3]), np.asarray(rigid.GetParameters()[3:])
    assert np.all(np.abs(np.rad2deg(angles)) <= 5.0) and np.all(np.abs(translation) <= 10.0)
    np.testing.assert_allclose(
        rigid.GetCenter(), physical_corners(small_phantom.image).mean(axis=0), atol=1e-9
    )
    # |S(y) - rigid(y)| on a 2 mm lattice (finer than, and offset from, any lattice the code used).
    lattice = make_image(
        np.zeros((90, 95, 110), np.float32), spacing=(2.0, 2.0, 2.0), origin=(-109, -94, -89)
    )
    residual = displacement_field(pair.moving_to_fixed, lattice) - displacement_field(rigid, lattice)
    peak = np.linalg.norm(residual, axis=-1).max()
    assert 0.5 * 8.0 < peak <= 8.0 * 1.01


def test_identity_settings_reproduce_the_fixed_image(small_phantom):
    same = make_synthetic_pair(
        small_phantom.image,
        small_phantom.labels,
        seed=5,
        max_deformation_mm=0.0,
        max_rotation_deg=0.0,
        max_translation_mm=0.0,
        noise_hu=0.0,
    )
    np.testing.assert_allclose(arrays(small_phantom)[0], sitk.GetArrayFromImage(same.moving_image), atol=1e-3)
    np.testing.assert_array_equal(arrays(small_phantom)[1], sitk.GetArrayFromImage(same.moving_labels))
    np.testing.assert_allclose(same.fixed_landmarks, same.moving_landmarks, atol=1e-9)


def test_pair_is_seeded_and_noise_is_an_independent_stream(small_phantom, pair):
    again = make_synthetic_pair(small_phantom.image, small_phantom.labels, seed=3, noise_hu=0.0)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(again.moving_image), sitk.GetArrayFromImage(pair.moving_image)
    )
    np.testing.assert_array_equal(again.moving_landmarks, pair.moving_landmarks)
    noisy = make_synthetic_pair(small_phantom.image, small_phantom.labels, seed=3, noise_hu=10.0)
    np.testing.assert_array_equal(noisy.fixed_landmarks, pair.fixed_landmarks)  # same transform
    noise = sitk.GetArrayFromImage(noisy.moving_image) - sitk.GetArrayFromImage(pair.moving_image)
    assert abs(noise.std() - 10.0) < 0.5 and abs(noise.mean()) < 0.5
    other = make_synthetic_pair(small_phantom.image, small_phantom.labels, seed=4, noise_hu=0.0)
    assert np.abs(other.fixed_landmarks - other.moving_landmarks).max() > 1.0
    assert not np.allclose(other.moving_landmarks, pair.moving_landmarks)


def test_reference_defines_the_moving_grid_and_background(small_phantom):
    # z from -50 to +145 mm: its top lies above the fixed field of view (+96 mm).
    reference = make_image(np.zeros((40, 30, 40), np.int16), spacing=(4.0, 4.0, 5.0), origin=(-80, -60, -50))
    moved = make_synthetic_pair(
        small_phantom.image,
        small_phantom.labels,
        seed=6,
        reference=reference,
        landmark_labels=(2, 3),
        n_landmarks=5,
        noise_hu=0.0,
    )
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(moved.moving_image, key)() == getattr(reference, key)()
        assert getattr(moved.moving_labels, key)() == getattr(reference, key)()
    index = np.round(continuous_index(reference, moved.moving_landmarks)).astype(int)
    assert np.isin(
        sitk.GetArrayViewFromImage(moved.moving_labels)[index[:, 2], index[:, 1], index[:, 0]], (2, 3)
    ).all()
    # Outside the fixed image the moving image takes the fixed minimum (the top of the reference grid).
    assert sitk.GetArrayViewFromImage(moved.moving_image).min() == pytest.approx(
        arrays(small_phantom)[0].min()
    )


def test_user_errors(small_phantom):
    with pytest.raises(DaregError, match="landmark"):
        make_synthetic_pair(small_phantom.image, small_phantom.labels, landmark_labels=(42,))
    flat = sitk.GetImageFromArray(np.zeros((10, 10), np.float32))
    with pytest.raises(DaregError, match="3D"):
        make_synthetic_pair(flat, small_phantom.labels)


@pytest.mark.shared_data
def test_real_ct_pair(shared_data):
    image = sitk.ReadImage(str(shared_data / "example_ct.nii.gz"))
    labels = sitk.ReadImage(str(shared_data / "example_ct_seg.nii.gz"))
    pair = make_synthetic_pair(image, labels, seed=0, landmark_labels=(TSEG_LIVER,))
    fixed_liver = sitk.GetArrayFromImage(labels) == TSEG_LIVER
    moving_labels = sitk.GetArrayFromImage(pair.moving_labels)
    assert 0.5 < dice(fixed_liver, moving_labels == TSEG_LIVER) < 0.95
    index = np.round(continuous_index(pair.moving_labels, pair.moving_landmarks)).astype(int)
    assert np.all(moving_labels[index[:, 2], index[:, 1], index[:, 0]] == TSEG_LIVER)
    assert pair.moving_image.GetSize() == image.GetSize()
