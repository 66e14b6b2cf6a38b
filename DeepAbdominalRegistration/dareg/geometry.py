"""Geometry: the ONE place where voxel indices, LPS millimetres and the model grid meet.

Contract (every other module relies on it):

- Images in memory are ``SimpleITK.Image`` objects; their geometry (origin, spacing, direction) is
  in ITK's LPS millimetres. ``sitk.GetArrayFromImage`` gives arrays in (z, y, x) = (k, j, i) order.
- A *registration transform* is a resampling transform, fixed -> moving: it maps a point of the
  fixed image's physical space to the point of the moving image that lands there
  (``warped(x) = moving(T(x))``), as ITK/ANTs forward transforms and Slicer's "FromParent" are.
- A displacement field is a vector ``sitk.Image`` (float64, 3 components) whose vectors are LPS mm:
  ``T(x) = x + d(x)``.
- The *model grid* is a regular grid of ``grid_shape`` voxels (array order z, y, x) spanning the
  region of interest, axis-aligned with the FIXED image's direction cosines. A network flow ``u``
  on it is in model-grid voxels, channel ``c`` = displacement along array axis ``c``
  (so ``u[..., 2]`` is along the grid's first ITK index axis i), and ``warped(p) = moving(p + u(p))``
  in index space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from dareg.errors import DaregError

Interpolation = str  # "linear" | "nearest"

_SITK_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def sitk_interpolator(interpolation: Interpolation) -> int:
    """SimpleITK interpolator constant for ``"linear"`` or ``"nearest"``."""
    try:
        return _SITK_INTERPOLATORS[interpolation]
    except KeyError:
        raise ValueError(
            f"interpolation must be one of {sorted(_SITK_INTERPOLATORS)}, got {interpolation!r}"
        ) from None


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    transform: sitk.Transform | None = None,
    interpolation: Interpolation = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through a resampling transform (identity by default).

    Labels must use ``interpolation="nearest"`` so label ids are preserved; the output keeps the
    input's pixel type.
    """
    return sitk.Resample(
        image,
        reference,
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        sitk_interpolator(interpolation),
        default_value,
        image.GetPixelID(),
    )


def index_to_physical_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(M, origin) such that ``x_lps = M @ (i, j, k) + origin`` in mm; M = direction @ diag(spacing)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=float)


def physical_corners(image: sitk.Image) -> np.ndarray:
    """The 8 corners of the image's voxel-centre box, shape (8, 3), LPS mm."""
    size = np.asarray(image.GetSize(), dtype=float) - 1.0
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float) * size
    matrix, origin = index_to_physical_matrix(image)
    return corners @ matrix.T + origin


def physical_overlap(image: sitk.Image, other: sitk.Image) -> float:
    """Fraction of ``other``'s voxel-centre box that lies inside ``image``'s box (0 = disjoint).

    Estimated on a 9^3 lattice of points of ``other``'s box: cheap, and exact enough to tell
    "no overlap" from "partial" from "full".
    """
    lattice = np.stack(np.meshgrid(*[np.linspace(0.0, 1.0, 9)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    matrix_o, origin_o = index_to_physical_matrix(other)
    points = (lattice * (np.asarray(other.GetSize(), dtype=float) - 1.0)) @ matrix_o.T + origin_o
    matrix_i, origin_i = index_to_physical_matrix(image)
    continuous_index = np.linalg.solve(matrix_i, (points - origin_i).T).T
    upper = np.asarray(image.GetSize(), dtype=float) - 1.0
    tolerance = 1e-3
    inside = np.all(
        (continuous_index >= -0.5 - tolerance) & (continuous_index <= upper + 0.5 + tolerance), axis=1
    )
    return float(inside.mean())


# --------------------------------------------------------------------------------------------------
# Region of interest and the model grid
# --------------------------------------------------------------------------------------------------

#: Hounsfield window mapped to [0, 1] before the network. Soft-tissue window that keeps liver
#: parenchyma (~60 HU), contrast-enhanced vessels (150-250 HU) and fat (-100 HU) apart; bone and
#: air saturate, which keeps them from dominating the similarity terms. Training uses the same function.
CT_WINDOW_HU: tuple[float, float] = (-200.0, 300.0)

#: Default model grid (array order z, y, x), as the paper's 128^3 crops.
DEFAULT_GRID_SHAPE: tuple[int, int, int] = (128, 128, 128)

#: Default margin around the liver masks, as the paper's training crops.
DEFAULT_MARGIN_MM: float = 40.0


@dataclass(frozen=True)
class ModelGrid:
    """A regular grid axis-aligned with the fixed image: where the network and the optimiser work.

    ``size`` and ``spacing`` are in ITK (x, y, z) order; ``shape`` gives the numpy (z, y, x) order.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(reversed(self.size))  # type: ignore[return-value]

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An image with this geometry, to serve as the reference of ``sitk.Resample``."""
        image = sitk.Image(list(self.size), pixel_id)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def _mask_index_box(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """Continuous-index box (lower, upper), (x, y, z) order, of a mask's foreground; None if empty."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        return None
    box = np.asarray(stats.GetBoundingBox(1), dtype=float)
    return box[:3], box[:3] + box[3:] - 1.0


def _physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous (x, y, z) indices of LPS points (N, 3) in ``image``."""
    matrix, origin = index_to_physical_matrix(image)
    return np.linalg.solve(matrix, (np.atleast_2d(points) - origin).T).T


def _box_corners(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.array(
        [
            [(lower, upper)[a][0], (lower, upper)[b][1], (lower, upper)[c][2]]
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ]
    )


def roi_index_box(
    fixed: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    moving_to_fixed: sitk.Transform | None = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Region of interest as a continuous-index box (lower, upper) of the FIXED image, (x, y, z) order.

    The box is the union of the fixed mask's box and the moving mask's box brought into fixed space
    (its 8 corners mapped through ``moving_to_fixed``, the inverse of the initial registration
    transform), grown by ``margin_mm`` on every side and clamped to the fixed image. With no mask
    the box is the whole fixed field of view. Mapping box corners rather than resampling the mask
    costs nothing and can only make the box larger, never cut the liver.
    """
    boxes = []
    if fixed_mask is not None:
        box = _mask_index_box(fixed_mask)
        if box is not None:
            boxes.append(_box_corners(*box))
    if moving_mask is not None:
        box = _mask_index_box(moving_mask)
        if box is not None:
            matrix, origin = index_to_physical_matrix(moving_mask)
            corners = _box_corners(*box) @ matrix.T + origin
            if moving_to_fixed is not None:
                corners = np.array([moving_to_fixed.TransformPoint(tuple(map(float, c))) for c in corners])
            boxes.append(_physical_to_index(fixed, corners))
    upper_limit = np.asarray(fixed.GetSize(), dtype=float) - 1.0
    if not boxes:
        return np.zeros(3), upper_limit
    points = np.concatenate(boxes)
    margin_voxels = margin_mm / np.asarray(fixed.GetSpacing(), dtype=float)
    lower = np.clip(points.min(axis=0) - margin_voxels, 0.0, upper_limit)
    upper = np.clip(points.max(axis=0) + margin_voxels, 0.0, upper_limit)
    return lower, upper


def model_grid_for_box(
    fixed: sitk.Image,
    lower: np.ndarray,
    upper: np.ndarray,
    grid_shape: tuple[int, int, int] = DEFAULT_GRID_SHAPE,
) -> ModelGrid:
    """The model grid (``grid_shape``, z-y-x order) whose voxels tile the fixed-index box exactly.

    As the paper resizes its crop to 128^3, the grid spacing is anisotropic in general: each axis's
    physical extent (voxel edge to voxel edge) divided by the number of grid voxels on that axis.
    """
    size = np.asarray(list(reversed(grid_shape)), dtype=int)
    fixed_spacing = np.asarray(fixed.GetSpacing(), dtype=float)
    extent_mm = (np.asarray(upper) - np.asarray(lower) + 1.0) * fixed_spacing
    spacing = extent_mm / size
    first_edge_index = np.asarray(lower) - 0.5  # voxel-edge of the box, in fixed continuous indices
    first_centre_index = first_edge_index + 0.5 * spacing / fixed_spacing
    matrix, origin = index_to_physical_matrix(fixed)
    grid_origin = matrix @ first_centre_index + origin
    return ModelGrid(
        origin=tuple(map(float, grid_origin)),
        spacing=tuple(map(float, spacing)),
        direction=tuple(map(float, fixed.GetDirection())),
        size=tuple(map(int, size)),
    )


# --------------------------------------------------------------------------------------------------
# Onto the model grid
# --------------------------------------------------------------------------------------------------


def resample_to_grid(
    image: sitk.Image,
    grid: ModelGrid,
    *,
    transform: sitk.Transform | None = None,
    interpolation: Interpolation = "linear",
    default_value: float = 0.0,
) -> np.ndarray:
    """Sample ``image`` on the model grid through a resampling transform; returns a (z, y, x) float32 array.

    Linear resampling of an image much finer than the grid aliases, so images (not labels) are first
    smoothed with a Gaussian of sigma = 0.5 * sqrt(grid_spacing^2 - image_spacing^2) per axis (only
    on the part of the image the grid sees, so full-size CTs stay cheap).
    """
    if interpolation == "linear":
        image = _antialias_for_grid(image, grid, transform)
    resampled = sitk.Resample(
        image,
        grid.reference_image(),
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        sitk_interpolator(interpolation),
        default_value,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def _antialias_for_grid(image: sitk.Image, grid: ModelGrid, transform: sitk.Transform | None) -> sitk.Image:
    """Crop ``image`` to the part the grid samples (plus a margin); low-pass it to the grid's resolution."""
    grid_corners = physical_corners(grid.reference_image())
    if transform is not None:
        grid_corners = np.array([transform.TransformPoint(tuple(map(float, c))) for c in grid_corners])
    index = _physical_to_index(image, grid_corners)
    image_spacing = np.asarray(image.GetSpacing(), dtype=float)
    # The grid's spacing expressed along the image axes (the axes may be rotated w.r.t. each other).
    grid_axes = np.asarray(grid.direction, dtype=float).reshape(3, 3) * np.asarray(grid.spacing)
    image_direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    grid_spacing_along_image = np.abs(image_direction.T @ grid_axes).max(axis=1)
    sigma = 0.5 * np.sqrt(np.clip(grid_spacing_along_image**2 - image_spacing**2, 0.0, None))
    pad = np.ceil(3.0 * sigma / image_spacing) + 2
    lower = np.clip(np.floor(index.min(axis=0) - pad), 0, None).astype(int)
    upper = np.minimum(np.ceil(index.max(axis=0) + pad), np.asarray(image.GetSize()) - 1).astype(int)
    if np.any(upper < lower):
        return image  # the grid does not see this image; resampling will give the default value
    cropped = sitk.RegionOfInterest(image, [int(v) for v in upper - lower + 1], [int(v) for v in lower])
    smoothed = sitk.Cast(cropped, sitk.sitkFloat32)
    # Average whole blocks first (cheap, itself a low-pass), then blur only what remains: this keeps a
    # 512 x 512 x 300 CT at a fraction of a second. BinShrink keeps the physical extent (origin moves
    # to the block centre), so resampling afterwards is unaffected.
    factors = np.maximum(1, np.floor(grid_spacing_along_image / image_spacing / 2.0)).astype(int)
    if factors.max() > 1 and np.all(np.asarray(smoothed.GetSize()) >= 4 * factors):
        smoothed = sitk.BinShrink(smoothed, [int(f) for f in factors])
        image_spacing = np.asarray(smoothed.GetSpacing(), dtype=float)
        sigma = 0.5 * np.sqrt(np.clip(grid_spacing_along_image**2 - image_spacing**2, 0.0, None))
    for axis, axis_sigma in enumerate(sigma):
        if axis_sigma >= 0.2 * image_spacing[axis]:  # below that the blur changes nothing visible
            smoothed = sitk.RecursiveGaussian(
                smoothed, float(axis_sigma), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis
            )
    return smoothed


def normalisation_config(window: tuple[float, float] = CT_WINDOW_HU) -> dict:
    """How intensities were mapped to [0, 1], as stored in a model's config.json."""
    return {"kind": "ct_window", "low": float(window[0]), "high": float(window[1])}


def window_from_normalisation(normalisation: dict) -> tuple[float, float]:
    """The HU window of a model's stored normalisation (see :func:`normalisation_config`)."""
    if not normalisation:
        return CT_WINDOW_HU
    if normalisation.get("kind") != "ct_window" or not {"low", "high"} <= set(normalisation):
        raise DaregError(
            f"The model's intensity normalisation {normalisation} is not supported; this version "
            "of dareg knows {'kind': 'ct_window', 'low': HU, 'high': HU}. Update dareg or the model."
        )
    return float(normalisation["low"]), float(normalisation["high"])


def normalize_ct(array: np.ndarray, window: tuple[float, float] = CT_WINDOW_HU) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through ``window`` (clipped), float32; the network's input scale."""
    low, high = window
    return np.clip((np.asarray(array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Back from the model grid: one resampling transform fixed -> moving in LPS mm
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineMap:
    """A linear resampling transform in LPS mm: ``T(x) = matrix @ x + offset`` (fixed -> moving)."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls) -> AffineMap:
        return cls(np.eye(3), np.zeros(3))

    @classmethod
    def from_sitk(cls, transform: sitk.Transform) -> AffineMap:
        """Read any linear SimpleITK transform (Euler, similarity, affine, composite of those).

        The map is probed at the origin and the unit vectors, then checked at a far point, so a
        non-linear transform is refused instead of silently linearised.
        """
        origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3) * 100.0]
        affine = cls(np.stack(columns, axis=1) / 100.0, origin)
        probe = np.array([123.0, -77.0, 251.0])
        if not np.allclose(affine.apply(probe), transform.TransformPoint(tuple(probe)), atol=1e-6):
            raise ValueError("the initial transform is not linear (affine)")
        return affine

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map LPS points (..., 3) -> (..., 3)."""
        return points @ self.matrix.T + self.offset

    def to_sitk(self) -> sitk.AffineTransform:
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(tuple(map(float, self.matrix.ravel())))
        transform.SetTranslation(tuple(map(float, self.offset)))
        return transform

    def inverse_sitk(self) -> sitk.AffineTransform:
        """The inverse map (moving -> fixed), e.g. to bring moving-space boxes into fixed space."""
        inverse = np.linalg.inv(self.matrix)
        return AffineMap(inverse, -inverse @ self.offset).to_sitk()


def flow_to_displacement_mm(flow: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Model-grid flow (z, y, x, 3) in grid voxels, channel c along array axis c -> LPS mm vectors.

    Channel order is reversed to (i, j, k) first, then mapped through direction @ diag(spacing).
    """
    matrix = np.asarray(grid.direction, dtype=float).reshape(3, 3) @ np.diag(grid.spacing)
    return (np.asarray(flow, dtype=np.float64)[..., ::-1] @ matrix.T).astype(np.float64)


def displacement_mm_to_flow(displacement: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Inverse of :func:`flow_to_displacement_mm`: LPS mm (z, y, x, 3) -> grid voxels."""
    matrix = np.asarray(grid.direction, dtype=float).reshape(3, 3) @ np.diag(grid.spacing)
    return (np.asarray(displacement, dtype=np.float64) @ np.linalg.inv(matrix).T)[..., ::-1].astype(
        np.float32
    )


def taper_weights(grid: ModelGrid, width_mm: float) -> np.ndarray:
    """Weights (z, y, x) in [0, 1]: 0 on the grid's outermost voxels, smoothly 1 at ``width_mm`` inside.

    Why: outside the ROI the transform is the affine part only. Fading the deformable part to zero
    over the margin keeps the composed field continuous at the box border, so no folding is created
    there; the liver itself sits at least ``margin_mm`` (40 mm by default) inside the box.
    """
    axes = []
    for n, spacing in zip(grid.shape, reversed(grid.spacing), strict=True):
        distance_mm = np.minimum(np.arange(n), np.arange(n)[::-1]) * spacing
        ramp = np.clip(distance_mm / max(width_mm, 1e-6), 0.0, 1.0)
        axes.append(0.5 - 0.5 * np.cos(np.pi * ramp))
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)


def field_grid(fixed: sitk.Image, grid: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
    """The model grid's lattice extended to cover the fixed image: (first_index, size), (x, y, z) order.

    ``first_index`` is the (integer, possibly negative) model-grid index of the field's first voxel.
    Keeping the model lattice means the deformable part is stored without resampling loss, the
    field is never coarser than the model grid, and it is far smaller than a full-resolution field
    (about 60 MB instead of ~1 GB for a 512x512x300 CT); the affine part is linear, so linear
    interpolation between the field's nodes reproduces it exactly.
    """
    index = _physical_to_index(grid.reference_image(), physical_corners(fixed))
    first = np.floor(index.min(axis=0) + 1e-6).astype(int)
    last = np.ceil(index.max(axis=0) - 1e-6).astype(int)
    first = np.minimum(first, 0)
    last = np.maximum(last, np.asarray(grid.size) - 1)
    return first, last - first + 1


def compose_displacement_field(
    fixed: sitk.Image,
    grid: ModelGrid,
    affine: AffineMap,
    displacement_mm: np.ndarray | None = None,
) -> sitk.Image:
    """ONE displacement field for ``T(x) = A(x + d(x))``, covering the whole fixed image (LPS mm, float64).

    ``d`` is the deformable part on the model grid (z, y, x, 3) in LPS mm (zero outside the grid) and
    ``A`` the initial affine transform; the network and the optimiser see the moving image already
    resampled through ``A``, so their displacement acts before it.
    """
    first, size = field_grid(fixed, grid)
    shape = tuple(int(v) for v in reversed(size))
    matrix = np.asarray(grid.direction, dtype=float).reshape(3, 3) @ np.diag(grid.spacing)
    origin = np.asarray(grid.origin) + matrix @ first
    # A(x + d) - x = (M - I) x + t + M d, and x = origin + G (i, j, k): the affine part is affine in the
    # index, so it is built from three broadcast 1-D ramps, and M d is added on the model grid only.
    linear = affine.matrix - np.eye(3)
    per_index = linear @ matrix  # column c: change of the affine part per voxel step along index axis c
    k, j, i = (np.arange(n, dtype=np.float64) for n in shape)
    field_array = np.empty(shape + (3,), dtype=np.float64)
    field_array[...] = linear @ origin + affine.offset
    field_array += k[:, None, None, None] * per_index[:, 2]
    field_array += j[None, :, None, None] * per_index[:, 1]
    field_array += i[None, None, :, None] * per_index[:, 0]
    if displacement_mm is not None:
        z0, y0, x0 = (-first[::-1]).tolist()
        gz, gy, gx = grid.shape
        field_array[z0 : z0 + gz, y0 : y0 + gy, x0 : x0 + gx] += displacement_mm @ affine.matrix.T
    field = sitk.GetImageFromArray(field_array, isVector=True)
    field.SetOrigin(tuple(map(float, origin)))
    field.SetSpacing(grid.spacing)
    field.SetDirection(grid.direction)
    return field


def displacement_field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A SimpleITK transform over a COPY of ``field`` (the constructor takes the image's buffer)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
