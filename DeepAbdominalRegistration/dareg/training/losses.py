"""Training losses: image similarity, label overlap, boundary distance and flow regularisers.

Conventions: tensors are channels-last ``(B, D, H, W, C)`` on the model grid, array order (z, y, x);
flows are in voxels, channel c along array axis c (see :mod:`dareg.models.transformer`). Label tensors
are one-hot (or soft, e.g. trilinearly warped) with channel 0 = background, as the DDMR training data.

Every loss is a small frozen dataclass holding its hyper-parameters, validated on construction
(``ValueError`` naming the bad value and the valid ones), called as ``loss(y_true, y_pred)`` and
returning a scalar: the mean over the batch; lower is better. Regularisers ignore ``y_true`` (the Keras
convention for a loss on the flow output).

Classes (what they compute; how they relate to the DDMR original, reference section 3):

- ``GlobalNCC``         1 - Pearson r over the whole volume; ``quirk="ddmr"``: the original's
                        uncentred-norm denominator.
- ``LocalNCC``          1 - windowed squared NCC (VoxelMorph); not used by DDMR.
- ``SSIM3D``            (1 - SSIM) / 2 on non-overlapping patches, as the original; patch 5 for
                        training, 2 for evaluation.
- ``SoftDice``          1 - generalised Dice (Sudre 2017) or the macro mean of per-label Dice, as the
                        original, but background excluded by default.
- ``HausdorffErosion``  Karimi 2020 erosion Hausdorff loss with a soft threshold;
                        ``threshold="hard"``: the original's, with zero gradient.
- ``GradientL2``        diffusion, mean squared first differences: VoxelMorph ``Grad('l2')`` with
                        ``spacing=None``, as the original.
- ``BendingEnergy``     squared second derivatives incl. mixed terms; not used by DDMR.

The functions :func:`local_ncc`, :func:`soft_dice` and :func:`gradient_penalty` are shared with the
instance optimisation in :mod:`dareg.optimize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

SSIM_C1 = 1e-4  # (K1 * L)^2 with K1 = 0.01 and dynamic range L = 1 (images min-max scaled to [0, 1])
SSIM_C2 = 9e-4  # (K2 * L)^2 with K2 = 0.03
SSIM_TRAINING_PATCH = 5
SSIM_EVALUATION_PATCH = 2
_GD_EPSILON = 1e-10  # the original's; the Dice sums are weighted by 1/size^2, so they are ~1/size
_NORM_FLOOR = 1e-30  # keeps sqrt differentiable for a constant image (r = 0, zero gradient, no NaN)
_SPATIAL_AXES = (1, 2, 3)


def check_option(name: str, value, valid: Sequence) -> None:
    """Raise ``ValueError`` naming ``value`` and the ``valid`` choices unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")


def _check_positive_int(name: str, value, *, odd: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (odd and value % 2 == 0):
        kind = "a positive odd integer" if odd else "a positive integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_spacing(spacing) -> None:
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be None or three positive mm values (z, y, x), got {spacing!r}")


def _as_float(y_true, y_pred) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)


def _labels(labels: tf.Tensor, include_background: bool) -> tf.Tensor:
    """Drop channel 0 (background) unless asked to keep it."""
    if include_background:
        return labels
    if labels.shape[-1] == 1:
        raise ValueError(
            "label tensors have a single channel, taken as the background (channel 0) and excluded: "
            "add the background channel or pass include_background=True"
        )
    return labels[..., 1:]


def _spacing_or_unit(spacing) -> np.ndarray:
    return np.ones(3, np.float32) if spacing is None else np.asarray(spacing, np.float32)


# ----------------------------------------------------------------------------------------- similarity


def global_ncc(a: tf.Tensor, b: tf.Tensor, *, centred_norms: bool = True, eps: float = 1e-8) -> tf.Tensor:
    """Normalised cross-correlation over each whole sample, shape (B,).

    ``r = sum (a - mean a)(b - mean b) / (|a'| |b'| + eps)`` with ``a' = a - mean a`` (Pearson) or, with
    ``centred_norms=False``, ``a' = a`` (the DDMR original's denominator: r < 1 even for a == b
    whenever the means are not zero).
    """
    batch = tf.shape(a)[0]
    a, b = tf.reshape(a, (batch, -1)), tf.reshape(b, (batch, -1))
    a_centred = a - tf.reduce_mean(a, axis=1, keepdims=True)
    b_centred = b - tf.reduce_mean(b, axis=1, keepdims=True)
    numerator = tf.reduce_sum(a_centred * b_centred, axis=1)
    a_norm, b_norm = (a_centred, b_centred) if centred_norms else (a, b)
    squared_norms = tf.reduce_sum(a_norm**2, axis=1) * tf.reduce_sum(b_norm**2, axis=1)
    return numerator / (tf.sqrt(tf.maximum(squared_norms, _NORM_FLOOR)) + eps)


def _box_mean(x: tf.Tensor, window: int) -> tf.Tensor:
    """Windowed mean of a (B, z, y, x, 1) tensor as three 1-D convolutions (zero padding).

    Why not ``avg_pool3d``: its stride-1 gradient is ~40x slower on CPU than a separable convolution's.
    """
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[axis] = window
        x = tf.nn.conv3d(x, tf.fill(shape, 1.0 / window), strides=[1] * 5, padding="SAME")
    return x


def local_ncc(a: tf.Tensor, b: tf.Tensor, window: int) -> tf.Tensor:
    """Mean local (windowed) NCC of (B, z, y, x, 1) images, squared as in VoxelMorph; 1 = identical.

    Squared: an anti-correlated window scores as well as a correlated one (VoxelMorph's choice; in
    registration of the same modality anti-correlation does not arise).
    """

    def mean(x):
        return _box_mean(x, window)

    mean_a, mean_b = mean(a), mean(b)
    covariance = mean(a * b) - mean_a * mean_b
    variance_a = mean(a * a) - mean_a**2
    variance_b = mean(b * b) - mean_b**2
    return tf.reduce_mean(covariance**2 / (variance_a * variance_b + 1e-5))


@dataclass(frozen=True)
class GlobalNCC:
    """``1 - r`` with r the normalised cross-correlation over the whole volume, mean over the batch.

    Parameters
    ----------
    quirk : None (default): r is Pearson's correlation (centred numerator and centred norms), so
        identical images give loss 0. "ddmr": the original's denominator with UNcentred norms
        (reference 3.1); its loss stays above 0 even for identical images with non-zero mean.
    eps : added to the denominator (the original's 1e-8).
    """

    quirk: str | None = None
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_option("quirk", self.quirk, (None, "ddmr"))

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        y_true, y_pred = _as_float(y_true, y_pred)
        ncc = global_ncc(y_true, y_pred, centred_norms=self.quirk is None, eps=self.eps)
        return 1.0 - tf.reduce_mean(ncc)


@dataclass(frozen=True)
class LocalNCC:
    """``1 - mean squared local NCC`` over ``window``^3 neighbourhoods (VoxelMorph-style).

    Parameters
    ----------
    window : odd window size in voxels (VoxelMorph's 9). Images (B, D, H, W, 1).
    """

    window: int = 9

    def __post_init__(self) -> None:
        _check_positive_int("window", self.window, odd=True)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        y_true, y_pred = _as_float(y_true, y_pred)
        return 1.0 - local_ncc(y_true, y_pred, self.window)


def ssim_patches(a: tf.Tensor, b: tf.Tensor, patch_size: int) -> tf.Tensor:
    """SSIM of each non-overlapping ``patch_size``^3 patch, shape (B, D//p, H//p, W//p, C).

    Per patch with biased (1/N) moments: ``(2 mu_a mu_b + C1)(2 s_ab + C2) /
    ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``; trailing voxels that do not fill a patch are dropped.
    Average pooling with kernel = stride = p computes the moments and is differentiable.
    """

    def mean(x):
        return tf.nn.avg_pool3d(x, ksize=patch_size, strides=patch_size, padding="VALID")

    mean_a, mean_b = mean(a), mean(b)
    variance_a = mean(a * a) - mean_a**2
    variance_b = mean(b * b) - mean_b**2
    covariance = mean(a * b) - mean_a * mean_b
    luminance = (2.0 * mean_a * mean_b + SSIM_C1) / (mean_a**2 + mean_b**2 + SSIM_C1)
    structure = (2.0 * covariance + SSIM_C2) / (variance_a + variance_b + SSIM_C2)
    return luminance * structure


@dataclass(frozen=True)
class SSIM3D:
    """``(1 - SSIM) / 2`` averaged over non-overlapping cubic patches and the batch (reference 3.2).

    Parameters
    ----------
    patch_size : patch edge in voxels: ``SSIM_TRAINING_PATCH`` (5) as the DDMR training loss,
        ``SSIM_EVALUATION_PATCH`` (2) as its evaluation metric. Intensities are expected in [0, 1]
        (C1, C2 assume dynamic range 1).
    """

    patch_size: int = SSIM_TRAINING_PATCH

    def __post_init__(self) -> None:
        _check_positive_int("patch_size", self.patch_size)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        y_true, y_pred = _as_float(y_true, y_pred)
        return (1.0 - tf.reduce_mean(ssim_patches(y_true, y_pred, self.patch_size))) / 2.0


# ------------------------------------------------------------------------------------ label overlap


def soft_dice_per_label(y_true: tf.Tensor, y_pred: tf.Tensor, smooth: float = 1e-3) -> tf.Tensor:
    """Soft Dice of each sample and label channel, shape (B, L); ``smooth`` voxels on both sides.

    ``smooth`` keeps a label absent from both inputs at Dice 1 and the gradient finite; it is
    negligible against label volumes of hundreds of voxels.
    """
    overlap = tf.reduce_sum(y_true * y_pred, axis=_SPATIAL_AXES)
    total = tf.reduce_sum(y_true, axis=_SPATIAL_AXES) + tf.reduce_sum(y_pred, axis=_SPATIAL_AXES)
    return (2.0 * overlap + smooth) / (total + smooth)


def soft_dice(fixed_labels: tf.Tensor, warped_labels: tf.Tensor, smooth: float = 1e-3) -> tf.Tensor:
    """Mean soft Dice over samples and label channels (B, z, y, x, L); every channel counts."""
    fixed_labels, warped_labels = _as_float(fixed_labels, warped_labels)
    return tf.reduce_mean(soft_dice_per_label(fixed_labels, warped_labels, smooth))


def generalised_dice(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Generalised Dice (Sudre et al. 2017) of each sample, shape (B,).

    ``GD = (2 sum_l w_l sum y_l p_l + e) / (sum_l w_l sum (y_l + p_l) + e)`` with ``w_l = 1 / (sum y_l)^2``
    and ``w_l = 0`` for a label absent from ``y_true`` (it neither helps nor hurts); e = 1e-10.
    The 1/size^2 weights give small structures (vessels) as much say as large ones (parenchyma).
    """
    sizes = tf.reduce_sum(y_true, axis=_SPATIAL_AXES)  # B x L
    present = sizes > 0
    weights = tf.where(present, 1.0 / tf.square(tf.where(present, sizes, 1.0)), 0.0)
    overlap = tf.reduce_sum(y_true * y_pred, axis=_SPATIAL_AXES)
    total = sizes + tf.reduce_sum(y_pred, axis=_SPATIAL_AXES)
    numerator = 2.0 * tf.reduce_sum(weights * overlap, axis=1) + _GD_EPSILON
    return numerator / (tf.reduce_sum(weights * total, axis=1) + _GD_EPSILON)


@dataclass(frozen=True)
class SoftDice:
    """``1 - Dice`` of one-hot fixed labels and (soft) warped moving labels, mean over the batch.

    Parameters
    ----------
    variant : "generalised" (default; the DDMR segmentation loss, reference 3.4) or "macro" (the
        mean of per-label soft Dice with 1e-3 smoothing, the original's ``dice_macro``).
    include_background : False (default) drops channel 0. The original kept it; with the
        generalised weights 1/size^2 the background's say is ~0 anyway, but in the macro variant
        it would add an easy, near-1 term.
    """

    variant: str = "generalised"
    include_background: bool = False

    def __post_init__(self) -> None:
        check_option("variant", self.variant, ("generalised", "macro"))

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        y_true, y_pred = _as_float(y_true, y_pred)
        y_true, y_pred = _labels(y_true, self.include_background), _labels(y_pred, self.include_background)
        if self.variant == "macro":
            return 1.0 - soft_dice(y_true, y_pred)
        return 1.0 - tf.reduce_mean(generalised_dice(y_true, y_pred))


# --------------------------------------------------------------------------------- boundary distance


def _channels_to_batch(x: tf.Tensor) -> tf.Tensor:
    """(B, D, H, W, L) -> (B*L, D, H, W, 1), so one single-channel convolution serves every label."""
    shape = tf.shape(x)
    return tf.reshape(tf.transpose(x, (0, 4, 1, 2, 3)), (-1, shape[1], shape[2], shape[3], 1))


def _erosion_kernel() -> tf.Tensor:
    """6-connected cross including the centre (7 ones), normalised to sum 1; shape (3, 3, 3, 1, 1)."""
    kernel = np.zeros((3, 3, 3), np.float32)
    kernel[1, 1, :] = kernel[1, :, 1] = kernel[:, 1, 1] = 1.0
    return tf.constant((kernel / kernel.sum())[..., None, None])


@dataclass(frozen=True)
class HausdorffErosion:
    """Erosion-based Hausdorff-distance loss (Karimi and Salcudean, IEEE TMI 2020; reference 3.5).

    Algorithm (per sample and label channel):
    1. ``E_0 = (p - y)^2``, the disagreement map.
    2. For k = 1..iterations: ``E_k = threshold(E_{k-1} * B)`` with B the normalised 7-voxel cross.
    3. Loss = ``sum_k k^alpha sum_voxels E_k / voxels``; mean over batch and channels.
    A disagreement region that survives k erosions is at least ~k voxels thick, so the k^alpha weight
    penalises the largest boundary errors most (the Hausdorff distance's concern).

    Parameters
    ----------
    iterations : number of erosions (the original's 10).
    alpha : exponent of the erosion-depth weight (the original's 2).
    threshold : "soft" (default): ``sigmoid(k logit x) = x^k / (x^k + (1 - x)^k)``, k = ``sharpness``,
        a smooth step at 0.5 with slope k there: differentiable, 0 at 0 (identical labels give exactly
        0; the logit form is 4x cheaper than the powers) and 1 at 1, tending to the hard step as k
        grows. "hard":
        the original's ``sign(max(|x| - 0.5, 0))``, whose gradient is zero everywhere: the term then
        moves only the uncertainty weights, never the flow.
    sharpness : k >= 2 of the soft threshold (k = 1 would be no threshold at all).
    include_background : as in :class:`SoftDice` (the original kept channel 0).
    """

    iterations: int = 10
    alpha: float = 2.0
    threshold: str = "soft"
    sharpness: float = 4.0
    include_background: bool = False

    def __post_init__(self) -> None:
        check_option("threshold", self.threshold, ("soft", "hard"))
        _check_positive_int("iterations", self.iterations)
        if not self.sharpness >= 2.0:
            raise ValueError(f"sharpness must be at least 2, got {self.sharpness!r}")

    def _threshold(self, x: tf.Tensor) -> tf.Tensor:
        if self.threshold == "hard":
            return tf.sign(tf.maximum(tf.abs(x) - 0.5, 0.0))
        # Clipped so the logs are finite; at the floor k * log(1e-30) < -138 and the sigmoid is exactly 0.
        x = tf.clip_by_value(x, 1e-30, 1.0 - 1e-7)
        return tf.sigmoid(self.sharpness * (tf.math.log(x) - tf.math.log1p(-x)))

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        y_true, y_pred = _as_float(y_true, y_pred)
        y_true, y_pred = _labels(y_true, self.include_background), _labels(y_pred, self.include_background)
        eroded = _channels_to_batch(tf.square(y_pred - y_true))  # (B*L) x D x H x W x 1
        kernel = _erosion_kernel()
        total = 0.0
        for k in range(1, self.iterations + 1):
            eroded = self._threshold(tf.nn.conv3d(eroded, kernel, strides=[1] * 5, padding="SAME"))
            total += k**self.alpha * tf.reduce_sum(eroded, axis=(1, 2, 3, 4))
        voxels = tf.cast(tf.reduce_prod(tf.shape(eroded)[1:4]), tf.float32)
        return tf.reduce_mean(total) / voxels


# -------------------------------------------------------------------------------------- regularisers


def _difference(x: tf.Tensor, axis: int) -> tf.Tensor:
    """Forward difference ``x[i + 1] - x[i]`` along spatial ``axis`` (0..2) of a (B, D, H, W, C) tensor.

    A 'VALID' convolution with a per-channel (-1, 1) kernel rather than two slices: the slices'
    gradient (StridedSliceGrad) is ~10x slower on CPU (measured 0.9 s vs 0.08 s at 128^3 x 3).
    """
    channels = x.shape[-1]
    shape = [1, 1, 1, channels, channels]
    shape[axis] = 2
    taps = np.stack([-np.eye(channels), np.eye(channels)]).astype(np.float32)  # 2 x C x C
    return tf.nn.conv3d(x, tf.constant(taps.reshape(shape)), strides=[1] * 5, padding="VALID")


def gradient_penalty(flow: tf.Tensor, spacing_zyx) -> tf.Tensor:
    """Sum over the 3 axes of the mean squared displacement gradient, in mm per mm.

    Parameters
    ----------
    flow : (B, z, y, x, 3) displacement in voxels, channel c along array axis c.
    spacing_zyx : voxel size in mm, array order; (1, 1, 1) gives voxel units.
    """
    spacing = np.asarray(spacing_zyx, np.float32)
    displacement_mm = tf.cast(flow, tf.float32) * spacing
    return sum(tf.reduce_mean((_difference(displacement_mm, d) / spacing[d]) ** 2) for d in range(3))


def bending_energy(flow: tf.Tensor, spacing_zyx) -> tf.Tensor:
    """Mean thin-plate bending energy ``sum_d (d2u/dx_d^2)^2 + 2 sum_{d<e} (d2u/dx_d dx_e)^2``, (mm/mm^2)^2.

    Second derivatives are forward differences of forward differences (exact for quadratic fields);
    each term is averaged over the voxels where its stencil fits and over the 3 components.
    """
    spacing = np.asarray(spacing_zyx, np.float32)
    displacement_mm = tf.cast(flow, tf.float32) * spacing
    first = [_difference(displacement_mm, d) / spacing[d] for d in range(3)]
    energy = 0.0
    for d in range(3):
        for e in range(d, 3):
            second = _difference(first[d], e) / spacing[e]
            energy += (1.0 if d == e else 2.0) * tf.reduce_mean(second**2)
    return energy


@dataclass(frozen=True)
class GradientL2:
    """Diffusion regulariser: mean over the 3 axes of the mean squared forward difference of the flow.

    With ``spacing=None`` this is VoxelMorph's ``Grad('l2')`` in voxel units, the regulariser the DDMR
    weights (5e-3, 1e-5) were tuned for. With ``spacing`` (mm, z, y, x) the gradient is taken of the
    displacement in mm per mm, so the penalty means the same on anisotropic grids.
    """

    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        _check_spacing(self.spacing)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        return gradient_penalty(y_pred, _spacing_or_unit(self.spacing)) / 3.0


@dataclass(frozen=True)
class BendingEnergy:
    """Bending-energy regulariser (second derivatives incl. mixed terms) of the flow; see
    :func:`bending_energy`. ``spacing`` as in :class:`GradientL2`. Unlike the diffusion term it does
    not penalise affine components of the field, only its curvature.
    """

    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        _check_spacing(self.spacing)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        return bending_energy(y_pred, _spacing_or_unit(self.spacing))
