"""Synthetic training pairs on the fly: one image (+ one-hot labels) -> fixed, moving and the EXACT flow.

Convention (exact by construction, in the network's terms)
-----------------------------------------------------------
The network predicts ``u`` with ``warped(p) = moving(p + u(p)) ~ fixed(p)`` (``dareg.models``). The
layer draws a transformation ``T`` (a thin-plate-spline deformation followed by a rigid motion about the
grid centre) and returns::

    moving = image,   fixed(p) = image(T(p)) = image(p + flow(p)),   flow(p) = T(p) - p   (voxels)

so ``warp(moving, flow)`` IS the sampling that made ``fixed``: ``flow`` is exactly the field the
network should predict, with no inverse anywhere. (The DDMR original deformed the moving image and
used ``2x - T(x)`` as a first-order inverse, so its ground truth was off by O(|grad u| |u|).) A
feature at fixed position ``q`` lies in the moving image at ``q + flow(q)``: for a pure translation
``t`` the flow is ``+t`` everywhere and a label's centroid moves by ``+t`` from fixed to moving.
Labels follow the image: ``moving_labels = labels``, ``fixed_labels`` = labels sampled through the
same flow (nearest: stays one-hot; linear: soft labels for segmentation-guided training).

Transformation (millimetres, grid centred on its middle voxel, array order z, y, x)
---------------------------------------------------------------------------------
``T(x) = R (x + n(x)) + t`` where
- ``n``: 3-D thin-plate spline, kernel ``U(r) = r`` (biharmonic in 3-D) plus an affine term, through
  random control displacements, each component ``U(-max_deformation_mm, +max_deformation_mm)``.
  Layouts: "paper" = an 8x8x8 grid spanning the image, every point displaced; "original" = the
  authors' code, a 4x4x4 grid of fixed anchors plus 10 displaced points drawn among foreground voxels
  (image above its minimum, anchor voxels excluded so no two control points coincide). A spline can
  overshoot its control values between control points, so a sample's ``n`` is scaled down as a whole
  (never clipped, which would break its smoothness) when its largest component exceeds the limit.
- ``R``: rotations about the three array axes, each angle ``U(-max_rotation_deg, +max_rotation_deg)``,
  ``R = R_0 R_1 R_2`` (``R_k`` the right-handed rotation about axis ``k``, as scipy's "XYZ" Euler order);
  ``t``: each component ``U(-max_translation_mm, +max_translation_mm)``. The original rotated about a
  single random axis only.
Limits are per component in mm and become voxels through ``spacing`` (mm per array axis), which
also makes the spline and the rotation isotropic in physical space on anisotropic grids.

Intensities (inputs in [0, 1]), fixed and moving each with their own draw: gamma
``x^g`` with ``log2 g ~ U(-log2 gamma, +log2 gamma)`` (``gamma=2`` gives [0.5, 2]; 1 = off), then
brightness ``x + c``, ``c ~ U(-brightness, +brightness)`` (0 = off), clipped to [0, 1]. Both default
to off, as for the paper's liver models; no final min-max (it would cancel the brightness shift).

Cost and accuracy
-----------------
The spline's 512-point kernel at every voxel of 128^3 would be 10^9 entries. Instead it is evaluated
on nodes that refine the control grid (at least ``tps_nodes`` per axis; 15 = half the control
spacing) through one (nodes x controls) matrix, ``tps_matrix``, computed once in float64 with the
squared distance clamped >= 0 before the square root (the original got NaN where a control point
coincides with a voxel centre), and interpolated linearly to every voxel. The rigid part is affine,
which linear interpolation reproduces exactly; the spline is rounded off between nodes, mostly at the
cusp its r kernel has at every control point. Against the exact spline, for displacements up to 3
voxels, the mean / max error is 0.08 / 0.4 voxels with 15 nodes, 0.045 / 0.33 with 22 and 0.027 /
0.30 with 29, the same at 64^3 and 128^3. The ground truth is exact whatever the node count: the flow
is what made the fixed image.

Everything after the spline matrix (product, composition, upsampling, warps, intensities) is one
XLA-compiled function, 5x faster on CPU than the plain TensorFlow graph. Measured on this project's
2 CPU cores while idle (batch 1, image + 3 one-hot labels, "paper" layout, 15 nodes): the layer takes
2.7-3.6 ms at 64^3 and 24 ms at 128^3, against 64-68 ms and 0.52-0.53 s for a ``compact`` training
step (forward, backward, Adam), i.e. 4-5% of a step; in the same ``tf.function`` as the step it
added 5.8% (64^3) and 5.9% (128^3), medians of paired rounds. With other jobs on the cores every
figure doubles or varies by +-30%. The "original" layout takes 8 ms at 64^3: its spline matrix is
rebuilt per sample (outside XLA, whose CPU matrix inverse is ~20x slower) and its random points come
from a top-k over all voxels.

Randomness: every draw comes from a ``keras.random.SeedGenerator(seed)``, so a layer built with the
same seed yields the same sequence of pairs (each sample of a batch gets its own draws); build a
fresh layer with a fixed seed for a fixed validation set.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from ..models.transformer import warp

LABEL_INTERPOLATIONS = ("nearest", "linear")


@dataclass(frozen=True)
class ControlLayout:
    """Where the spline's control points are.

    Parameters
    ----------
    grid : points per axis of a regular grid spanning the image (first to last voxel centre).
    random_points : extra control points drawn per sample among foreground voxels.
    grid_displaced : True = the grid points get random displacements; False = they are anchors (zero
        displacement) and only the random points move.
    """

    grid: int
    random_points: int = 0
    grid_displaced: bool = True


CONTROL_LAYOUTS: dict[str, ControlLayout] = {
    "paper": ControlLayout(grid=8),
    "original": ControlLayout(grid=4, random_points=10, grid_displaced=False),
}


class PairParameters(NamedTuple):
    """The random draws behind one batch of pairs (mm, radians; B = batch size, N = control points).

    ``control_points`` is None for layouts without random points (the layer's fixed grid is used);
    otherwise (B, N, 3) float64 centred mm. ``control_displacements`` (B, N, 3) mm; ``angles`` (B, 3) radians
    about array axes 0, 1, 2; ``translation`` (B, 3) mm; ``gamma`` and ``brightness`` (B, 2) for
    (fixed, moving).
    """

    control_points: tf.Tensor | None
    control_displacements: tf.Tensor
    angles: tf.Tensor
    translation: tf.Tensor
    gamma: tf.Tensor
    brightness: tf.Tensor


def centred_coordinates(indices, size: int, spacing: float) -> np.ndarray:
    """Voxel indices along one axis -> mm relative to the axis' middle voxel centre."""
    return (np.asarray(indices, dtype=np.float64) - (size - 1) / 2.0) * spacing


def grid_points(axes: list[np.ndarray]) -> np.ndarray:
    """All points of the tensor grid with per-axis coordinates ``axes``, (M, 3), axis 2 fastest."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=-1)


def node_positions(size: int, controls: int, nodes: int) -> np.ndarray:
    """Voxel positions, along one axis, of the nodes the spline is evaluated on.

    The control positions ``linspace(0, size - 1, controls)`` refined by the smallest integer factor
    that gives at least ``nodes`` nodes: every control point is a node, so the spline's values there
    (cusps of the r kernel) are kept exactly, and the nodes span the image exactly, so linear
    interpolation between them never extrapolates.
    """
    refinement = max(1, math.ceil((nodes - 1) / (controls - 1)))
    return np.linspace(0.0, size - 1.0, (controls - 1) * refinement + 1)


def rotation_matrices(angles):
    """(B, 3) angles (radians) -> (B, 3, 3) ``R_0(a_0) R_1(a_1) R_2(a_2)``, right-handed per axis."""
    result = None
    for axis in range(3):
        cos, sin = tf.cos(angles[:, axis]), tf.sin(angles[:, axis])
        one, zero = tf.ones_like(cos), tf.zeros_like(cos)
        i, j = (axis + 1) % 3, (axis + 2) % 3  # cyclic pair: R[i, j] = -sin gives a right-handed turn
        rows = [[one if r == c == axis else zero for c in range(3)] for r in range(3)]
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = cos, -sin, sin, cos
        matrix = tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)
        result = matrix if result is None else tf.matmul(result, matrix)
    return result


def _distances(points, controls):
    """|points_m - controls_n|, (..., M, N); the squared form is clamped >= 0 before the root."""
    squared = (
        tf.reduce_sum(points**2, axis=-1)[..., :, None]
        - 2.0 * tf.einsum("...mi,...ni->...mn", points, controls)
        + tf.reduce_sum(controls**2, axis=-1)[..., None, :]
    )
    return tf.sqrt(tf.maximum(squared, 0.0))


def _affine(points, like):
    """Affine basis rows ``[1, x]`` (..., M, 4), broadcast to the batch shape of ``like`` (..., M, K)."""
    points = points + tf.zeros_like(like[..., :1])
    return tf.concat([tf.ones_like(points[..., :1]), points], axis=-1)


def tps_matrix(points, controls):
    """The thin-plate spline as one linear map: control displacements -> values at ``points``.

    Parameters
    ----------
    points : (M, 3) evaluation points, mm.
    controls : (N, 3) or (B, N, 3) control points, mm, pairwise distinct.

    Returns
    -------
    float32 (M, N) or (B, M, N) matrix ``E``: the spline through displacements ``d`` (N, 3) is
    ``E @ d`` at ``points``. ``E = [U(|x - c_n|), 1, x] @ L^-1[:, :N]`` with the interpolation matrix
    ``L = [[U(|c_i - c_j|), P], [P^T, 0]]``, ``P = [1, c]``, ``U(r) = r``; computed in float64 because
    ``L`` is indefinite and badly scaled (kernel ~ 100 mm next to a column of ones).
    """
    points = tf.cast(points, tf.float64)
    controls = tf.cast(controls, tf.float64)
    affine = _affine(controls, controls)  # (..., N, 4)
    top = tf.concat([_distances(controls, controls), affine], axis=-1)
    bottom = tf.concat([tf.linalg.matrix_transpose(affine), tf.zeros_like(affine[..., :4, :])], axis=-1)
    inverse = tf.linalg.inv(tf.concat([top, bottom], axis=-2))[..., : controls.shape[-2]]
    kernel = _distances(points, controls)
    basis = tf.concat([kernel, _affine(points, kernel)], axis=-1)
    return tf.cast(basis @ inverse, tf.float32)


def _upsample_linear(coarse, nodes: list[np.ndarray]):
    """(B, Kz, Ky, Kx, C) at node positions ``nodes`` (voxels, per axis, from 0 to n - 1) ->
    (B, D, H, W, C) at every voxel, separable linear interpolation."""
    for axis, positions in enumerate(nodes, start=1):
        voxels = np.arange(round(positions[-1]) + 1)
        lower = np.clip(np.searchsorted(positions, voxels, side="right") - 1, 0, len(positions) - 2)
        fraction = (voxels - positions[lower]) / (positions[lower + 1] - positions[lower])
        weight_shape = [1, 1, 1, 1, 1]
        weight_shape[axis] = len(voxels)
        weight = tf.constant(fraction.reshape(weight_shape), tf.float32)
        low = tf.gather(coarse, lower, axis=axis)
        coarse = low + weight * (tf.gather(coarse, lower + 1, axis=axis) - low)
    return coarse


def _coarse_flow(points, nonrigid, rotation, translation, spacing: tuple[float, float, float]):
    """Flow in voxels of ``T(x) = R (x + n(x)) + t`` at the coarse points.

    ``points`` (M, 3) centred mm, ``nonrigid`` (B, M, 3) mm, ``rotation`` (B, 3, 3), ``translation``
    (B, 3) mm -> (B, M, 3) voxels. The rigid part is affine in x, which linear upsampling from a grid
    that covers the image reproduces exactly: only the spline is approximated by the coarse grid.
    """
    mapped = tf.einsum("bij,bmj->bmi", rotation, points + nonrigid) + translation[:, None, :]
    return (mapped - points) / np.asarray(spacing, np.float32)


def _adjust_intensity(image, gamma, brightness, *, use_gamma: bool, use_brightness: bool):
    """Gamma then brightness shift, clipped to [0, 1]; ``gamma``/``brightness`` (B,)."""
    if use_gamma:
        image = tf.clip_by_value(image, 0.0, 1.0) ** gamma[:, None, None, None, None]
    if use_brightness:
        image = image + brightness[:, None, None, None, None]
    if use_gamma or use_brightness:
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def _dense_pair(image, labels, spline, parameters, *, config):
    """Everything after the spline's solve, XLA-compiled by the layer: field, warps, intensities.

    ``spline`` is ``tps_matrix`` of the nodes, (M, N) or (B, M, N). Each upsampled value is a convex
    combination of node values, so scaling the nodes' spline to the limit bounds every voxel.
    """
    nonrigid = spline @ parameters.control_displacements  # (B, M, 3) mm
    largest = tf.reduce_max(tf.abs(nonrigid), axis=[1, 2])
    nonrigid *= tf.minimum(1.0, config["limit"] / tf.maximum(largest, 1e-12))[:, None, None]
    points = tf.cast(config["points"], tf.float32)
    rotation = rotation_matrices(parameters.angles)
    coarse = _coarse_flow(points, nonrigid, rotation, parameters.translation, config["spacing"])
    coarse = tf.reshape(coarse, (-1, *config["coarse_shape"], 3))
    flow = _upsample_linear(coarse, config["nodes"])
    gamma, brightness = parameters.gamma, parameters.brightness
    intensity = functools.partial(
        _adjust_intensity, use_gamma=config["use_gamma"], use_brightness=config["use_brightness"]
    )
    pair = {"fixed": intensity(warp(image, flow), gamma[:, 0], brightness[:, 0]), "flow": flow}
    if config["use_gamma"] or config["use_brightness"]:  # else the caller passes the input through
        pair["moving"] = intensity(image, gamma[:, 1], brightness[:, 1])
    if labels is not None:
        pair["fixed_labels"] = warp(labels, flow, interpolation=config["label_interpolation"])
    return pair


class SyntheticPairAugmentation(keras.layers.Layer):
    """Make (fixed, moving, labels, exact flow) training pairs from single images; see the module doc.

    Parameters
    ----------
    spacing : mm per voxel along array axes (z, y, x) of the model grid.
    seed : integer seed of the layer's random stream.
    control_points : a ``CONTROL_LAYOUTS`` name, "paper" (8x8x8 grid) or "original" (4x4x4 anchors +
        10 random foreground points).
    max_deformation_mm, max_rotation_deg, max_translation_mm : per-component limits (paper: 6, 10, 30).
    gamma : gamma range [1/gamma, gamma] (1 = off); brightness : shift range (0 = off).
    label_interpolation : "nearest" (one-hot stays one-hot) or "linear" (soft labels).
    tps_nodes : the spline is evaluated on at least this many nodes per axis (a refinement of the
        control grid, see ``node_positions``) and upsampled linearly; exact at every voxel when the
        nodes fall on the voxels, e.g. ``tps_nodes=n`` with ``n - 1`` a multiple of ``grid - 1``.
    jit_compile : compile the per-voxel work with XLA (much faster on CPU and GPU).

    Call
    ----
    ``layer(image, labels=None)`` with ``image`` (B, D, H, W, 1) float in [0, 1] and ``labels``
    (B, D, H, W, L) one-hot float -> dict ``fixed``, ``moving`` (B, D, H, W, 1), ``flow``
    (B, D, H, W, 3) voxels with ``warp(moving, flow) == fixed`` before intensity changes, and with
    labels ``fixed_labels``, ``moving_labels`` (B, D, H, W, L). Spatial shape must be static.
    ``sample_parameters`` + ``synthesize`` split a call into its random draws and the deterministic
    pair making.
    """

    def __init__(
        self,
        spacing,
        *,
        seed: int,
        control_points: str = "paper",
        max_deformation_mm: float = 6.0,
        max_rotation_deg: float = 10.0,
        max_translation_mm: float = 30.0,
        gamma: float = 1.0,
        brightness: float = 0.0,
        label_interpolation: str = "nearest",
        tps_nodes: int = 15,
        jit_compile: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.spacing = _check_spacing(spacing)
        self.control_points = _check_choice(control_points, tuple(CONTROL_LAYOUTS), "control_points")
        self.layout = CONTROL_LAYOUTS[control_points]
        self.max_deformation_mm = _non_negative(max_deformation_mm, "max_deformation_mm")
        self.max_rotation_deg = _non_negative(max_rotation_deg, "max_rotation_deg")
        self.max_translation_mm = _non_negative(max_translation_mm, "max_translation_mm")
        if gamma < 1.0:
            raise ValueError(f"gamma must be >= 1 (range [1/gamma, gamma]), got {gamma!r}")
        self.gamma = float(gamma)
        self.brightness = _non_negative(brightness, "brightness")
        self.label_interpolation = _check_choice(
            label_interpolation, LABEL_INTERPOLATIONS, "label_interpolation"
        )
        if int(tps_nodes) != tps_nodes or tps_nodes < 2:
            raise ValueError(f"tps_nodes must be an integer >= 2, got {tps_nodes!r}")
        self.tps_nodes = int(tps_nodes)
        self.seed = int(seed)
        self.jit_compile = bool(jit_compile)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, input_shape) -> None:
        """Fix the grid, precompute the fixed control grid's spline operators, compile the dense part."""
        if len(input_shape) != 5 or any(s is None for s in input_shape[1:4]):
            raise ValueError(f"image must be (B, D, H, W, C) with static D, H, W; got {tuple(input_shape)}")
        self._shape = tuple(int(s) for s in input_shape[1:4])
        nodes = [node_positions(n, self.layout.grid, self.tps_nodes) for n in self._shape]
        self._coarse_shape = tuple(len(a) for a in nodes)
        self._coarse_points = grid_points(
            [centred_coordinates(a, n, s) for a, n, s in zip(nodes, self._shape, self.spacing, strict=True)]
        )
        self._grid = grid_points(
            [
                centred_coordinates(np.linspace(0, n - 1, self.layout.grid), n, s)
                for n, s in zip(self._shape, self.spacing, strict=True)
            ]
        )
        if self.layout.random_points:
            self._anchor_voxels = _voxel_mask(self._grid, self._shape, self.spacing)
        else:
            with tf.init_scope():  # constants of the layer: computed once, eagerly, even inside a trace
                self._grid_spline = tps_matrix(self._coarse_points, self._grid)
        config = {
            "coarse_shape": self._coarse_shape,
            "points": self._coarse_points,
            "spacing": self.spacing,
            "nodes": nodes,
            "limit": self.max_deformation_mm,
            "label_interpolation": self.label_interpolation,
            "use_gamma": self.gamma > 1.0,
            "use_brightness": self.brightness > 0.0,
        }

        # A closure, not a partial: the config's arrays become constants of the compiled function.
        def dense(image, labels, spline, parameters):
            return _dense_pair(image, labels, spline, parameters, config=config)

        self._dense = tf.function(dense, jit_compile=self.jit_compile, autograph=False)
        super().build(input_shape)

    @property
    def control_grid(self) -> np.ndarray:
        """(N, 3) centred mm positions of the regular control grid (after build)."""
        return self._grid

    def _uniform(self, shape, limit: float):
        return keras.random.uniform(shape, -limit, limit, seed=self.seed_generator)

    def sample_parameters(self, image) -> PairParameters:
        """Draw the random parameters of one batch of pairs (advances the layer's random stream)."""
        if not self.built:
            self.build(image.shape)
        batch = tf.shape(image)[0]
        displaced = len(self._grid) if self.layout.grid_displaced else 0
        displacements = self._uniform(
            (batch, displaced + self.layout.random_points, 3), self.max_deformation_mm
        )
        control_points = None
        if self.layout.random_points:
            control_points = self._random_controls(image)
            anchors = tf.zeros((batch, len(self._grid) - displaced, 3))
            displacements = tf.concat([anchors, displacements], axis=1)
        return PairParameters(
            control_points=control_points,
            control_displacements=displacements,
            angles=self._uniform((batch, 3), math.radians(self.max_rotation_deg)),
            translation=self._uniform((batch, 3), self.max_translation_mm),
            gamma=2.0 ** self._uniform((batch, 2), math.log2(self.gamma)),
            brightness=self._uniform((batch, 2), self.brightness),
        )

    def _random_controls(self, image):
        """The control grid followed by random distinct foreground voxels, (B, N, 3) centred mm."""
        batch = tf.shape(image)[0]
        flat = tf.reshape(image[..., 0], (batch, -1))
        foreground = tf.cast(flat > tf.reduce_min(flat, axis=1, keepdims=True), tf.float32)
        # Noise in [0, 1) + 1 on foreground - 2 on grid voxels: the top k are k distinct foreground
        # voxels drawn uniformly without replacement, never on a grid point (the spline needs
        # distinct control points).
        scores = keras.random.uniform(tf.shape(flat), seed=self.seed_generator) + foreground
        chosen = tf.math.top_k(scores - 2.0 * self._anchor_voxels.reshape(1, -1), self.layout.random_points)
        height, width = self._shape[1], self._shape[2]
        index = chosen.indices
        voxel = tf.stack([index // (height * width), index // width % height, index % width], axis=-1)
        centre = (np.asarray(self._shape, np.float64) - 1) / 2
        points = (tf.cast(voxel, tf.float64) - centre) * np.asarray(self.spacing)
        grid = tf.broadcast_to(tf.constant(self._grid, tf.float64), (batch, *self._grid.shape))
        return tf.concat([grid, points], axis=1)

    def synthesize(self, image, labels, parameters: PairParameters) -> dict:
        """Make the pairs for given parameters (deterministic); ``labels`` may be None."""
        if not self.built:
            self.build(image.shape)
        image = tf.cast(image, tf.float32)
        if labels is not None:
            labels = tf.cast(labels, tf.float32)
            if labels.shape.rank != 5 or tuple(labels.shape[1:4]) != self._shape:
                raise ValueError(f"labels must be (B, *{self._shape}, L), got {tuple(labels.shape)}")
        if parameters.control_points is None:
            spline = self._grid_spline
        else:  # the inverse stays outside XLA, whose CPU matrix inverse is ~20x slower
            spline = tps_matrix(self._coarse_points, parameters.control_points)
        floats = {key: tf.cast(getattr(parameters, key), tf.float32) for key in PairParameters._fields[1:]}
        pair = self._dense(image, labels, spline, parameters._replace(**floats))
        pair.setdefault("moving", image)  # unchanged when there is no intensity augmentation
        if labels is not None:
            pair["moving_labels"] = labels
        return pair

    def call(self, image, labels=None):
        return self.synthesize(image, labels, self.sample_parameters(image))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "spacing": list(self.spacing),
            "seed": self.seed,
            "control_points": self.control_points,
            "max_deformation_mm": self.max_deformation_mm,
            "max_rotation_deg": self.max_rotation_deg,
            "max_translation_mm": self.max_translation_mm,
            "gamma": self.gamma,
            "brightness": self.brightness,
            "label_interpolation": self.label_interpolation,
            "tps_nodes": self.tps_nodes,
            "jit_compile": self.jit_compile,
        }


def _voxel_mask(points, shape: tuple[int, int, int], spacing) -> np.ndarray:
    """(D, H, W) float32 mask of the voxel centres that coincide with centred-mm ``points`` (N, 3)."""
    position = np.asarray(points) / np.asarray(spacing) + (np.asarray(shape) - 1) / 2.0
    index = np.round(position).astype(int)
    on_voxel = np.all(np.abs(position - index) < 1e-6, axis=1)
    mask = np.zeros(shape, np.float32)
    mask[tuple(index[on_voxel].T)] = 1.0
    return mask


def _check_spacing(spacing) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive mm values (z, y, x), got {spacing!r}")
    return values


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _non_negative(value: float, name: str) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)
