"""dareg.optimize: its losses, and that it recovers a known displacement with the right sign."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from dareg.optimize import OptimizeSettings, gradient_penalty, local_ncc, optimize_flow, soft_dice


def blobs(shape=(32, 32, 32), seed=0, sigma=2.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), sigma)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32)


def as_tensor(array: np.ndarray) -> tf.Tensor:
    return tf.constant(array[None, ..., None], tf.float32)


def numpy_local_ncc(a: np.ndarray, b: np.ndarray, window: int, eps: float = 1e-5) -> float:
    """Independent reference: scipy box filters with zero padding, as 'SAME' convolutions pad."""

    def mean(x):
        return ndimage.uniform_filter(x.astype(np.float64), window, mode="constant")

    covariance = mean(a * b) - mean(a) * mean(b)
    variance_a, variance_b = mean(a * a) - mean(a) ** 2, mean(b * b) - mean(b) ** 2
    return float(np.mean(covariance**2 / (variance_a * variance_b + eps)))


def test_local_ncc_matches_reference_and_ranks_alignment():
    a, unrelated = blobs(sigma=1.0), blobs(seed=5, sigma=1.0)
    for b in (3 * a, a + 0.1 * unrelated, unrelated):
        assert float(local_ncc(as_tensor(a), as_tensor(b), 5)) == pytest.approx(
            numpy_local_ncc(a, b, 5), abs=1e-4
        )
    scores = [float(local_ncc(as_tensor(a), as_tensor(b), 5)) for b in (a, a + 0.5 * unrelated, unrelated)]
    assert scores[0] > scores[1] > scores[2]  # (identical images stay below 1 by the 1e-5 stabiliser)


def test_soft_dice_values():
    labels = np.zeros((1, 8, 8, 8, 2), np.float32)
    labels[0, :4, ..., 0] = 1
    labels[0, 4:, ..., 1] = 1
    assert float(soft_dice(labels, labels)) == pytest.approx(1.0, abs=1e-5)
    shifted = np.roll(labels, 2, axis=1)
    assert float(soft_dice(labels, shifted)) == pytest.approx(0.5, abs=1e-3)  # half of each slab overlaps


def test_gradient_penalty_is_zero_for_translation_and_exact_for_a_ramp():
    flow = np.zeros((1, 10, 10, 10, 3), np.float32)
    flow[..., 1] = 2.5
    assert float(gradient_penalty(tf.constant(flow), np.array([2.0, 3.0, 4.0]))) == 0.0
    ramp = np.zeros((1, 10, 10, 10, 3), np.float32)
    ramp[..., 0] = np.arange(10, dtype=np.float32)[None, :, None, None] * 0.1  # 0.1 voxel per voxel along z
    # displacement_z in mm changes by 0.1 * 2 mm per 2 mm: gradient 0.1 along axis 0, zero elsewhere
    expected = 0.1**2 / 3.0
    assert float(gradient_penalty(tf.constant(ramp), np.array([2.0, 3.0, 4.0]))) == pytest.approx(
        expected, rel=1e-4
    )


def test_recovers_a_known_shift_with_the_right_sign():
    """moving = fixed shifted by +3 voxels along axis 1, so warped(p) = moving(p + u) needs u = +3."""
    fixed = blobs((48, 48, 48), seed=1)
    moving = ndimage.shift(fixed, (0, 3, 0), order=1, mode="nearest")
    flow = optimize_flow(
        fixed,
        moving,
        spacing_zyx=(2.0, 2.0, 2.0),
        taper=np.ones_like(fixed),
        settings=OptimizeSettings(steps=80, learning_rate_mm=0.5),
    )
    centre = flow[12:-12, 12:-12, 12:-12]
    assert np.median(centre[..., 1]) == pytest.approx(3.0, abs=0.5)
    assert np.abs(np.median(centre[..., 0])) < 0.5 and np.abs(np.median(centre[..., 2])) < 0.5


def test_dice_term_pulls_labels_together():
    fixed_labels = np.zeros((32, 32, 32, 1), np.float32)
    fixed_labels[10:22, 10:22, 10:22] = 1
    moving_labels = np.roll(fixed_labels, 3, axis=2)
    flat = np.full((32, 32, 32), 0.5, np.float32)  # no intensity information at all
    flow = optimize_flow(
        flat,
        flat,
        spacing_zyx=(2.0, 2.0, 2.0),
        taper=np.ones_like(flat),
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        settings=OptimizeSettings(steps=60),
    )
    inside = fixed_labels[..., 0] > 0
    assert np.median(flow[..., 2][inside]) > 1.5


def test_zero_steps_returns_tapered_initial_flow():
    initial = np.ones((16, 16, 16, 3), np.float32)
    taper = np.full((16, 16, 16), 0.5, np.float32)
    flow = optimize_flow(
        blobs((16, 16, 16)),
        blobs((16, 16, 16)),
        spacing_zyx=(1, 1, 1),
        taper=taper,
        initial_flow=initial,
        settings=OptimizeSettings(steps=0),
    )
    np.testing.assert_array_equal(flow, 0.5 * initial)


def test_odd_grid_is_refused():
    with pytest.raises(ValueError, match="even"):
        optimize_flow(
            blobs((15, 16, 16)),
            blobs((15, 16, 16)),
            spacing_zyx=(1, 1, 1),
            taper=np.ones((15, 16, 16), np.float32),
        )
