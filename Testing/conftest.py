"""Shared fixtures: oblique, anisotropic geometries and the path to ../shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "totalsegmentator"


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation about ``axis`` (any length)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def make_image(
    array: np.ndarray,
    *,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> sitk.Image:
    """A sitk image from a (z, y, x) array with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(map(float, spacing)))
    image.SetOrigin(tuple(map(float, origin)))
    if direction is not None:
        image.SetDirection(tuple(map(float, np.asarray(direction).ravel())))
    return image


@pytest.fixture
def oblique_direction() -> np.ndarray:
    """A 25-degree rotation about a tilted axis, with one flipped axis (left-handed frame)."""
    return rotation_matrix([1.0, 2.0, 0.5], 25.0) @ np.diag([1.0, -1.0, 1.0])


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA} (it lives beside the repository in ../shared)"
        )
    return SHARED_DATA
