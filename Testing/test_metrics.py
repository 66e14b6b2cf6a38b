"""Tests of dareg.metrics against independent computations.

Every geometric case uses oblique direction cosines and anisotropic spacing, so that the defects of
the original DDMR evaluation (zoom factor used as voxel size, sign of the moving centroids, i/j axis
swap, affine part ignored) would change the numbers and fail these tests.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.spatial.transform import Rotation

from dareg import metrics
from dareg.errors import DaregError

SPACING = (0.8, 1.25, 2.0)  # mm along index axes i, j, k: all different, so any axis mix-up shows
# Oblique and left-handed (one axis flipped, as in many DICOM series): determinant -1.
OBLIQUE = Rotation.from_euler("zyx", [25.0, -15.0, 35.0], degrees=True).as_matrix() @ np.diag([1, -1, 1])
OTHER_OBLIQUE = Rotation.from_euler("xyz", [-20.0, 10.0, 40.0], degrees=True).as_matrix()


# --------------------------------------------------------------------------------------------------
# Helpers: grids and shapes built from first principles (x = origin + D diag(s) index)
# --------------------------------------------------------------------------------------------------


def _grid(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float] = SPACING,
    direction: np.ndarray = OBLIQUE,
    origin: tuple[float, float, float] = (12.0, -30.0, 45.0),
    pixel: int = sitk.sitkUInt8,
) -> sitk.Image:
    image = sitk.Image(size, pixel)
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    image.SetOrigin(origin)
    return image


def _grid_centred_at(point, size, spacing=SPACING, direction=OBLIQUE) -> sitk.Image:
    """Grid (odd size) whose central voxel centre is exactly ``point`` (LPS mm)."""
    matrix = np.asarray(direction) @ np.diag(spacing)
    origin = np.asarray(point, dtype=float) - matrix @ ((np.asarray(size) - 1) / 2.0)
    return _grid(size, spacing, direction, tuple(origin))


def _physical_points(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (z, y, x, 3)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return index @ matrix.T + np.asarray(image.GetOrigin())


def _like(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def _ball(reference: sitk.Image, centre, radius: float, label: int = 1) -> np.ndarray:
    distance = np.linalg.norm(_physical_points(reference) - np.asarray(centre, dtype=float), axis=-1)
    # The tolerance puts lattice points at exactly ``radius`` on both sides inside, whatever the
    # rounding: a symmetric ball keeps its centroid exactly at its centre.
    return np.where(distance <= radius + 1e-9, label, 0).astype(np.uint8)


def _smooth_random(shape, seed: int, offset: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 50.0 + offset


def _rotation_zxy(angles: tuple[float, float, float]) -> np.ndarray:
    """ITK Euler3DTransform's default rotation: about y first, then x, then z (R = Rz Rx Ry)."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx @ ry


def test_physical_points_helper_agrees_with_sitk():
    image = _grid((7, 6, 5))
    points = _physical_points(image)
    np.testing.assert_allclose(points[4, 5, 6], image.TransformIndexToPhysicalPoint((6, 5, 4)), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# NCC
# --------------------------------------------------------------------------------------------------


def test_ncc_matches_numpy_corrcoef_with_and_without_mask():
    reference = _grid((24, 20, 16), pixel=sitk.sitkFloat64)
    a = _smooth_random((16, 20, 24), seed=1)
    b = a + np.random.default_rng(2).normal(scale=10.0, size=a.shape)
    inside = _ball(reference, _physical_points(reference)[8, 10, 12], 8.0).astype(bool)
    fixed, moving = _like(a, reference), _like(b, reference)
    assert metrics.ncc(fixed, moving) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    masked = metrics.ncc(fixed, moving, mask=_like(inside.astype(np.uint8), reference))
    assert masked == pytest.approx(np.corrcoef(a[inside], b[inside])[0, 1], abs=1e-12)


def test_ncc_is_one_for_identical_and_affinely_rescaled_images_with_nonzero_mean():
    reference = _grid((16, 16, 16), pixel=sitk.sitkFloat64)
    a = _smooth_random((16, 16, 16), seed=3, offset=500.0)  # the original's uncentred norms gave < 1 here
    fixed = _like(a, reference)
    assert metrics.ncc(fixed, fixed) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ncc(fixed, _like(2.0 * a + 5.0, reference)) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ncc(fixed, _like(-a, reference)) == pytest.approx(-1.0, abs=1e-12)


def test_ncc_of_constant_image_is_nan_and_empty_mask_is_a_user_error():
    reference = _grid((8, 8, 8), pixel=sitk.sitkFloat64)
    constant = _like(np.full((8, 8, 8), 7.0), reference)
    assert math.isnan(metrics.ncc(constant, _like(_smooth_random((8, 8, 8), seed=4), reference)))
    with pytest.raises(DaregError, match="mask is empty"):
        metrics.ncc(constant, constant, mask=_like(np.zeros((8, 8, 8), np.uint8), reference))


# --------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------


def _ssim_reference(a: np.ndarray, b: np.ndarray, inside: np.ndarray, sigma: float) -> float:
    """Masked Gaussian SSIM written independently: explicit 3-D kernel, FFT convolution."""
    radius = int(3.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=float)
    profile = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.einsum("i,j,k->ijk", profile, profile, profile)
    w = inside.astype(float)

    def local_mean(values):
        return fftconvolve(values * w, kernel, mode="same") / fftconvolve(w, kernel, mode="same")

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a**2
    var_b = local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    data_range = a[inside].max() - a[inside].min()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    terms = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(terms[inside].mean())


@pytest.fixture(scope="module")
def ssim_case():
    reference = _grid((22, 20, 18), pixel=sitk.sitkFloat64)
    a = _smooth_random((18, 20, 22), seed=5)
    b = a + np.random.default_rng(6).normal(scale=15.0, size=a.shape)
    inside = _ball(reference, _physical_points(reference)[9, 10, 11], 9.0).astype(bool)
    return reference, a, b, inside


def test_ssim_matches_independent_fft_implementation(ssim_case):
    reference, a, b, inside = ssim_case
    mask = _like(inside.astype(np.uint8), reference)
    value = metrics.ssim(_like(a, reference), _like(b, reference), mask=mask, sigma_voxels=1.5)
    assert value == pytest.approx(_ssim_reference(a, b, inside, 1.5), abs=1e-8)
    full = metrics.ssim(_like(a, reference), _like(b, reference), sigma_voxels=1.0)
    assert full == pytest.approx(_ssim_reference(a, b, np.ones_like(inside), 1.0), abs=1e-8)


def test_ssim_is_one_for_identical_images_and_decreases_with_noise(ssim_case):
    reference, a, _, _ = ssim_case
    fixed = _like(a, reference)
    assert metrics.ssim(fixed, fixed) == pytest.approx(1.0, abs=1e-12)
    noise = np.random.default_rng(7).normal(size=a.shape)
    values = [metrics.ssim(fixed, _like(a + level * noise, reference)) for level in (2.0, 10.0, 40.0)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_is_symmetric_when_both_images_have_the_same_range(ssim_case):
    reference, a, _, _ = ssim_case
    flipped = np.flip(a, axis=1).copy()  # same intensity range, different structure
    forward = metrics.ssim(_like(a, reference), _like(flipped, reference))
    backward = metrics.ssim(_like(flipped, reference), _like(a, reference))
    assert forward == pytest.approx(backward, abs=1e-12)
    assert forward < 0.9


def test_ssim_ignores_everything_outside_the_mask(ssim_case):
    reference, a, b, inside = ssim_case
    mask = _like(inside.astype(np.uint8), reference)
    altered_a = np.where(inside, a, 1000.0)
    altered_b = np.where(inside, b, -300.0)
    original = metrics.ssim(_like(a, reference), _like(b, reference), mask=mask)
    altered = metrics.ssim(_like(altered_a, reference), _like(altered_b, reference), mask=mask)
    assert altered == pytest.approx(original, abs=1e-12)
    # Without the mask the same alteration does matter, so the check above is not vacuous.
    assert metrics.ssim(_like(altered_a, reference), _like(altered_b, reference)) != pytest.approx(
        metrics.ssim(_like(a, reference), _like(b, reference)), abs=1e-3
    )


def test_intensity_metrics_mse_matches_numpy(ssim_case):
    reference, a, b, inside = ssim_case
    result = metrics.intensity_metrics(
        _like(a, reference), _like(b, reference), mask=_like(inside.astype(np.uint8), reference)
    )
    assert result["mse"] == pytest.approx(np.mean((a[inside] - b[inside]) ** 2), rel=1e-12)
    assert set(result) == {"ncc", "ssim", "mse"}


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------


def test_dice_of_overlapping_spheres_matches_sitk_and_the_lens_formula():
    reference = _grid((49, 33, 21))
    centre = _physical_points(reference)[10, 16, 24]
    direction_u = OBLIQUE @ np.array([0.6, 0.0, 0.8])  # an oblique offset direction in LPS
    radius, offset = 9.0, 6.0
    fixed = _ball(reference, centre, radius)
    warped = _ball(reference, centre + offset * direction_u, radius)
    fixed_image, warped_image = _like(fixed, reference), _like(warped, reference)
    result = metrics.dice(fixed_image, warped_image)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(fixed_image, warped_image)
    assert list(result) == [1]
    assert result[1] == pytest.approx(overlap.GetDiceCoefficient(1), abs=1e-12)
    # Continuous spheres: lens volume pi (4r + d)(2r - d)^2 / 12 over the sphere volume.
    lens = math.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12.0
    assert result[1] == pytest.approx(lens / (4.0 / 3.0 * math.pi * radius**3), abs=0.03)


def test_dice_multi_label_and_empty_labels():
    reference = _grid((24, 20, 16))
    points = _physical_points(reference)
    fixed = _ball(reference, points[8, 10, 8], 5.0) + _ball(reference, points[8, 10, 18], 3.0, label=3)
    warped = _ball(reference, points[8, 11, 8], 5.0) + _ball(reference, points[8, 4, 4], 2.0, label=5)
    fixed_image, warped_image = _like(fixed, reference), _like(warped, reference)
    result = metrics.dice(fixed_image, warped_image)
    assert sorted(result) == [1, 3, 5]  # union of ids present, background excluded
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(fixed_image, warped_image)
    assert result[1] == pytest.approx(overlap.GetDiceCoefficient(1), abs=1e-12)
    assert result[3] == 0.0 and result[5] == 0.0  # absent from one image
    requested = metrics.dice(fixed_image, warped_image, labels=[1, 7])
    assert sorted(requested) == [1, 7] and math.isnan(requested[7])  # absent from both: undefined
    with pytest.raises(ValueError, match="positive"):
        metrics.dice(fixed_image, warped_image, labels=[0, 1])


def test_label_images_on_different_grids_are_rejected():
    reference = _grid((12, 12, 12))
    shifted = _grid((12, 12, 12), origin=(12.0, -30.0, 46.0))
    with pytest.raises(metrics.GeometryMismatchError, match="grid") as raised:
        metrics.dice(reference, shifted)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, DaregError)
    with pytest.raises(ValueError, match="grid"):
        metrics.hausdorff(reference, _grid((12, 12, 12), spacing=(0.8, 1.25, 2.5)))
    with pytest.raises(ValueError, match="grid"):
        metrics.ncc(_grid((12, 12, 12)), _grid((12, 12, 12), direction=OTHER_OBLIQUE))


# --------------------------------------------------------------------------------------------------
# Hausdorff
# --------------------------------------------------------------------------------------------------


def test_hausdorff_of_concentric_spheres_on_anisotropic_oblique_grid():
    r_small, r_large = 6.0, 11.0
    reference = _grid_centred_at((5.0, -7.0, 20.0), size=(35, 23, 15))
    centre = (5.0, -7.0, 20.0)
    fixed = _like(_ball(reference, centre, r_small), reference)
    warped = _like(_ball(reference, centre, r_large), reference)
    result = metrics.hausdorff(fixed, warped)[1]
    # A discrete sphere surface lies within about one voxel of the continuous one.
    assert result["hd"] == pytest.approx(r_large - r_small, abs=max(SPACING))
    assert result["hd95"] == pytest.approx(r_large - r_small, abs=max(SPACING))
    assert result["hd95"] <= result["hd"]
    itk = sitk.HausdorffDistanceImageFilter()
    itk.Execute(fixed, warped)
    assert result["hd"] == pytest.approx(itk.GetHausdorffDistance(), abs=min(SPACING))


@pytest.mark.parametrize("shift", [(3, 0, 0), (0, 3, 0), (0, 0, 3), (2, 3, 1)])
def test_hausdorff_of_a_box_shifted_along_oblique_index_axes_is_the_physical_shift(shift):
    reference = _grid((24, 22, 16))
    fixed = np.zeros((16, 22, 24), np.uint8)
    fixed[3:9, 4:12, 5:15] = 2
    warped = np.roll(fixed, shift[::-1], axis=(0, 1, 2))  # shift is (di, dj, dk); arrays are (k, j, i)
    result = metrics.hausdorff(_like(fixed, reference), _like(warped, reference))[2]
    # Shifting by n voxels along index axis a moves the box n * spacing[a] mm along the direction column.
    expected = float(np.linalg.norm(np.asarray(shift) * np.asarray(SPACING)))
    assert result["hd"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 < result["hd95"] <= result["hd"]


def test_hausdorff_with_empty_labels_is_inf_or_nan():
    reference = _grid((16, 16, 16))
    fixed = np.zeros((16, 16, 16), np.uint8)
    fixed[4:8, 4:8, 4:8] = 1
    warped = np.zeros_like(fixed)
    warped[5:9, 4:8, 4:8] = 2
    result = metrics.hausdorff(_like(fixed, reference), _like(warped, reference), labels=[1, 2, 4])
    assert result[1] == {"hd": math.inf, "hd95": math.inf}
    assert result[2] == {"hd": math.inf, "hd95": math.inf}
    assert math.isnan(result[4]["hd"]) and math.isnan(result[4]["hd95"])


# --------------------------------------------------------------------------------------------------
# Centroids and TRE
# --------------------------------------------------------------------------------------------------


def test_label_centroids_match_sitk_label_shape_statistics():
    reference = _grid((30, 26, 18))
    points = _physical_points(reference)
    labels = _ball(reference, points[6, 9, 8], 5.0, label=1)
    labels[10:15, 12:20, 14:27] = 4  # a box: its centroid is off the voxel lattice
    image = _like(labels, reference)
    result = metrics.label_centroids(image, labels_ids=[1, 4, 9])
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(image)
    for label in (1, 4):
        np.testing.assert_allclose(result[label], shape.GetCentroid(label), atol=1e-9)
    np.testing.assert_allclose(result[1], points[6, 9, 8], atol=1e-9)  # symmetric ball: its centre
    assert np.isnan(result[9]).all()


def _moving_grid_centred_at(point) -> sitk.Image:
    return _grid_centred_at(point, size=(23, 25, 11), spacing=(1.1, 0.9, 1.6), direction=OTHER_OBLIQUE)


def _sphere_pair(fixed_centre, moving_centre):
    """Label-1 spheres in a fixed and a moving grid of different oblique anisotropic geometry."""
    fixed_grid = _grid_centred_at(fixed_centre, size=(27, 19, 13))
    moving_grid = _moving_grid_centred_at(moving_centre)
    fixed = _like(_ball(fixed_grid, fixed_centre, 6.0), fixed_grid)
    moving = _like(_ball(moving_grid, moving_centre, 6.0), moving_grid)
    return fixed, moving


def test_centroid_tre_of_a_known_translation_has_the_right_sign():
    centre = np.array([10.0, -20.0, 35.0])
    t = np.array([4.0, -3.0, 7.5])
    # The feature moves by +t from fixed to moving, so the registration (fixed -> moving) is x -> x + t.
    fixed, moving = _sphere_pair(centre, centre + t)
    assert metrics.centroid_tre(fixed, moving, sitk.TranslationTransform(3, t.tolist()))[1] == pytest.approx(
        0.0, abs=1e-9
    )
    wrong_sign = metrics.centroid_tre(fixed, moving, sitk.TranslationTransform(3, (-t).tolist()))[1]
    assert wrong_sign == pytest.approx(2 * np.linalg.norm(t), abs=1e-9)


def test_centroid_tre_through_an_euler_transform_computed_by_hand():
    centre = np.array([-8.0, 15.0, 60.0])
    angles = (0.2, -0.35, 0.5)
    rotation_centre, translation = np.array([1.0, 2.0, 3.0]), np.array([5.0, -2.0, 4.0])
    euler = sitk.Euler3DTransform(rotation_centre.tolist(), *angles, translation.tolist())
    mapped = _rotation_zxy(angles) @ (centre - rotation_centre) + rotation_centre + translation
    residual = np.array([1.5, -2.0, 0.5])  # where the moving feature really is, relative to T(c)
    fixed, moving = _sphere_pair(centre, mapped + residual)
    assert metrics.centroid_tre(fixed, moving, euler)[1] == pytest.approx(np.linalg.norm(residual), abs=1e-9)


def test_centroid_tre_uses_the_full_composite_transform():
    centre = np.array([3.0, 4.0, 5.0])
    fixed_grid = _grid_centred_at(centre, size=(27, 19, 13))
    shift = np.array([2.0, -1.0, 3.0])  # constant displacement field (the deformable part)

    def deformable():  # a new image each time: DisplacementFieldTransform takes its image over
        return sitk.DisplacementFieldTransform(_field(np.broadcast_to(shift, (13, 19, 27, 3)), fixed_grid))

    matrix = np.array([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.08], [0.02, 0.0, 1.1]])
    affine = sitk.AffineTransform(matrix.ravel().tolist(), (6.0, -4.0, 2.0), (0.0, 0.0, 0.0))
    # SimpleITK composites apply the last transform first: T(x) = affine(x + d(x)).
    composite = sitk.CompositeTransform([affine, deformable()])
    expected = matrix @ (centre + shift) + np.array([6.0, -4.0, 2.0])
    fixed, moving = _sphere_pair(centre, expected)
    assert metrics.centroid_tre(fixed, moving, composite)[1] == pytest.approx(0.0, abs=1e-6)
    # Dropping the affine part (the original ANTs evaluation did) would leave a large error.
    deformable_only = metrics.centroid_tre(fixed, moving, deformable())[1]
    assert deformable_only == pytest.approx(np.linalg.norm(expected - centre - shift), abs=1e-6)


def test_centroid_tre_of_a_label_missing_in_one_image_is_nan():
    fixed, moving = _sphere_pair(np.zeros(3), np.zeros(3))
    result = metrics.centroid_tre(fixed, moving, sitk.TranslationTransform(3), labels=[1, 2])
    assert result[1] == pytest.approx(0.0, abs=1e-9) and math.isnan(result[2])


def test_landmark_tre_by_hand():
    rng = np.random.default_rng(8)
    fixed_points = rng.uniform(-50, 50, size=(6, 3))
    angles, translation = (0.1, 0.2, -0.3), np.array([3.0, 1.0, -2.0])
    euler = sitk.Euler3DTransform((0.0, 0.0, 0.0), *angles, translation.tolist())
    errors = rng.normal(size=(6, 3))
    moving_points = fixed_points @ _rotation_zxy(angles).T + translation + errors
    np.testing.assert_allclose(
        metrics.landmark_tre(fixed_points, moving_points, euler), np.linalg.norm(errors, axis=1), atol=1e-9
    )
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        metrics.landmark_tre(fixed_points, moving_points[:5], euler)


# --------------------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------------------


def _field(vectors_zyx3: np.ndarray, reference: sitk.Image) -> sitk.Image:
    return _like(np.ascontiguousarray(vectors_zyx3, dtype=np.float64), reference, is_vector=True)


def test_jacobian_of_zero_field_is_one_everywhere():
    reference = _grid((12, 10, 8))
    stats = metrics.jacobian_stats(_field(np.zeros((8, 10, 12, 3)), reference))
    assert stats == {"fraction_nonpositive": 0.0, "sdlogj": 0.0, "min": 1.0, "max": 1.0, "mean": 1.0}


def test_jacobian_of_linear_field_on_oblique_anisotropic_grid_is_det_of_i_plus_a():
    reference = _grid((20, 18, 16))
    a = np.array([[0.1, 0.3, -0.2], [0.05, -0.1, 0.25], [-0.3, 0.15, 0.2]])
    field = _field(_physical_points(reference) @ a.T, reference)  # d(x) = A x in LPS mm
    expected = np.linalg.det(np.eye(3) + a)
    determinant = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    np.testing.assert_allclose(determinant, expected, atol=1e-10)  # finite differences are exact here
    stats = metrics.jacobian_stats(field)
    assert stats["mean"] == pytest.approx(expected, abs=1e-10)
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-9)


def test_jacobian_matches_sitk_filter_on_axis_aligned_grid():
    # SimpleITK's filter ignores direction cosines, so it is a valid reference only on an identity grid.
    reference = _grid((20, 18, 16), direction=np.eye(3))
    points = _physical_points(reference)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    field = _field(np.stack([2.0 * np.sin(y / 4.0), np.cos(z / 5.0), 0.2 * x], axis=-1), reference)
    ours = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], itk[1:-1, 1:-1, 1:-1], atol=1e-6)


@pytest.fixture(scope="module")
def folding_case():
    """d(x) = amp sin(k u.x) u on an oblique grid: folds where 1 + amp k cos(k u.x) <= 0."""
    reference = _grid((28, 24, 18))
    points = _physical_points(reference)
    u = np.array([0.48, 0.6, 0.64])  # unit vector, oblique to every grid axis
    k, amp = 2 * math.pi / 14.0, 3.0  # amp * k = 1.35 > 1: folding
    phase = k * points @ u
    field = _field(amp * np.sin(phase)[..., None] * u, reference)
    # Central differences of sin along index axis a (step m_a = M e_a) are exact:
    # sin(k u.m_a) cos(phase), so det = 1 + amp cos(phase) (w^T M^-1 u) with w_a = sin(k u.m_a).
    matrix = OBLIQUE @ np.diag(SPACING)
    w = np.sin(k * (u @ matrix))
    expected = 1.0 + amp * np.cos(phase) * (w @ np.linalg.inv(matrix) @ u)
    interior = np.zeros(phase.shape, dtype=bool)
    interior[1:-1, 1:-1, 1:-1] = True
    return reference, field, expected, interior


def test_jacobian_of_folding_field_matches_exact_finite_differences(folding_case):
    reference, field, expected, interior = folding_case
    determinant = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    np.testing.assert_allclose(determinant[interior], expected[interior], atol=1e-10)
    stats = metrics.jacobian_stats(field, mask=_like(interior.astype(np.uint8), reference))
    assert stats["fraction_nonpositive"] > 0.1
    assert stats["fraction_nonpositive"] == pytest.approx(np.mean(expected[interior] <= 0))
    assert stats["min"] == pytest.approx(expected[interior].min(), abs=1e-10)
    floored = np.log(np.maximum(expected[interior], metrics.LOGJ_FLOOR))
    assert stats["sdlogj"] == pytest.approx(np.std(floored), rel=1e-9)


def test_jacobian_slab_processing_equals_whole_volume(folding_case, monkeypatch):
    _, field, _, _ = folding_case
    whole = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    for slab_voxels in (1, 3 * 24 * 28):  # one slice per slab, then three
        monkeypatch.setattr(metrics, "_JACOBIAN_CHUNK_VOXELS", slab_voxels)
        slabs = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
        np.testing.assert_allclose(slabs, whole, atol=1e-12)


def test_jacobian_mask_restricts_the_statistics():
    reference = _grid((16, 16, 16))
    vectors = np.zeros((16, 16, 16, 3))
    z = np.arange(16, dtype=float)[:, None, None]
    vectors[..., 2] = np.where(z < 8, 0.0, -3.0 * (z - 8))  # folds only in the upper half (k >= 8)
    lower = np.zeros((16, 16, 16), np.uint8)
    lower[:6] = 1
    field = _field(vectors, _grid((16, 16, 16), direction=np.eye(3), spacing=(1.0, 1.0, 1.0)))
    assert metrics.jacobian_stats(field)["fraction_nonpositive"] > 0
    masked = metrics.jacobian_stats(field, mask=_like(lower, field))
    assert masked["fraction_nonpositive"] == 0.0 and masked["min"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="grid"):
        metrics.jacobian_stats(field, mask=_like(lower, reference))


# --------------------------------------------------------------------------------------------------
# registration_metrics
# --------------------------------------------------------------------------------------------------


def _leaves(tree):
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert isinstance(key, str)
            yield from _leaves(value)
    else:
        yield tree


def test_registration_metrics_assembles_consistent_json_friendly_results():
    centre = np.array([0.0, 10.0, 20.0])
    t = np.array([3.0, -2.0, 4.0])
    fixed_grid = _grid_centred_at(centre, size=(27, 19, 13))
    moving_grid = _moving_grid_centred_at(centre + t)
    fixed_labels = _ball(fixed_grid, centre, 6.0) + _ball(fixed_grid, centre + [8.0, 0, 0], 2.0, label=2)
    fixed_labels = _like(fixed_labels, fixed_grid)
    warped_labels = _like(_ball(fixed_grid, centre + [1.0, 0, 0], 6.0), fixed_grid)
    moving_labels = _like(_ball(moving_grid, centre + t, 6.0), moving_grid)
    image = _smooth_random((13, 19, 27), seed=9)
    fixed_image = _like(image, fixed_grid)
    warped_image = _like(image + np.random.default_rng(10).normal(size=image.shape), fixed_grid)
    transform = sitk.TranslationTransform(3, t.tolist())
    field = _field(np.broadcast_to(t, (13, 19, 27, 3)), fixed_grid)
    roi = _like(np.ones((13, 19, 27), np.uint8), fixed_grid)
    fixed_points = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -5.0]])
    result = metrics.registration_metrics(
        fixed_image=fixed_image,
        warped_image=warped_image,
        fixed_labels=fixed_labels,
        warped_labels=warped_labels,
        moving_labels=moving_labels,
        transform=transform,
        field=field,
        fixed_points=fixed_points,
        moving_points=fixed_points + t + [[0.0, 0.0, 0.0], [0.0, 3.0, 4.0]],
        label_names={1: "liver"},
        roi_mask=roi,
    )
    assert result["ncc"] == pytest.approx(metrics.ncc(fixed_image, warped_image))
    liver = result["labels"]["liver"]
    assert liver["dice"] == pytest.approx(metrics.dice(fixed_labels, warped_labels)[1])
    assert liver["hd"] == pytest.approx(metrics.hausdorff(fixed_labels, warped_labels)[1]["hd"])
    assert liver["centroid_tre"] == pytest.approx(0.0, abs=1e-9)
    unnamed = result["labels"]["2"]  # in the fixed labels only
    assert unnamed["dice"] == 0.0 and unnamed["hd"] == math.inf and math.isnan(unnamed["centroid_tre"])
    assert result["labels_mean"]["dice"] == pytest.approx(liver["dice"] / 2)
    assert result["labels_mean"]["centroid_tre"] == pytest.approx(0.0, abs=1e-9)  # NaN excluded
    assert result["landmark_tre"] == pytest.approx({"mean": 2.5, "median": 2.5, "max": 5.0, "n": 2})
    assert result["jacobian"]["fraction_nonpositive"] == 0.0
    assert result["jacobian"]["mean"] == pytest.approx(1.0)
    assert all(type(leaf) in (float, int) for leaf in _leaves(result))
    json.dumps(result)


def test_registration_metrics_resamples_the_roi_onto_a_different_field_grid():
    fixed_grid = _grid((16, 16, 16), direction=np.eye(3), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    image = _like(_smooth_random((16, 16, 16), seed=11), fixed_grid)
    coarse = _grid((8, 8, 8), direction=np.eye(3), spacing=(2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.5))
    vectors = np.zeros((8, 8, 8, 3))
    vectors[4:, ..., 2] = -4.0 * np.arange(4, dtype=float)[:, None, None]  # folds along k for k >= 4
    roi = np.zeros((16, 16, 16), np.uint8)
    roi[:6] = 1  # physical z < 6 mm: only coarse slices k < 3, where nothing folds
    result = metrics.registration_metrics(
        fixed_image=image, warped_image=image, field=_field(vectors, coarse), roi_mask=_like(roi, fixed_grid)
    )
    assert result["jacobian"]["fraction_nonpositive"] == 0.0
    assert metrics.jacobian_stats(_field(vectors, coarse))["fraction_nonpositive"] > 0.0


def test_registration_metrics_rejects_incomplete_inputs():
    grid = _grid((8, 8, 8), pixel=sitk.sitkFloat64)
    with pytest.raises(ValueError, match="fixed_labels"):
        metrics.registration_metrics(fixed_image=grid, warped_image=grid, warped_labels=_grid((8, 8, 8)))
    with pytest.raises(ValueError, match="transform"):
        metrics.registration_metrics(
            fixed_image=grid, warped_image=grid, fixed_points=np.zeros((1, 3)), moving_points=np.zeros((1, 3))
        )
