"""dareg.training.losses and dareg.training.uncertainty: values against independent numpy/scipy or
analytic computations, gradients that descend (or, for the original's hard Hausdorff, are exactly zero),
the DDMR quirks as named options, and the uncertainty-weighting layer's learning behaviour."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage, special

from dareg.training.losses import (
    SSIM3D,
    SSIM_EVALUATION_PATCH,
    SSIM_TRAINING_PATCH,
    BendingEnergy,
    GlobalNCC,
    GradientL2,
    HausdorffErosion,
    LocalNCC,
    SoftDice,
)
from dareg.training.uncertainty import UncertaintyWeighting


def smooth_volume(shape, seed, sigma=1.5, offset=0.0) -> np.ndarray:
    """(B, D, H, W, C) smooth random values in [offset, offset + 1]."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random(shape), (0, sigma, sigma, sigma, 0))
    volume = (volume - volume.min()) / np.ptp(volume)
    return (volume + offset).astype(np.float32)


def value_and_gradient(loss, y_true, y_pred):
    variable = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        value = loss(y_true, variable)
    return float(value), tape.gradient(value, variable)


def assert_descends(loss, y_true, y_pred, step=1e-2):
    """The gradient is finite and non-zero, and a small step along it lowers the loss."""
    before, gradient = value_and_gradient(loss, y_true, y_pred)
    gradient = gradient.numpy()
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() > 0
    after = float(loss(y_true, y_pred - step * gradient / np.abs(gradient).max()))
    assert after < before


# ------------------------------------------------------------------------------------------------ NCC


def test_global_ncc_is_one_minus_pearson():
    a = smooth_volume((2, 8, 8, 8, 1), seed=0, offset=0.3)
    b = 0.5 * a + smooth_volume((2, 8, 8, 8, 1), seed=1)
    pearson = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(2)]
    assert float(GlobalNCC()(a, b)) == pytest.approx(1.0 - np.mean(pearson), abs=1e-5)
    assert float(GlobalNCC()(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(GlobalNCC()(a, 3.0 * a + 2.0)) == pytest.approx(0.0, abs=1e-6)  # affine invariance


def test_ddmr_quirk_uses_uncentred_norms_and_stays_below_one_for_identical_images():
    a = smooth_volume((2, 8, 8, 8, 1), seed=2, offset=0.5)
    b = smooth_volume((2, 8, 8, 8, 1), seed=3, offset=0.2)
    expected = []
    for i in range(2):
        x, y = a[i].ravel().astype(np.float64), b[i].ravel().astype(np.float64)
        numerator = np.sum((x - x.mean()) * (y - y.mean()))
        expected.append(numerator / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-8))
    ddmr = GlobalNCC(quirk="ddmr")
    assert float(ddmr(a, b)) == pytest.approx(1.0 - np.mean(expected), abs=1e-5)
    x = a[0].ravel().astype(np.float64)
    ncc_self = np.sum((x - x.mean()) ** 2) / np.sum(x**2)  # NCC_ddmr(a, a) = variance / mean square
    assert ncc_self < 0.9
    assert float(ddmr(a[:1], a[:1])) == pytest.approx(1.0 - ncc_self, abs=1e-5)


@pytest.mark.parametrize("quirk", [None, "ddmr"])
def test_global_ncc_gradient_descends(quirk):
    a = smooth_volume((1, 8, 8, 8, 1), seed=4)
    b = smooth_volume((1, 8, 8, 8, 1), seed=5)
    assert_descends(GlobalNCC(quirk=quirk), a, b)


def test_global_ncc_of_a_constant_image_has_a_finite_gradient():
    a = smooth_volume((1, 6, 6, 6, 1), seed=6)
    value, gradient = value_and_gradient(GlobalNCC(), a, np.full_like(a, 0.5))
    assert value == pytest.approx(1.0) and np.all(np.isfinite(gradient.numpy()))


def numpy_local_ncc(a: np.ndarray, b: np.ndarray, window: int) -> float:
    """Independent reference per sample: scipy box filters with zero padding (as 'SAME' convolutions)."""

    def mean(x):
        return ndimage.uniform_filter(x.astype(np.float64), window, mode="constant")

    scores = []
    for x, y in zip(a[..., 0], b[..., 0], strict=True):
        covariance = mean(x * y) - mean(x) * mean(y)
        variance_x, variance_y = mean(x * x) - mean(x) ** 2, mean(y * y) - mean(y) ** 2
        scores.append(np.mean(covariance**2 / (variance_x * variance_y + 1e-5)))
    return float(np.mean(scores))


def test_local_ncc_matches_reference_and_descends():
    a = smooth_volume((2, 12, 12, 12, 1), seed=7, sigma=1.0)
    b = 0.7 * a + 0.3 * smooth_volume((2, 12, 12, 12, 1), seed=8, sigma=1.0)
    loss = LocalNCC(window=5)
    assert float(loss(a, b)) == pytest.approx(1.0 - numpy_local_ncc(a, b, 5), abs=1e-4)
    assert LocalNCC().window == 9
    assert_descends(loss, a, b)


# ----------------------------------------------------------------------------------------------- SSIM


def numpy_ssim(a: np.ndarray, b: np.ndarray, p: int) -> float:
    """Mean SSIM over non-overlapping p^3 patches, recomputed patch by patch."""
    scores = []
    for x, y in zip(a[..., 0].astype(np.float64), b[..., 0].astype(np.float64), strict=True):
        shape = [n // p for n in x.shape]
        for i, j, k in np.ndindex(*shape):
            block = (slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p), slice(k * p, (k + 1) * p))
            u, v = x[block].ravel(), y[block].ravel()
            covariance = np.mean((u - u.mean()) * (v - v.mean()))
            luminance = (2 * u.mean() * v.mean() + 1e-4) / (u.mean() ** 2 + v.mean() ** 2 + 1e-4)
            structure = (2 * covariance + 9e-4) / (u.var() + v.var() + 9e-4)
            scores.append(luminance * structure)
    return float(np.mean(scores))


@pytest.mark.parametrize("patch", [SSIM_TRAINING_PATCH, SSIM_EVALUATION_PATCH])
def test_ssim_matches_patch_formula(patch):
    assert (SSIM_TRAINING_PATCH, SSIM_EVALUATION_PATCH) == (5, 2)
    a = smooth_volume((2, 11, 10, 12, 1), seed=9, sigma=1.0)  # 11 and 12: trailing voxels dropped
    b = np.clip(a + 0.2 * smooth_volume((2, 11, 10, 12, 1), seed=10, sigma=0.7) - 0.1, 0, 1)
    loss = SSIM3D(patch_size=patch)
    assert float(loss(a, b)) == pytest.approx((1.0 - numpy_ssim(a, b, patch)) / 2.0, abs=1e-5)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert_descends(loss, a, b)


# ----------------------------------------------------------------------------------------------- Dice


def hand_labels() -> tuple[np.ndarray, np.ndarray]:
    """Channels (background, A, B) on 16 voxels: A has 4 voxels, 2 of them predicted plus 2 wrong ones;
    B has 2 voxels, predicted exactly."""
    y_true = np.zeros((1, 1, 1, 16, 3), np.float32)
    y_pred = np.zeros_like(y_true)
    y_true[..., 0:4, 1] = 1
    y_pred[..., 2:6, 1] = 1
    y_true[..., 8:10, 2] = y_pred[..., 8:10, 2] = 1
    y_true[..., 0] = 1 - y_true[..., 1:].sum(-1)
    y_pred[..., 0] = 1 - y_pred[..., 1:].sum(-1)
    return y_true, y_pred


def test_generalised_dice_by_hand():
    y_true, y_pred = hand_labels()
    # w_A = 1/4^2, w_B = 1/2^2; GD = 2 (2/16 + 2/4) / (8/16 + 4/4) = 1.25 / 1.5
    assert float(SoftDice()(y_true, y_pred)) == pytest.approx(1.0 - 1.25 / 1.5, abs=1e-6)
    assert float(SoftDice()(y_true, y_true)) == pytest.approx(0.0, abs=1e-7)


def test_macro_dice_by_hand():
    y_true, y_pred = hand_labels()
    # Dice_A = 2*2 / 8, Dice_B = 1 (plus 1e-3 smoothing)
    assert float(SoftDice(variant="macro")(y_true, y_pred)) == pytest.approx(1.0 - 0.75, abs=1e-4)


def test_dice_ignores_absent_labels_and_background_by_default():
    y_true, y_pred = hand_labels()
    reference = float(SoftDice()(y_true, y_pred))
    absent_true = np.concatenate([y_true, np.zeros_like(y_true[..., :1])], axis=-1)
    absent_pred = np.concatenate([y_pred, np.full_like(y_pred[..., :1], 0.3)], axis=-1)
    assert float(SoftDice()(absent_true, absent_pred)) == pytest.approx(reference, abs=1e-7)
    other_background = y_pred.copy()
    other_background[..., 0] = 0.5
    assert float(SoftDice()(y_true, other_background)) == pytest.approx(reference, abs=1e-7)
    with_background = SoftDice(include_background=True)
    assert float(with_background(y_true, other_background)) != pytest.approx(
        float(with_background(y_true, y_pred)), abs=1e-4
    )


@pytest.mark.parametrize("variant", ["generalised", "macro"])
def test_dice_gradient_descends(variant):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, (1, 6, 6, 6))
    y_true = np.eye(3, dtype=np.float32)[labels]
    y_pred = ndimage.gaussian_filter(y_true, (0, 1, 1, 1, 0)).astype(np.float32)
    assert_descends(SoftDice(variant=variant), y_true, y_pred)


def test_dice_refuses_a_background_only_tensor():
    labels = np.ones((1, 4, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="include_background=True"):
        SoftDice()(labels, labels)
    assert float(SoftDice(include_background=True)(labels, labels)) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------ Hausdorff


def numpy_hausdorff_erosion(y_true, y_pred, threshold, iterations=10, alpha=2.0, sharpness=4.0) -> float:
    """Independent reference over every sample and channel given: scipy convolution with the
    normalised 7-voxel cross, zero padding."""
    kernel = ndimage.generate_binary_structure(3, 1).astype(np.float64) / 7.0
    values = []
    for b, channel in np.ndindex(y_true.shape[0], y_true.shape[-1]):
        eroded = (y_pred[b, ..., channel].astype(np.float64) - y_true[b, ..., channel]) ** 2
        total = 0.0
        for k in range(1, iterations + 1):
            convolved = ndimage.convolve(eroded, kernel, mode="constant")
            if threshold == "hard":
                eroded = (convolved > 0.5).astype(np.float64)
            else:
                with np.errstate(divide="ignore"):  # logit(0) = -inf, expit(-inf) = 0
                    eroded = special.expit(sharpness * special.logit(np.clip(convolved, 0, 1)))
            total += k**alpha * eroded.sum()
        values.append(total / eroded.size)
    return float(np.mean(values))


def cube_labels(shift: int, size=16) -> tuple[np.ndarray, np.ndarray]:
    """(background, cube) one-hot, the predicted cube shifted along x by ``shift`` voxels."""
    foreground = np.zeros((1, size, size, size), np.float32)
    foreground[0, 4:12, 4:12, 4:12] = 1
    moved = np.roll(foreground, shift, axis=3)
    return (np.stack([1 - foreground, foreground], -1), np.stack([1 - moved, moved], -1))


@pytest.mark.parametrize("threshold", ["soft", "hard"])
def test_hausdorff_matches_reference_is_zero_for_identical_labels_and_ranks_shifts(threshold):
    loss = HausdorffErosion(threshold=threshold)
    pairs = [cube_labels(3), cube_labels(5)]
    y_true, y_pred = (np.concatenate(arrays) for arrays in zip(*pairs, strict=True))  # batch of 2
    y_pred[1, ..., 0] = 0.5  # a background disagreement that only include_background sees
    assert float(loss(y_true, y_pred)) == pytest.approx(
        numpy_hausdorff_erosion(y_true[..., 1:], y_pred[..., 1:], threshold), rel=1e-4
    )
    with_background = HausdorffErosion(threshold=threshold, include_background=True)
    assert float(with_background(y_true, y_pred)) == pytest.approx(
        numpy_hausdorff_erosion(y_true, y_pred, threshold), rel=1e-4
    )
    assert float(loss(y_true, y_true)) == 0.0
    values = [float(loss(*cube_labels(shift))) for shift in (1, 3, 5)]
    assert 0 < values[0] < values[1] < values[2]


def test_soft_threshold_tends_to_the_hard_one():
    y_true, y_pred = cube_labels(4)
    hard = float(HausdorffErosion(threshold="hard")(y_true, y_pred))
    assert float(HausdorffErosion(sharpness=300.0)(y_true, y_pred)) == pytest.approx(hard, rel=1e-3)


def test_soft_hausdorff_descends_and_hard_quirk_has_zero_gradient():
    y_true, y_pred = cube_labels(3)
    y_pred = ndimage.gaussian_filter(y_pred, (0, 1, 1, 1, 0)).astype(np.float32)
    assert_descends(HausdorffErosion(), y_true, y_pred)
    value, gradient = value_and_gradient(HausdorffErosion(threshold="hard"), y_true, y_pred)
    assert value > 0 and gradient is not None
    assert np.count_nonzero(gradient.numpy()) == 0


# -------------------------------------------------------------------------------------- regularisers


def field(functions, size=6) -> np.ndarray:
    """(1, size^3, 3) flow whose channel c is functions[c](z, y, x) in voxels."""
    z, y, x = np.meshgrid(*[np.arange(size, dtype=np.float64)] * 3, indexing="ij")
    return np.stack([f(z, y, x) for f in functions], -1)[None].astype(np.float32)


def test_gradient_l2_of_linear_fields():
    g, h = 0.3, -0.2
    flow = field([lambda z, y, x: g * z, lambda z, y, x: 0 * z, lambda z, y, x: h * y])
    # VoxelMorph Grad('l2'): (1/3) sum_axes mean_{voxels, channels}; one non-zero channel per term
    assert float(GradientL2()(None, flow)) == pytest.approx((g**2 + h**2) / 9, rel=1e-5)
    spacing = (2.0, 0.5, 1.5)
    # in mm: d(u_z)/dz = g (spacing cancels); d(u_x)/dy = h * s_x / s_y
    expected = (g**2 + (h * spacing[2] / spacing[1]) ** 2) / 9
    assert float(GradientL2(spacing=spacing)(None, flow)) == pytest.approx(expected, rel=1e-5)
    translation = field([lambda z, y, x: 0 * z + 1.5] * 3)
    assert float(GradientL2()(None, translation)) == 0.0


def test_bending_energy_of_a_quadratic_field():
    a, b, c = 0.05, -0.1, 0.02
    flow = field([lambda z, y, x: a * z**2, lambda z, y, x: b * z * y, lambda z, y, x: c * x**2])
    # u_z'' = 2a, d2(u_y)/dz dy = b (counted twice), u_x'' = 2c; averaged over the 3 components
    expected = (4 * a**2 + 2 * b**2 + 4 * c**2) / 3
    assert float(BendingEnergy()(None, flow)) == pytest.approx(expected, rel=1e-4)
    s = (2.0, 0.5, 1.5)
    expected_mm = (4 * a**2 / s[0] ** 2 + 2 * b**2 / s[0] ** 2 + 4 * c**2 / s[2] ** 2) / 3
    assert float(BendingEnergy(spacing=s)(None, flow)) == pytest.approx(expected_mm, rel=1e-4)
    affine = field(
        [lambda z, y, x: 0.1 * z + 0.2 * x + 1, lambda z, y, x: -0.3 * y, lambda z, y, x: 0.05 * z]
    )
    assert float(BendingEnergy()(None, affine)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("loss", [GradientL2(), BendingEnergy(spacing=(1.0, 2.0, 3.0))])
def test_regulariser_gradient_descends(loss):
    flow = np.random.default_rng(12).normal(size=(1, 6, 6, 6, 3)).astype(np.float32)
    assert_descends(loss, None, flow)


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: GlobalNCC(quirk="pearson"), "'pearson'"),
        (lambda: LocalNCC(window=4), "4"),
        (lambda: SSIM3D(patch_size=0), "0"),
        (lambda: SoftDice(variant="micro"), "'micro'"),
        (lambda: HausdorffErosion(threshold="step"), "'step'"),
        (lambda: GradientL2(spacing=(1.0, -1.0, 1.0)), "-1.0"),
        (lambda: UncertaintyWeighting(["ncc"], form="gaussian"), "'gaussian'"),
        (lambda: UncertaintyWeighting(["ncc"], regularizer="decaying"), "'decaying'"),
    ],
)
def test_unknown_options_name_the_bad_value(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


def test_option_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match="'soft', 'hard'"):
        HausdorffErosion(threshold="step")


# --------------------------------------------------------------------------------- uncertainty layer


def combine(layer, losses, regularization) -> float:
    """Call the layer as a training step would: with tensors (Keras refuses Python floats)."""
    return layer([tf.constant(value) for value in losses], tf.constant(regularization))


def train(layer, losses, regularization=1.0, steps=20, learning_rate=0.05) -> list[dict]:
    """Adam steps on the layer's own weights for constant loss values; the weights after each step."""
    optimizer = keras.optimizers.Adam(learning_rate)
    history = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            total = combine(layer, losses, regularization)
        variables = layer.trainable_weights
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        history.append({k: float(v) for k, v in layer.current_weights().items()})
    return history


@pytest.mark.parametrize("form", ["softmax", "kendall"])
def test_initial_weights_are_equal_and_the_regulariser_starts_at_5e_3(form):
    layer = UncertaintyWeighting(["ncc", "ssim", "dice"], form=form)
    weights = {k: float(v) for k, v in layer.current_weights().items()}
    assert weights["weight_ncc"] == weights["weight_ssim"] == pytest.approx(1 / 3, rel=1e-6)
    assert weights["weight_dice"] == pytest.approx(1 / 3, rel=1e-6)
    assert weights["weight_regularizer"] == pytest.approx(5e-3, rel=1e-6)
    if form == "softmax":
        assert float(combine(layer, [0.3, 0.6, 0.9], 2.0)) == pytest.approx(0.6 + 5e-3 * 2.0, rel=1e-6)


def test_softmax_weights_sum_to_one_and_move_away_from_the_larger_term():
    layer = UncertaintyWeighting(["ncc", "ssim", "dice"])
    history = train(layer, [2.0, 0.5, 1.0])
    final = history[-1]
    assert final["weight_ncc"] + final["weight_ssim"] + final["weight_dice"] == pytest.approx(1.0, abs=1e-6)
    assert final["weight_ncc"] < 1 / 3 < final["weight_ssim"]
    assert final["weight_regularizer"] == pytest.approx(5e-3, rel=1e-6)  # "fixed": not trainable
    assert len(layer.trainable_weights) == 1


def test_learned_regulariser_reproduces_the_original_decay():
    layer = UncertaintyWeighting(["ncc", "dice"], regularizer="learned")
    history = train(layer, [1.0, 1.0], regularization=0.5, steps=10)
    decay = [h["weight_regularizer"] for h in history]
    assert all(later < earlier for earlier, later in zip([5e-3, *decay], decay, strict=False))


def test_kendall_value_and_equilibrium():
    layer = UncertaintyWeighting(["ncc", "dice"], form="kendall")
    layer.log_weights.assign([0.5, -0.2])
    expected = math.exp(-0.5) * 2.0 + 0.5 + math.exp(0.2) * 3.0 - 0.2 + 5e-3 * 4.0
    assert float(combine(layer, [2.0, 3.0], 4.0)) == pytest.approx(expected, rel=1e-6)
    layer = UncertaintyWeighting(["ncc", "dice"], form="kendall")
    final = train(layer, [2.0, 0.25], steps=200, learning_rate=0.05)[-1]
    assert final["weight_ncc"] == pytest.approx(1 / 2.0, rel=0.1)  # settles at 1 / L_i
    assert final["weight_dice"] == pytest.approx(1 / 0.25, rel=0.1)


def test_get_config_round_trip():
    layer = UncertaintyWeighting(
        ["ncc", "ssim"], form="kendall", regularizer="learned", regularizer_weight=1e-3, name="uw"
    )
    clone = UncertaintyWeighting.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.term_names == ("ncc", "ssim") and clone.name == "uw"
    assert float(combine(clone, [0.2, 0.4], 1.0)) == pytest.approx(
        float(combine(layer, [0.2, 0.4], 1.0)), rel=1e-6
    )


def test_wrong_number_of_losses_is_refused():
    with pytest.raises(ValueError, match="expected 2 data losses"):
        combine(UncertaintyWeighting(["ncc", "dice"]), [0.1], 0.0)
