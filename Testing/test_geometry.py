"""dareg.geometry: ROI, model grid, and the way back to one physical transform.

Every path runs on oblique, anisotropic, left-handed geometry and is checked against an
independent SimpleITK computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dareg import geometry

from conftest import make_image, rotation_matrix


def smooth_random_image(shape, seed, sigma=3.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma).astype(np.float32) * 100


@pytest.fixture
def fixed_and_moving(oblique_direction):
    fixed = make_image(
        np.zeros((40, 48, 56), np.float32),
        spacing=(1.2, 0.9, 2.0),
        origin=(10, -30, 5),
        direction=oblique_direction,
    )
    moving_direction = rotation_matrix([0.3, -1.0, 0.2], 12.0)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint((27.5, 23.5, 19.5)))
    moving_spacing, moving_size = np.array([1.0, 1.1, 1.6]), np.array([130, 110, 90])
    origin = centre - moving_direction @ (moving_spacing * (moving_size - 1) / 2)
    moving = make_image(
        smooth_random_image(tuple(moving_size[::-1]), seed=1),
        spacing=moving_spacing,
        origin=origin,
        direction=moving_direction,
    )
    return fixed, moving


def test_roi_box_covers_masks_with_margin_and_clamps(oblique_direction):
    mask = np.zeros((40, 50, 60), np.uint8)
    mask[15:25, 20:30, 25:35] = 1
    fixed = make_image(mask, spacing=(1.5, 1.0, 2.5), origin=(3, 4, 5), direction=oblique_direction)
    lower, upper = geometry.roi_index_box(fixed, fixed_mask=fixed, margin_mm=10.0)
    # x: 25..34 +- 10/1.5; y: 20..29 +- 10; z: 15..24 +- 4 voxels, clamped to the image
    np.testing.assert_allclose(lower, [25 - 10 / 1.5, 10, 15 - 4], atol=1e-9)
    np.testing.assert_allclose(upper, [34 + 10 / 1.5, 39, 24 + 4], atol=1e-9)
    whole = geometry.roi_index_box(fixed)
    np.testing.assert_allclose(whole[1], np.array(fixed.GetSize()) - 1)


def test_roi_box_includes_moving_mask_through_transform(oblique_direction):
    fixed = make_image(np.zeros((30, 40, 50), np.uint8), spacing=(2, 2, 2), direction=oblique_direction)
    moving = make_image(np.zeros((30, 40, 50), np.uint8), spacing=(2, 2, 2), direction=oblique_direction)
    moving_array = sitk.GetArrayFromImage(moving)
    moving_array[10:12, 10:12, 10:12] = 1
    moving_mask = make_image(moving_array, spacing=(2, 2, 2), direction=oblique_direction)
    shift = sitk.TranslationTransform(3, tuple(oblique_direction @ np.array([10.0, 0.0, 0.0])))
    lower, upper = geometry.roi_index_box(
        fixed, moving_mask=moving_mask, moving_to_fixed=shift, margin_mm=0.0
    )
    np.testing.assert_allclose(lower, [15, 10, 10], atol=1e-6)
    np.testing.assert_allclose(upper, [16, 11, 11], atol=1e-6)


def test_model_grid_tiles_box_exactly(oblique_direction):
    fixed = make_image(
        np.zeros((40, 50, 60), np.float32),
        spacing=(1.5, 1.0, 2.5),
        origin=(3, 4, 5),
        direction=oblique_direction,
    )
    lower, upper = np.array([5.0, 10.0, 2.0]), np.array([44.0, 39.0, 33.0])
    grid = geometry.model_grid_for_box(fixed, lower, upper, grid_shape=(16, 24, 32))
    assert grid.shape == (16, 24, 32)
    np.testing.assert_allclose(grid.spacing, [40 * 1.5 / 32, 30 * 1.0 / 24, 32 * 2.5 / 16])
    # the grid's outer voxel edges coincide with the box's outer voxel edges
    reference = grid.reference_image()
    first_edge = np.array(reference.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    last_edge = np.array(reference.TransformContinuousIndexToPhysicalPoint(tuple(np.array(grid.size) - 0.5)))
    np.testing.assert_allclose(first_edge, fixed.TransformContinuousIndexToPhysicalPoint(tuple(lower - 0.5)))
    np.testing.assert_allclose(last_edge, fixed.TransformContinuousIndexToPhysicalPoint(tuple(upper + 0.5)))


def test_flow_to_mm_round_trip_and_axis_order(oblique_direction):
    grid = geometry.ModelGrid(
        origin=(1, 2, 3), spacing=(0.5, 2.0, 3.0), direction=tuple(oblique_direction.ravel()), size=(4, 5, 6)
    )
    flow = np.zeros(grid.shape + (3,), np.float32)
    flow[..., 0] = 1.0  # one voxel along array axis 0 = ITK index k (z)
    mm = geometry.flow_to_displacement_mm(flow, grid)
    np.testing.assert_allclose(mm[0, 0, 0], oblique_direction[:, 2] * 3.0)
    random_flow = np.random.default_rng(0).normal(size=grid.shape + (3,)).astype(np.float32)
    back = geometry.displacement_mm_to_flow(geometry.flow_to_displacement_mm(random_flow, grid), grid)
    np.testing.assert_allclose(back, random_flow, atol=1e-5)


def test_affine_map_matches_sitk():
    euler = sitk.Euler3DTransform((5.0, -3.0, 10.0), 0.1, -0.2, 0.05, (4.0, 5.0, -6.0))
    affine = geometry.AffineMap.from_sitk(euler)
    point = np.array([12.0, -40.0, 7.0])
    np.testing.assert_allclose(affine.apply(point), euler.TransformPoint(tuple(point)), atol=1e-9)
    inverse = affine.inverse_sitk()
    np.testing.assert_allclose(inverse.TransformPoint(euler.TransformPoint(tuple(point))), point, atol=1e-9)
    with pytest.raises(ValueError):
        bspline = sitk.BSplineTransformInitializer(make_image(np.zeros((8, 8, 8), np.float32)), [2, 2, 2])
        bspline.SetParameters(np.linspace(0, 3, bspline.GetNumberOfParameters()).tolist())
        geometry.AffineMap.from_sitk(bspline)


def test_composed_field_equals_affine_after_displacement(fixed_and_moving, oblique_direction):
    """T(x) = A(x + d(x)) written as one field warps like SimpleITK's composite of A and a translation."""
    fixed, moving = fixed_and_moving
    grid = geometry.model_grid_for_box(
        fixed, np.array([10.0, 8.0, 6.0]), np.array([45.0, 39.0, 33.0]), grid_shape=(16, 16, 16)
    )
    euler = sitk.Euler3DTransform((20.0, -10.0, 15.0), 0.08, -0.05, 0.1, (3.0, -2.0, 4.0))
    affine = geometry.AffineMap.from_sitk(euler)
    shift_mm = np.array([2.5, -1.5, 3.0])
    displacement = np.broadcast_to(shift_mm, grid.shape + (3,))
    field = geometry.compose_displacement_field(fixed, grid, affine, displacement)
    warped = sitk.Resample(
        moving,
        grid.reference_image(),
        geometry.displacement_field_transform(field),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    composite = sitk.CompositeTransform([euler, sitk.TranslationTransform(3, tuple(shift_mm))])
    expected = sitk.Resample(
        moving, grid.reference_image(), composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected), atol=1e-3)
    # outside the grid: the affine part alone, across the whole fixed image
    whole = sitk.Resample(moving, fixed, geometry.displacement_field_transform(field), sitk.sitkLinear, 0.0)
    affine_only = sitk.Resample(moving, fixed, euler, sitk.sitkLinear, 0.0)
    inside = sitk.GetArrayFromImage(
        sitk.Resample(
            sitk.Image(grid.reference_image()) + 1, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0
        )
    )
    outside = ndimage.binary_dilation(inside > 0, iterations=3) == 0
    difference = np.abs(sitk.GetArrayFromImage(whole) - sitk.GetArrayFromImage(affine_only))[outside]
    assert outside.sum() > 1000 and difference.max() < 1e-3


def test_model_grid_flow_matches_physical_warp(fixed_and_moving):
    """Warping on the model grid in index space equals resampling through the composed physical field."""
    fixed, moving = fixed_and_moving
    grid = geometry.model_grid_for_box(
        fixed, np.array([5.0, 5.0, 5.0]), np.array([50.0, 42.0, 34.0]), grid_shape=(16, 20, 24)
    )
    affine = geometry.AffineMap.from_sitk(
        sitk.Euler3DTransform((0, 0, 0), 0.05, 0.02, -0.04, (1.0, 2.0, -1.0))
    )
    moving_on_grid = geometry.resample_to_grid(moving, grid, transform=affine.to_sitk())
    rng = np.random.default_rng(3)
    flow = np.stack([ndimage.gaussian_filter(rng.normal(size=grid.shape), 3) * 8 for _ in range(3)], axis=-1)
    coordinates = np.indices(grid.shape, dtype=np.float64) + np.moveaxis(flow, -1, 0)
    warped_index_space = ndimage.map_coordinates(moving_on_grid, coordinates, order=1, mode="nearest")
    field = geometry.compose_displacement_field(
        fixed, grid, affine, geometry.flow_to_displacement_mm(flow, grid)
    )
    smoothed_moving = geometry._antialias_for_grid(moving, grid, affine.to_sitk())
    warped_physical = sitk.GetArrayFromImage(
        sitk.Resample(
            smoothed_moving,
            grid.reference_image(),
            geometry.displacement_field_transform(field),
            sitk.sitkLinear,
        )
    )
    interior = (slice(3, -3),) * 3  # away from border clamping
    error = np.abs(warped_index_space - warped_physical)[interior]
    # both interpolate linearly, but on different lattices (grid vs moving voxels): small, not zero
    assert np.percentile(error, 99) < 0.05 * np.ptp(moving_on_grid)


def test_taper_is_zero_on_border_and_one_inside():
    grid = geometry.ModelGrid(
        origin=(0, 0, 0), spacing=(2.0, 2.0, 2.0), direction=tuple(np.eye(3).ravel()), size=(32, 32, 32)
    )
    weights = geometry.taper_weights(grid, width_mm=10.0)
    assert weights[0].max() == 0 and weights[:, :, -1].max() == 0
    assert np.all(weights[5:-5, 5:-5, 5:-5] == 1.0)
    assert np.all(np.diff(weights[:16, 16, 16]) >= 0)


def test_resample_to_grid_antialiases_and_normalises():
    fine = make_image(np.indices((64, 64, 64)).sum(0) % 2 * 1000.0 - 500.0, spacing=(0.5, 0.5, 0.5))
    grid = geometry.ModelGrid(
        origin=(0.75, 0.75, 0.75),
        spacing=(2.0, 2.0, 2.0),
        direction=tuple(np.eye(3).ravel()),
        size=(15, 15, 15),
    )
    coarse = geometry.resample_to_grid(fine, grid)
    assert np.ptp(coarse[2:-2, 2:-2, 2:-2]) < 50  # a checkerboard at 0.5 mm averages out at 2 mm
    normalised = geometry.normalize_ct(np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0]))
    np.testing.assert_allclose(normalised, [0, 0, 0.5, 1, 1])


def test_physical_overlap(oblique_direction):
    a = make_image(np.zeros((10, 10, 10), np.uint8), spacing=(1, 1, 1))
    assert geometry.physical_overlap(a, a) == 1.0
    far = make_image(np.zeros((10, 10, 10), np.uint8), spacing=(1, 1, 1), origin=(100, 0, 0))
    assert geometry.physical_overlap(a, far) == 0.0
    half = make_image(np.zeros((10, 10, 10), np.uint8), spacing=(1, 1, 1), origin=(5, 0, 0))
    assert 0.3 < geometry.physical_overlap(a, half) < 0.7
