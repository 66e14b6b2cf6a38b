"""dareg.initialize: the rigid/affine start recovers known motions, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dareg import initialize
from dareg.io import LabelMap
from dareg.phantom import make_phantom


@pytest.fixture(scope="module")
def moved_phantom():
    """A phantom and a copy moved by a known rigid transform S (moving -> fixed)."""
    phantom = make_phantom(seed=2)  # 2.5 x 2.5 x 3 mm, as a clinical CT binned for initialisation
    moving_to_fixed = sitk.Euler3DTransform(
        (0.0, 0.0, 0.0), np.deg2rad(6), np.deg2rad(-4), np.deg2rad(8), (12.0, -9.0, 15.0)
    )
    moving = sitk.Resample(phantom.image, phantom.image, moving_to_fixed, sitk.sitkLinear, -1000.0)
    moving_labels = sitk.Resample(phantom.labels, phantom.image, moving_to_fixed, sitk.sitkNearestNeighbor, 0)
    liver_points = _liver_points(phantom)
    # the true registration transform fixed -> moving is S^-1
    truth = np.array([moving_to_fixed.GetInverse().TransformPoint(tuple(p)) for p in liver_points])
    return phantom, moving, moving_labels, liver_points, truth


def _liver_points(phantom) -> np.ndarray:
    indices = np.argwhere(sitk.GetArrayFromImage(phantom.labels) == 1)[::50][:, ::-1]
    return np.array([phantom.image.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in indices])


def _masks(phantom, moving_labels):
    return LabelMap(phantom.labels).mask([1]), LabelMap(moving_labels).mask([1])


@pytest.mark.parametrize("mode, tolerance_mm", [("rigid", 1.0), ("affine", 2.0)])
def test_recovers_known_rigid_motion(moved_phantom, mode, tolerance_mm):
    phantom, moving, moving_labels, points, truth = moved_phantom
    fixed_mask, moving_mask = _masks(phantom, moving_labels)
    before = np.linalg.norm(points - truth, axis=1).mean()
    affine = initialize.initial_transform(
        phantom.image, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, mode=mode
    )
    error = np.linalg.norm(affine.apply(points) - truth, axis=1)
    assert before > 15.0
    assert error.mean() < tolerance_mm, f"{mode}: {error.mean():.2f} mm (from {before:.1f} mm)"


def test_rigid_without_masks_uses_the_body(moved_phantom):
    phantom, moving, _, points, truth = moved_phantom
    affine = initialize.initial_transform(phantom.image, moving, mode="rigid")
    assert np.linalg.norm(affine.apply(points) - truth, axis=1).mean() < 2.5


def test_center_mode_is_the_centroid_difference(moved_phantom):
    phantom, moving, moving_labels, _, _ = moved_phantom
    fixed_mask, moving_mask = _masks(phantom, moving_labels)
    affine = initialize.initial_transform(
        phantom.image, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, mode="center"
    )
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fixed_mask)
    fixed_centre = np.array(stats.GetCentroid(1))
    stats.Execute(moving_mask)
    np.testing.assert_allclose(affine.matrix, np.eye(3))
    np.testing.assert_allclose(affine.apply(fixed_centre), stats.GetCentroid(1), atol=1e-9)


def test_none_is_identity_and_bad_mode_is_refused(moved_phantom):
    phantom, moving, _, _, _ = moved_phantom
    affine = initialize.initial_transform(phantom.image, moving, mode="none")
    np.testing.assert_array_equal(affine.matrix, np.eye(3))
    np.testing.assert_array_equal(affine.offset, np.zeros(3))
    with pytest.raises(ValueError, match="rigid"):
        initialize.initial_transform(phantom.image, moving, mode="spline")


def test_same_seed_same_transform(moved_phantom):
    phantom, moving, moving_labels, _, _ = moved_phantom
    fixed_mask, moving_mask = _masks(phantom, moving_labels)
    first, second = (
        initialize.initial_transform(
            phantom.image, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, seed=7
        )
        for _ in range(2)
    )
    np.testing.assert_allclose(first.matrix, second.matrix, atol=1e-9)
    np.testing.assert_allclose(first.offset, second.offset, atol=1e-9)
