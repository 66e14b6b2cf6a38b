"""Synthetic-pair augmentation layer: seeds, exact ground truth, sign, limits, labels, intensities.

Independent references: scipy's ``map_coordinates`` for the sampling, scipy's ``RBFInterpolator``
(kernel "linear" = -r with a degree-1 polynomial, the same 3-D thin-plate spline) for the spline, and
scipy's ``Rotation`` for the Euler angles recovered by a least-squares affine fit of the flow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from scipy.interpolate import RBFInterpolator
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from dareg.models.transformer import warp
from dareg.training.augmentation import (
    PairParameters,
    SyntheticPairAugmentation,
    tps_matrix,
)

SPACING = (2.0, 1.5, 1.0)  # anisotropic on purpose: limits are mm, the flow is voxels


def smooth_image(shape, seed: int = 0, batch: int = 2) -> np.ndarray:
    """(B, D, H, W, 1) smooth random intensities in [0, 1]."""
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.random((batch, *shape)), sigma=(0, 2, 2, 2))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return noise[..., None].astype(np.float32)


def box_labels(shape, batch: int = 2, channels: int = 4) -> np.ndarray:
    """(B, D, H, W, channels) one-hot: background 0, two boxes with ids 1 and 3, id 2 absent."""
    ids = np.zeros(shape, int)
    d, h, w = shape
    ids[d // 4 : d // 2, h // 4 : h // 2, w // 4 : w // 2] = 1
    ids[d // 2 : 3 * d // 4, h // 2 : 3 * h // 4, w // 3 : 2 * w // 3] = 3
    one_hot = np.eye(channels, dtype=np.float32)[ids]
    return np.repeat(one_hot[None], batch, axis=0)


def make_layer(**kwargs) -> SyntheticPairAugmentation:
    return SyntheticPairAugmentation(kwargs.pop("spacing", SPACING), seed=kwargs.pop("seed", 0), **kwargs)


def translation_parameters(batch: int, controls: int, *, translation_mm=(0.0, 0.0, 0.0)) -> PairParameters:
    """Parameters of a pure translation: no spline, no rotation, neutral intensities."""
    return PairParameters(
        control_points=None,
        control_displacements=tf.zeros((batch, controls, 3)),
        angles=tf.zeros((batch, 3)),
        translation=tf.constant([translation_mm] * batch, tf.float32),
        gamma=tf.ones((batch, 2)),
        brightness=tf.zeros((batch, 2)),
    )


def voxel_mm(shape, spacing=SPACING) -> np.ndarray:
    """(D, H, W, 3) mm coordinates of every voxel relative to the grid's middle (the layer's frame)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def centroid(mass: np.ndarray) -> np.ndarray:
    """Mass-weighted centroid (voxels) of a (D, H, W) array."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mass.shape], indexing="ij"), axis=-1)
    return (grid * mass[..., None]).reshape(-1, 3).sum(0) / mass.sum()


def to_numpy(pair: dict) -> dict:
    return {key: value.numpy() for key, value in pair.items()}


def test_same_seed_same_pairs_and_different_seed_different_pairs():
    image, labels = smooth_image((32, 32, 32)), box_labels((32, 32, 32))
    first, twin, other = make_layer(seed=7), make_layer(seed=7), make_layer(seed=8)
    calls = [[to_numpy(layer(image, labels)) for _ in range(2)] for layer in (first, twin, other)]
    for call, twin_call in zip(calls[0], calls[1], strict=True):
        for key in call:
            np.testing.assert_array_equal(call[key], twin_call[key])
    flows = [calls[0][0]["flow"], calls[0][1]["flow"], calls[2][0]["flow"]]
    assert np.abs(flows[0] - flows[1]).max() > 1.0  # the stream advances between calls
    assert np.abs(flows[0] - flows[2]).max() > 1.0  # another seed, other pairs
    assert np.abs(flows[0][0] - flows[0][1]).max() > 1.0  # each sample of a batch has its own draw


@pytest.mark.parametrize("control_points", ["paper", "original"])
def test_warping_moving_with_the_flow_reproduces_fixed(control_points):
    shape = (32, 28, 36)
    image, labels = smooth_image(shape), box_labels(shape)
    pair = to_numpy(make_layer(control_points=control_points)(image, labels))
    np.testing.assert_array_equal(pair["moving"], image)
    np.testing.assert_array_equal(pair["moving_labels"], labels)
    warped = warp(pair["moving"], pair["flow"]).numpy()
    np.testing.assert_allclose(warped, pair["fixed"], atol=1e-5)
    # Independently: fixed(p) = image(p + flow(p)), border replicated (scipy's mode "nearest").
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    for sample in range(2):
        where = index + np.moveaxis(pair["flow"][sample], -1, 0)
        expected = map_coordinates(image[sample, ..., 0].astype(np.float64), where, order=1, mode="nearest")
        np.testing.assert_allclose(pair["fixed"][sample, ..., 0], expected, atol=1e-5)
        label_ids = map_coordinates(labels[sample].argmax(-1), where, order=0, mode="nearest")
        agreement = np.mean(label_ids == pair["fixed_labels"][sample].argmax(-1))
        assert agreement > 0.999  # only exact .5 ties may round differently
    assert np.abs(pair["flow"]).max() > 5.0  # a real deformation, not the identity


@pytest.mark.parametrize(("control_points", "size"), [("paper", 29), ("original", 28)])
def test_spline_is_the_thin_plate_spline_through_the_drawn_displacements(control_points, size):
    # (size - 1) is a multiple of (grid - 1), so with tps_nodes=size every voxel is an evaluation node.
    shape = (size, size, size)
    layer = make_layer(
        control_points=control_points, max_rotation_deg=0.0, max_translation_mm=0.0, tps_nodes=size
    )
    image = smooth_image(shape, batch=1)
    drawn = layer.sample_parameters(image)
    parameters = drawn._replace(control_displacements=0.5 * drawn.control_displacements)
    flow_mm = layer.synthesize(image, None, parameters)["flow"].numpy()[0] * np.asarray(SPACING)
    controls = layer.control_grid if drawn.control_points is None else drawn.control_points.numpy()[0]
    spline = RBFInterpolator(controls, parameters.control_displacements.numpy()[0], kernel="linear", degree=1)
    expected = spline(voxel_mm(shape).reshape(-1, 3)).reshape(flow_mm.shape)
    assert np.abs(expected).max() < 6.0  # below the limit: the layer did not rescale
    np.testing.assert_allclose(flow_mm, expected, atol=2e-3)


def test_coarse_evaluation_stays_close_to_the_exact_spline():
    shape = (48, 48, 48)
    layer = make_layer(spacing=(1.0, 1.0, 1.0), max_rotation_deg=0.0, max_translation_mm=0.0)
    image = smooth_image(shape, batch=1)
    drawn = layer.sample_parameters(image)
    parameters = drawn._replace(control_displacements=0.5 * drawn.control_displacements)
    flow = layer.synthesize(image, None, parameters)["flow"].numpy()[0]
    points = voxel_mm(shape, (1.0, 1.0, 1.0))[::2, ::2, ::2].reshape(-1, 3)
    exact = tps_matrix(points, layer.control_grid).numpy() @ parameters.control_displacements.numpy()[0]
    error = np.abs(flow[::2, ::2, ::2].reshape(-1, 3) - exact)  # voxels = mm here
    # Measured 0.081 mean / 0.42 max for displacements up to 3 mm: the r kernel has a cusp at each
    # control point that linear interpolation between nodes rounds off (the flow is still exact).
    assert error.mean() < 0.1 and error.max() < 0.6, (error.mean(), error.max())


def test_pure_translation_sign_flow_is_plus_t_and_content_moves_by_plus_t():
    shape = (32, 32, 32)
    translation_voxels = np.array([2.0, -2.0, 3.0])
    parameters = translation_parameters(2, 512, translation_mm=tuple(translation_voxels * SPACING))
    image, labels = smooth_image(shape), box_labels(shape)
    pair = to_numpy(make_layer().synthesize(image, labels, parameters))
    np.testing.assert_allclose(
        pair["flow"], np.broadcast_to(translation_voxels, pair["flow"].shape), atol=1e-5
    )
    # A feature at fixed position q lies in the moving image at q + flow(q) = q + t.
    for channel in (1, 3):
        moved = centroid(pair["moving_labels"][0, ..., channel]) - centroid(
            pair["fixed_labels"][0, ..., channel]
        )
        np.testing.assert_allclose(moved, translation_voxels, atol=1e-6)
    # Soft labels: linear sampling moves centroids by exactly t, fractional t included.
    fractional = np.array([1.25, -0.5, 2.75])
    soft = make_layer(label_interpolation="linear").synthesize(
        image, labels, translation_parameters(2, 512, translation_mm=tuple(fractional * SPACING))
    )
    moved = centroid(soft["moving_labels"].numpy()[0, ..., 1]) - centroid(
        soft["fixed_labels"].numpy()[0, ..., 1]
    )
    np.testing.assert_allclose(moved, fractional, atol=1e-4)


def test_spline_displacement_never_exceeds_the_limit_in_mm():
    shape = (32, 32, 32)
    layer = make_layer(max_rotation_deg=0.0, max_translation_mm=0.0)
    image = smooth_image(shape, batch=4)
    largest = []
    for _ in range(3):
        parameters = layer.sample_parameters(image)
        assert np.abs(parameters.control_displacements.numpy()).max() <= 6.0
        flow_mm = layer.synthesize(image, None, parameters)["flow"].numpy() * np.asarray(SPACING)
        largest.append(np.abs(flow_mm).max(axis=(1, 2, 3, 4)))
    largest = np.concatenate(largest)
    assert largest.max() <= 6.0 + 1e-4
    assert largest.min() > 3.0  # the limit is used, not trivially met


def test_rigid_part_recovered_by_an_affine_fit_is_within_bounds():
    shape = (24, 32, 28)
    layer = make_layer(max_deformation_mm=0.0, seed=3)
    image = smooth_image(shape, batch=6)
    parameters = layer.sample_parameters(image)
    flow = layer.synthesize(image, None, parameters)["flow"].numpy()
    source = voxel_mm(shape).reshape(-1, 3)
    design = np.concatenate([source, np.ones((len(source), 1))], axis=1)
    for sample in range(len(flow)):
        target = source + flow[sample].reshape(-1, 3) * np.asarray(SPACING)
        solution, *_ = np.linalg.lstsq(design, target, rcond=None)
        matrix, translation = solution[:3].T, solution[3]
        np.testing.assert_allclose(design @ solution, target, atol=2e-3)  # rigid: an exact affine fit
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(3), atol=1e-4)  # a rotation
        angles = Rotation.from_matrix(matrix).as_euler("XYZ")
        np.testing.assert_allclose(angles, parameters.angles.numpy()[sample], atol=1e-4)
        np.testing.assert_allclose(translation, parameters.translation.numpy()[sample], atol=1e-3)
        assert np.all(np.abs(np.degrees(angles)) <= 10.0 + 1e-4)
        assert np.all(np.abs(translation) <= 30.0 + 1e-3)
    all_angles = np.abs(np.degrees(parameters.angles.numpy()))
    assert np.all(all_angles.max(axis=0) > 3.0)  # every axis rotates, not one axis per sample


def test_labels_stay_one_hot_with_their_ids_and_soft_labels_sum_to_one():
    shape = (32, 32, 32)
    image, labels = smooth_image(shape), box_labels(shape)
    small = {"max_translation_mm": 5.0}  # keep both boxes in a 32-voxel view
    nearest = make_layer(**small)(image, labels)["fixed_labels"].numpy()
    assert set(np.unique(nearest)) <= {0.0, 1.0}
    np.testing.assert_array_equal(nearest.sum(-1), 1.0)
    for sample in nearest:
        assert set(np.unique(sample.argmax(-1))) == {0, 1, 3}  # id 2 was absent and stays absent
    soft = make_layer(label_interpolation="linear", **small)(image, labels)["fixed_labels"].numpy()
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-5)
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert np.mean((soft > 0.01) & (soft < 0.99)) > 0.001  # boundaries are soft
    assert soft[..., 2].max() == 0.0


def test_gamma_and_brightness_ranges_with_separate_draws_for_fixed_and_moving():
    value = 0.4
    image = np.full((64, 8, 8, 8, 1), value, np.float32)  # a constant image warps to itself
    gamma_layer = make_layer(gamma=2.0)
    parameters = gamma_layer.sample_parameters(image)
    pair = to_numpy(gamma_layer.synthesize(image, None, parameters))
    gamma = np.stack(
        [np.log(pair[key][:, 0, 0, 0, 0]) / np.log(value) for key in ("fixed", "moving")], axis=1
    )
    np.testing.assert_allclose(gamma, parameters.gamma.numpy(), rtol=1e-4)
    assert gamma.min() >= 0.5 - 1e-5 and gamma.max() <= 2.0 + 1e-5
    assert gamma.min() < 0.6 and gamma.max() > 1.7  # the range is used
    assert np.abs(gamma[:, 0] - gamma[:, 1]).min() > 0.0  # fixed and moving drawn separately
    brightness_layer = make_layer(brightness=0.2)
    parameters = brightness_layer.sample_parameters(image)
    pair = to_numpy(brightness_layer.synthesize(image, None, parameters))
    shift = np.stack([pair[key][:, 0, 0, 0, 0] - value for key in ("fixed", "moving")], axis=1)
    np.testing.assert_allclose(shift, parameters.brightness.numpy(), atol=1e-6)
    assert np.abs(shift).max() <= 0.2 + 1e-6 and np.abs(shift).max() > 0.18
    assert np.abs(shift[:, 0] - shift[:, 1]).min() > 0.0
    untouched = make_layer()(image, None)
    np.testing.assert_array_equal(untouched["moving"].numpy(), image)


@pytest.mark.parametrize(("control_points", "size"), [("paper", 29), ("original", 28)])
def test_no_nan_where_control_points_coincide_with_voxel_centres(control_points, size):
    shape = (size, size, size)
    image = smooth_image(shape)
    layer = make_layer(spacing=(1.0, 1.0, 1.0), control_points=control_points, tps_nodes=size)
    pair = to_numpy(layer(image, box_labels(shape)))
    for key, value in pair.items():
        assert np.all(np.isfinite(value)), key
    controls = layer.control_grid  # on voxel centres: distance exactly 0 to a node
    np.testing.assert_allclose(tps_matrix(controls, controls).numpy(), np.eye(len(controls)), atol=1e-4)
    # A hair off the control points |x|^2 - 2 x.c + |c|^2 rounds below zero for many of them.
    near = tps_matrix(controls + 1e-10, controls).numpy()
    np.testing.assert_allclose(near, np.eye(len(controls)), atol=1e-4)


def test_original_layout_draws_distinct_foreground_points_off_the_anchor_grid():
    shape = (29, 32, 30)  # the 8 corner anchors lie on voxel centres, the other anchors do not
    rng = np.random.default_rng(4)
    interior = {tuple(v) for v in rng.integers(3, 26, (12, 3))}
    image = np.zeros((3, *shape, 1), np.float32)
    for voxel in interior | {(z, y, x) for z in (0, 28) for y in (0, 31) for x in (0, 29)}:
        image[(slice(None), *voxel, 0)] = 1.0  # foreground: the corners and a few interior voxels
    layer = make_layer(control_points="original")
    parameters = layer.sample_parameters(image)
    points = parameters.control_points.numpy()
    np.testing.assert_allclose(points[:, :64], np.broadcast_to(layer.control_grid, (3, 64, 3)))
    np.testing.assert_array_equal(parameters.control_displacements.numpy()[:, :64], 0.0)  # anchors
    voxels = points[:, 64:] / np.asarray(SPACING) + (np.asarray(shape) - 1) / 2
    np.testing.assert_allclose(voxels, np.round(voxels), atol=1e-9)  # on voxel centres
    for sample in range(3):
        chosen = {tuple(v) for v in np.round(voxels[sample]).astype(int)}
        assert len(chosen) == 10 and chosen <= interior  # distinct, foreground, never a corner anchor
    assert len({tuple(p) for p in points[:, 64:].reshape(-1, 3)}) > 10  # samples draw separately


def test_graph_mode_call_matches_eager_and_xla_matches_plain_tensorflow():
    shape = (32, 32, 32)
    image, labels = smooth_image(shape), box_labels(shape)
    graph_layer, eager_layer = make_layer(seed=5), make_layer(seed=5)
    plain_layer = make_layer(seed=5, jit_compile=False)
    spec = [tf.TensorSpec((None, *shape, 1)), tf.TensorSpec((None, *shape, 4))]
    call = tf.function(lambda pixels, one_hot: graph_layer(pixels, one_hot), input_signature=spec)
    graph, eager = to_numpy(call(image, labels)), to_numpy(eager_layer(image, labels))
    plain = to_numpy(plain_layer(image, labels))
    for key in eager:
        np.testing.assert_allclose(graph[key], eager[key], atol=1e-5)
        np.testing.assert_allclose(plain[key], eager[key], atol=1e-4)


def test_get_config_round_trip():
    layer = make_layer(
        control_points="original", gamma=2.0, brightness=0.1, label_interpolation="linear", seed=11
    )
    config = json.loads(json.dumps(layer.get_config()))
    clone = SyntheticPairAugmentation.from_config(config)
    assert clone.get_config() == layer.get_config()
    image, labels = smooth_image((32, 32, 32)), box_labels((32, 32, 32))
    original, copied = to_numpy(layer(image, labels)), to_numpy(clone(image, labels))
    for key in original:
        np.testing.assert_array_equal(original[key], copied[key])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"control_points": "bogus"},
        {"spacing": (1.0, -1.0, 1.0)},
        {"gamma": 0.5},
        {"label_interpolation": "cubic"},
        {"tps_nodes": 1},
        {"max_translation_mm": -1.0},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        make_layer(**kwargs)


def test_labels_on_another_grid_raise_value_error():
    with pytest.raises(ValueError, match="labels"):
        make_layer()(smooth_image((32, 32, 32)), box_labels((32, 32, 16)))
