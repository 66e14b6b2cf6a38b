"""Tests of dareg.models: U-Net presets, spatial transformer, flow upsampling, scaling and squaring,
model folders (save/load, checksums, strict config), the bundled-model registry and device choice.

Oracles are independent of the code under test: the parameter counts of the reference spec,
scipy.ndimage (map_coordinates, zoom), analytic translations/rotations (scipy.linalg.expm),
finite differences and hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.linalg import expm

from dareg.errors import DaregError
from dareg.models import (
    FlowUpsample,
    ModelConfig,
    SpatialTransformer,
    UNetSpec,
    VelocityIntegration,
    build_registration_network,
    default_model_name,
    integrate_velocity,
    list_bundled_models,
    load_model,
    resolve_model,
    save_model,
    select_device,
    upsample_flow,
    warp,
)

GRID = (32, 32, 32)


def _smooth_flow(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Random smooth displacement field (B, D, H, W, 3) of about ``amplitude`` voxels."""
    noise = rng.normal(size=(*shape, 3))
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 3, 3, 3, 0))
    return (amplitude * smooth / smooth.std()).astype(np.float32)


def _map_coordinates(volume: np.ndarray, flow: np.ndarray, order: int) -> np.ndarray:
    """scipy reference of warp for one (D, H, W) volume and (D, H, W, 3) flow, border replication."""
    grid = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    coordinates = np.stack([g + flow[..., axis] for axis, g in enumerate(grid)])
    return ndimage.map_coordinates(volume, coordinates, order=order, mode="nearest")


# --------------------------------------------------------------------------- architecture


def test_paper_preset_has_the_reference_parameter_count_and_layer_names():
    network = build_registration_network("paper", (128, 128, 128))
    assert network.count_params() == 84_921_011
    # Per-layer counts of the reference table (section 2.1) for the names released weights use.
    expected = {
        "unet_enc_conv_0_0": 1_760,
        "unet_enc_conv_5_0": 14_156_800,
        "unet_dec_conv_5_0": 28_312_576,
        "unet_dec_conv_4_0": 28_312_064,
        "unet_dec_conv_0_0": 110_624,
        "unet_dec_final_conv_0": 27_664,
        "unet_dec_final_conv_1": 6_928,
        "flow": 1_299,
    }
    for name, count in expected.items():
        assert network.get_layer(name).count_params() == count, name
    kernel, bias = network.get_layer("flow").get_weights()
    assert 0.5e-5 < kernel.std() < 2e-5 and not bias.any()
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in network.layers)


def test_voxelmorph_default_spec_has_the_reference_parameter_count():
    spec = UNetSpec.from_voxelmorph("vxm_default", [16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16])
    assert build_registration_network(spec, GRID).count_params() == 327_331


@pytest.mark.parametrize(("preset", "multiple"), [("paper", 64), ("compact", 32)])
def test_grid_not_divisible_is_a_user_error_that_names_working_sizes(preset, multiple):
    with pytest.raises(DaregError, match=f"multiple of {multiple}"):
        build_registration_network(preset, (multiple, multiple, multiple + 8))


def test_unknown_preset_and_bad_integration_steps_are_user_errors():
    with pytest.raises(DaregError, match="compact, paper"):
        build_registration_network("huge", GRID)
    with pytest.raises(DaregError, match="integration_steps"):
        build_registration_network("compact", GRID, integration_steps=-1)


@pytest.fixture(scope="module")
def compact_network() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_registration_network("compact", GRID)


def _pair(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    smooth = [ndimage.gaussian_filter(rng.random(GRID), 2.0) for _ in range(2)]
    return [s[None, ..., None].astype(np.float32) for s in smooth]


def test_untrained_network_predicts_near_identity_and_warps_moving_by_its_flow(compact_network):
    moving, fixed = _pair(1)
    output = compact_network.predict_on_batch([moving, fixed])
    flow, warped = output["flow"], output["warped"]
    assert flow.shape == (1, *GRID, 3) and warped.shape == (1, *GRID, 1)
    # The flow conv starts at N(0, 1e-5): an untrained model must not move anything visibly.
    assert np.abs(flow).max() < 0.05
    expected = _map_coordinates(moving[0, ..., 0], flow[0].astype(np.float64), order=1)
    np.testing.assert_allclose(warped[0, ..., 0], expected, atol=1e-5)


def test_diffeomorphic_mode_integrates_the_velocity_at_the_unet_resolution():
    keras.utils.set_random_seed(0)
    network = build_registration_network("compact", GRID, integration_steps=4)
    velocity_model = keras.Model(network.inputs, network.get_layer("flow").output)
    inputs = _pair(2)
    velocity = velocity_model.predict_on_batch(inputs) * 1e3  # a velocity of about a voxel
    network.get_layer("flow").set_weights([w * 1e3 for w in network.get_layer("flow").get_weights()])
    flow = network.predict_on_batch(inputs)["flow"]
    expected = upsample_flow(integrate_velocity(velocity, 4), 2)
    np.testing.assert_allclose(flow, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(flow).max() > 0.1


# --------------------------------------------------------------------------- spatial transformer


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_zero_flow_is_the_identity(interpolation):
    image = np.random.default_rng(3).random((2, *GRID, 2)).astype(np.float32)
    out = warp(image, np.zeros((2, *GRID, 3), np.float32), interpolation=interpolation)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_constant_unit_flow_shifts_content_back_one_voxel_with_border_replication(axis):
    image = np.random.default_rng(4).random((1, *GRID, 1)).astype(np.float32)
    flow = np.zeros((1, *GRID, 3), np.float32)
    flow[..., axis] = 1.0
    out = np.asarray(warp(image, flow))
    moved = np.moveaxis(out[0, ..., 0], axis, 0)
    source = np.moveaxis(image[0, ..., 0], axis, 0)
    np.testing.assert_allclose(moved[:-1], source[1:], atol=1e-6)  # out[i] = in[i + 1]
    np.testing.assert_allclose(moved[-1], source[-1], atol=1e-6)  # clamped: the last slice repeats


def test_linear_warp_matches_scipy_map_coordinates_with_nearest_mode():
    rng = np.random.default_rng(5)
    image = rng.random((2, *GRID, 2)).astype(np.float32)
    flow = _smooth_flow(rng, (2, *GRID), amplitude=4.0)  # reaches well outside the grid at the borders
    out = np.asarray(warp(image, flow))
    for b in range(2):
        for c in range(2):
            expected = _map_coordinates(image[b, ..., c].astype(np.float64), flow[b].astype(np.float64), 1)
            np.testing.assert_allclose(out[b, ..., c], expected, atol=1e-5)


def test_nearest_warp_preserves_label_values_and_matches_scipy():
    rng = np.random.default_rng(6)
    labels = rng.choice(np.array([0, 3, 7], np.float32), size=(1, *GRID, 1))
    flow = _smooth_flow(rng, (1, *GRID), amplitude=3.0)
    out = np.asarray(warp(labels, flow, interpolation="nearest"))
    assert set(np.unique(out)) <= {0.0, 3.0, 7.0}
    integer_out = np.asarray(warp(labels.astype(np.int32), flow, interpolation="nearest"))
    assert integer_out.dtype == np.int32
    np.testing.assert_array_equal(integer_out, out)
    expected = _map_coordinates(labels[0, ..., 0], flow[0].astype(np.float64), order=0)
    fractional = np.abs(np.modf(np.indices(GRID).transpose(1, 2, 3, 0) + flow[0])[0])
    away_from_ties = np.all(np.abs(fractional - 0.5) > 1e-3, axis=-1)
    np.testing.assert_array_equal(out[0, ..., 0][away_from_ties], expected[away_from_ties])


def test_linear_warp_gradients_are_finite_nonzero_and_match_finite_differences():
    rng = np.random.default_rng(7)
    shape = (8, 8, 8)
    image = tf.constant(ndimage.gaussian_filter(rng.random(shape), 1.0)[None, ..., None])
    target = tf.constant(rng.random((1, *shape, 1)))
    flow = tf.Variable(_smooth_flow(rng, (1, *shape), amplitude=0.7).astype(np.float64))

    def loss():
        return tf.reduce_mean((warp(image, flow) - target) ** 2)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(image)
        value = loss()
    grad_flow, grad_image = tape.gradient(value, flow), tape.gradient(value, image)
    for grad in (grad_flow, grad_image):
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    step = 1e-6
    for index in [(0, 3, 4, 2, 0), (0, 5, 1, 6, 1), (0, 2, 2, 3, 2)]:
        original = flow.numpy()
        bumped = original.copy()
        bumped[index] += step
        flow.assign(bumped)
        plus = float(loss())
        bumped[index] -= 2 * step
        flow.assign(bumped)
        minus = float(loss())
        flow.assign(original)
        numeric = (plus - minus) / (2 * step)
        np.testing.assert_allclose(grad_flow.numpy()[index], numeric, rtol=1e-4, atol=1e-10)


def test_flow_upsampling_matches_scipy_zoom_with_half_pixel_alignment():
    rng = np.random.default_rng(8)
    coarse = rng.normal(size=(1, 8, 6, 10, 3)).astype(np.float32)
    fine = np.asarray(upsample_flow(coarse, 2))
    assert fine.shape == (1, 16, 12, 20, 3)
    for c in range(3):
        channel = coarse[0, ..., c].astype(np.float64)
        expected = ndimage.zoom(channel, 2, order=1, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(fine[0, ..., c], 2.0 * expected, atol=1e-5)  # coarse voxel = 2 fine voxels


def test_layers_expose_their_settings_in_get_config():
    assert SpatialTransformer("nearest").get_config()["interpolation"] == "nearest"
    assert VelocityIntegration(5).get_config()["steps"] == 5
    assert FlowUpsample(2).get_config()["factor"] == 2


# --------------------------------------------------------------------------- scaling and squaring


def test_integrating_a_constant_velocity_gives_that_translation():
    velocity = np.broadcast_to(np.array([0.7, -1.2, 0.4], np.float32), (1, *GRID, 3))
    np.testing.assert_allclose(integrate_velocity(velocity, 5), velocity, atol=1e-5)


def test_integrating_a_rotation_velocity_gives_the_rotation_an_invertible_map():
    centre = (np.array(GRID) - 1) / 2.0
    points = np.stack(np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij"), axis=-1) - centre
    generator = np.zeros((3, 3))
    generator[1, 2], generator[2, 1] = -0.6, 0.6  # 0.6 rad about array axis 0
    velocity = (points @ generator.T)[None].astype(np.float32)
    forward = np.asarray(integrate_velocity(velocity, 8))
    backward = np.asarray(integrate_velocity(-velocity, 8))
    inside = np.hypot(points[..., 1], points[..., 2]) <= 10  # away from border clamping
    rotation = points @ expm(generator).T - points
    assert np.abs(forward[0] - rotation)[inside].max() < 0.02
    # exp(-v) inverts exp(v): composing the two maps gives back the identity.
    composed = backward + np.asarray(warp(forward, backward))
    assert np.abs(composed[0])[inside].max() < 0.03
    mapped = points + forward[0]
    jacobian = np.stack([np.stack(np.gradient(mapped[..., a]), axis=-1) for a in range(3)], axis=-2)
    assert np.linalg.det(jacobian).min() > 0.5


# --------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def saved_model(compact_network, tmp_path_factory) -> Path:
    config = ModelConfig(
        "compact",
        GRID,
        normalisation={"kind": "ct_window", "low": -200, "high": 300},
        design="untrained",
        training={"epochs": 0},
    )
    return save_model(compact_network, tmp_path_factory.mktemp("models") / "tiny", config)


def _copy_model(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _rewrite_config(folder: Path, config: dict) -> None:
    """Write a config.json and a matching manifest, so only the config check can reject it."""
    text = json.dumps(config)
    (folder / "config.json").write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.json"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_save_load_round_trip_gives_identical_outputs(compact_network, saved_model):
    names = sorted(p.name for p in saved_model.iterdir())
    assert names == ["config.json", "manifest.json", "model.weights.h5"]
    manifest = json.loads((saved_model / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((saved_model / name).read_bytes()).hexdigest() == digest
    loaded = load_model(saved_model)
    assert loaded.config.normalisation == {"kind": "ct_window", "low": -200, "high": 300}
    assert loaded.config.grid_shape == GRID and loaded.config.preset == "compact"
    inputs = _pair(9)
    expected = compact_network.predict_on_batch(inputs)
    actual = loaded.network.predict_on_batch(inputs)
    for key in ("flow", "warped"):
        np.testing.assert_array_equal(actual[key], expected[key])


def test_flipped_byte_in_weights_is_reported_as_corrupted(saved_model, tmp_path):
    folder = _copy_model(saved_model, tmp_path / "model")
    weights = bytearray((folder / "model.weights.h5").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (folder / "model.weights.h5").write_bytes(bytes(weights))
    with pytest.raises(DaregError, match="corrupted or has been tampered.*model.weights.h5"):
        load_model(folder)


@pytest.mark.parametrize("name", ["config.json", "model.weights.h5", "manifest.json"])
def test_missing_file_is_reported_as_corrupted(saved_model, tmp_path, name):
    folder = _copy_model(saved_model, tmp_path / "model")
    (folder / name).unlink()
    with pytest.raises(DaregError, match=f"corrupted.*{name} is missing"):
        load_model(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_name": "Lambda", "config": {"function": "os.system"}}, "unexpected entries"),
        ({"preset": "Lambda"}, "Unknown network preset 'Lambda'"),
        ({"format_version": 99}, "format_version 99"),
        ({"grid_shape": [32, 32, 40]}, "multiple of 32"),
        ({"normalisation": "lambda x: x"}, "'normalisation' must be"),
    ],
)
def test_config_that_is_not_known_data_is_rejected(saved_model, tmp_path, change, message):
    folder = _copy_model(saved_model, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    _rewrite_config(folder, {**config, **change})
    with pytest.raises(DaregError, match=message):
        load_model(folder)


def test_save_refuses_to_overwrite_and_a_failed_save_leaves_nothing(compact_network, saved_model, tmp_path):
    config = ModelConfig("compact", GRID)
    with pytest.raises(DaregError, match="already exists"):
        save_model(compact_network, saved_model, config)

    class Failing(keras.Model):
        def save_weights(self, *args, **kwargs):
            raise OSError("disk full")

    failing = Failing(compact_network.inputs, compact_network.outputs)
    with pytest.raises(OSError, match="disk full"):
        save_model(failing, tmp_path / "model", config)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_model_and_a_mismatched_config_is_refused(compact_network, tmp_path):
    folder = save_model(compact_network, tmp_path / "model", ModelConfig("compact", GRID, design="first"))
    save_model(compact_network, folder, ModelConfig("compact", GRID, design="second"), overwrite=True)
    assert load_model(folder).config.design == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    for wrong in (ModelConfig("compact", (64, 64, 64)), ModelConfig("compact", GRID, integration_steps=7)):
        with pytest.raises(DaregError, match="does not match its config"):
            save_model(compact_network, tmp_path / "other", wrong)


# --------------------------------------------------------------------------- registry and device


def _fake_model(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(ModelConfig("compact", GRID).to_json())
    return folder


def test_resolve_model_cases(tmp_path):
    root = tmp_path / "bundled"
    assert list_bundled_models(root) == {} and resolve_model(None, root) is None
    good, better = _fake_model(root, "good"), _fake_model(root, "better")
    (root / ".better.partial").mkdir()  # an interrupted save is not a model
    assert list_bundled_models(root) == {"better": better, "good": good}
    assert default_model_name(root) is None  # no ranking: no default
    (root / "index.json").write_text(json.dumps({"ranking": ["missing", "better", "good"]}))
    assert default_model_name(root) == "better"
    assert resolve_model(None, root) == better and resolve_model("default", root) == better
    assert resolve_model("none", root) is None
    assert resolve_model("good", root) == good
    own = _fake_model(tmp_path, "my_model")
    assert resolve_model(str(own), root) == own
    with pytest.raises(DaregError, match="Bundled models: better, good.*must be a model folder"):
        resolve_model("nonexistent", root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DaregError, match="not a dareg model folder"):
        resolve_model(str(tmp_path / "empty"), root)


def test_packaged_registry_is_consistent():
    bundled = list_bundled_models()
    name = default_model_name()
    assert name is None or name in bundled
    assert resolve_model(None) == (None if name is None else bundled[name])


def test_select_device_never_touches_the_environment():
    before = dict(os.environ)
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert select_device("cpu") == "/CPU:0"
    assert select_device("auto") == ("/GPU:0" if has_gpu else "/CPU:0")
    if has_gpu:
        assert select_device("gpu") == "/GPU:0"
    else:
        with pytest.raises(DaregError, match="no GPU"):
            select_device("gpu")
    with pytest.raises(DaregError, match="auto, cpu, gpu"):
        select_device("tpu")
    assert dict(os.environ) == before
