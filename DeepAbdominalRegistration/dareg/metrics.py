"""Registration quality metrics, all in physical units (LPS millimetres) on ``SimpleITK`` images.

Why this module is careful about geometry: the original DDMR evaluation reported TRE and Hausdorff
distances in the wrong units (a zoom factor used as voxel size), mapped moving centroids with the wrong
sign, swapped the i/j axes and dropped the affine part of ANTs transforms. Here:

- every distance is computed from the image geometry (origin, spacing, direction cosines), never from
  voxel counts of some working grid;
- arrays are in (z, y, x) = (k, j, i) order (``sitk.GetArrayViewFromImage``) and are converted to index
  order (i, j, k) exactly once, through :func:`dareg.geometry.index_to_physical_matrix`;
- TRE maps FIXED points through the full registration transform (fixed -> moving, resampling
  convention, see :mod:`dareg.geometry`), whatever it is composed of (affine + deformable), with
  ``transform.TransformPoint``;
- label and mask images must share the reference image's grid; a mismatch raises
  :class:`GeometryMismatchError` instead of silently comparing voxels that are not co-located.

Undefined values are NaN (a label absent from both images, a constant image for NCC/SSIM) and are
excluded from means; ``registration_metrics`` keeps them as NaN so the JSON writer can emit ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from dareg.errors import DaregError
from dareg.geometry import index_to_physical_matrix, resample_to_reference

# SSIM constants of Wang et al. 2004; the window is truncated at 3.5 sigma (as scikit-image does).
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_TRUNCATE = 3.5

# log|J| is taken of max(det, floor): folded voxels (det <= 0) have no logarithm, and a floor keeps
# them in the SDlogJ statistic as strong outliers instead of dropping them (they are counted
# separately by ``fraction_nonpositive``).
LOGJ_FLOOR = 1e-6

# The Jacobian is computed slab by slab so a full-resolution CT field does not need nine extra
# float64 copies of itself in memory at once.
_JACOBIAN_CHUNK_VOXELS = 2_000_000

# Geometry tolerances: loose enough for NIfTI's float32 header round trip, tight enough to catch
# any real grid difference (a thousandth of a voxel).
_SPACING_RELATIVE_TOLERANCE = 1e-3
_DIRECTION_TOLERANCE = 1e-4


class GeometryMismatchError(DaregError, ValueError):
    """Two images that must share one voxel grid do not (size, spacing, origin or direction differ).

    A ``DaregError`` because a user causes it by passing images from different grids; also a
    ``ValueError`` for callers that treat it as a bad argument.
    """


# --------------------------------------------------------------------------------------------------
# Input validation and conversion
# --------------------------------------------------------------------------------------------------


def _same_geometry(image: sitk.Image, other: sitk.Image) -> bool:
    """True when both images have the same size and (within tolerance) spacing, origin and direction."""
    if image.GetSize() != other.GetSize():
        return False
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    tolerance = _SPACING_RELATIVE_TOLERANCE * float(spacing.min())
    return bool(
        np.allclose(spacing, other.GetSpacing(), rtol=0.0, atol=tolerance)
        and np.allclose(image.GetOrigin(), other.GetOrigin(), rtol=0.0, atol=tolerance)
        and np.allclose(image.GetDirection(), other.GetDirection(), rtol=0.0, atol=_DIRECTION_TOLERANCE)
    )


def _require_same_geometry(reference: sitk.Image, image: sitk.Image, what: str) -> None:
    if not _same_geometry(reference, image):
        raise GeometryMismatchError(
            f"{what} does not share the reference image's grid (size {image.GetSize()} vs "
            f"{reference.GetSize()}, spacing {image.GetSpacing()} vs {reference.GetSpacing()}, origin "
            f"{image.GetOrigin()} vs {reference.GetOrigin()}, or direction differ); resample it onto the "
            "reference grid first (nearest-neighbour for labels)."
        )


def _require_3d(image: sitk.Image, what: str, components: int = 1) -> None:
    if image.GetDimension() != 3:
        raise ValueError(f"{what} must be a 3-D image, got {image.GetDimension()}-D.")
    if image.GetNumberOfComponentsPerPixel() != components:
        found = image.GetNumberOfComponentsPerPixel()
        raise ValueError(f"{what} must have {components} component(s) per voxel, got {found}.")


def _scalar_array(image: sitk.Image, what: str, box: tuple[slice, ...] = ()) -> np.ndarray:
    """Scalar image (or its ``box`` crop) as a new float64 array, shape (z, y, x)."""
    _require_3d(image, what)
    return sitk.GetArrayViewFromImage(image)[box].astype(np.float64)


def _mask_array(mask: sitk.Image | None, reference: sitk.Image) -> np.ndarray:
    """Boolean region of evaluation, shape (z, y, x): non-zero voxels of ``mask``, everything if None."""
    if mask is None:
        return np.ones(reference.GetSize()[::-1], dtype=bool)
    _require_same_geometry(reference, mask, "mask")
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise DaregError("The evaluation mask is empty: give a mask with non-zero voxels, or no mask.")
    return inside


def _label_array(image: sitk.Image, what: str) -> np.ndarray:
    """Label map as a non-negative int64 array, shape (z, y, x); float label maps must hold integers."""
    _require_3d(image, what)
    values = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{what} holds non-integer values: it is not a label map.")
    if np.issubdtype(values.dtype, np.unsignedinteger):
        return values  # already valid ids; no copy (a full-size CT label map is ~80 M voxels)
    if values.size and values.min() < 0:
        raise ValueError(f"{what} holds negative label ids; label ids must be >= 0 (0 = background).")
    return values.astype(np.int64)


def _present_ids(*label_arrays: np.ndarray) -> set[int]:
    """Non-background ids present in any of the arrays (bincount: linear time, no sort)."""
    present: set[int] = set()
    for values in label_arrays:
        present.update(int(i) for i in np.flatnonzero(np.bincount(values.ravel())) if i != 0)
    return present


def _resolve_ids(labels: Iterable[int] | None, *label_arrays: np.ndarray) -> list[int]:
    """Requested label ids (sorted, unique), or the union of ids present when ``labels`` is None."""
    if labels is None:
        return sorted(_present_ids(*label_arrays))
    ids = sorted({int(i) for i in labels})
    if any(i <= 0 for i in ids):
        raise ValueError(f"label ids must be positive (0 is background), got {ids}.")
    return ids


def _counts(values: np.ndarray, ids: list[int]) -> np.ndarray:
    """Voxel count of each id in ``ids``, shape (len(ids),); 0 for ids beyond the array's maximum."""
    histogram = np.bincount(values.ravel(), minlength=max(ids, default=0) + 1)
    return histogram[ids]


# --------------------------------------------------------------------------------------------------
# Intensity similarity
# --------------------------------------------------------------------------------------------------


def ncc(a: sitk.Image, b: sitk.Image, *, mask: sitk.Image | None = None) -> float:
    """Global normalised cross-correlation (Pearson r) of two images over a region.

    Both the numerator and the norms are centred, so ``ncc(a, a) == 1`` and ``ncc(a, 2a + 5) == 1``
    for any non-constant ``a`` (the original DDMR metric used uncentred norms and stayed below 1).

    Parameters
    ----------
    a, b : sitk.Image
        Scalar 3-D images on the same grid (``b`` typically the warped moving image).
    mask : sitk.Image, optional
        Region of evaluation (non-zero voxels), on the same grid; whole image if None.

    Returns
    -------
    float
        r in [-1, 1]; NaN when either image is constant over the region (r is undefined).
    """
    _require_same_geometry(a, b, "second image")
    inside = _mask_array(mask, a)
    x = _scalar_array(a, "first image")[inside]
    y = _scalar_array(b, "second image")[inside]
    x -= x.mean()
    y -= y.mean()
    norm = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / norm if norm > 0.0 else math.nan


def ssim(a: sitk.Image, b: sitk.Image, *, mask: sitk.Image | None = None, sigma_voxels: float = 1.5) -> float:
    """Mean 3-D structural similarity (Wang et al. 2004) with a Gaussian window.

    Local means, variances and covariance are Gaussian-weighted averages over the region only
    (normalised convolution: each window is renormalised by the weight it has inside the mask and
    inside the image), so voxels outside the mask never influence the result and image borders need
    no padding convention. ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L`` the intensity range of
    ``a`` (the fixed image) over the region: the fixed image defines the dynamic range because it is
    the one that does not change between methods being compared.

    Parameters
    ----------
    a, b : sitk.Image
        Scalar 3-D images on the same grid; ``a`` is the fixed image.
    mask : sitk.Image, optional
        Region of evaluation (non-zero voxels), same grid; whole image if None.
    sigma_voxels : float
        Gaussian window standard deviation in voxels of ``a``'s grid (truncated at 3.5 sigma).

    Returns
    -------
    float
        Mean SSIM over the region's voxels, 1 for identical images; NaN when ``a`` is constant over
        the region (no dynamic range: SSIM is undefined).
    """
    _require_same_geometry(a, b, "second image")
    if sigma_voxels <= 0:
        raise ValueError(f"sigma_voxels must be positive, got {sigma_voxels}.")
    inside = _mask_array(mask, a)
    # Nothing outside the mask contributes, so cropping to its bounding box changes no value and
    # saves memory on full-resolution CT.
    box = ndimage.find_objects(inside.astype(np.uint8))[0]
    inside = inside[box]
    x = _scalar_array(a, "first image", box)
    y = _scalar_array(b, "second image", box)
    data_range = float(np.ptp(x[inside]))
    if data_range == 0.0:
        return math.nan
    weights = inside.astype(np.float64)
    x *= weights
    y *= weights

    def window_sum(values: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(values, sigma_voxels, mode="constant", truncate=_SSIM_TRUNCATE)

    # Renormalised windows: dividing by the window's weight inside the region makes these true local
    # averages (x and y are already zero outside it).
    normaliser = window_sum(weights)
    normaliser[~inside] = 1.0
    mean_x = window_sum(x) / normaliser
    mean_y = window_sum(y) / normaliser
    var_x = window_sum(x * x) / normaliser - mean_x**2
    var_y = window_sum(y * y) / normaliser - mean_y**2
    cov_xy = window_sum(x * y) / normaliser - mean_x * mean_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map[inside].mean())


def intensity_metrics(
    fixed: sitk.Image, warped: sitk.Image, *, mask: sitk.Image | None = None
) -> dict[str, float]:
    """NCC, SSIM and mean squared error (image units squared, e.g. HU^2) of fixed vs warped moving.

    Parameters
    ----------
    fixed, warped : sitk.Image
        Scalar 3-D images on the fixed grid.
    mask : sitk.Image, optional
        Region of evaluation (non-zero voxels), same grid; whole image if None.

    Returns
    -------
    dict
        ``{"ncc": float, "ssim": float, "mse": float}``.
    """
    _require_same_geometry(fixed, warped, "warped image")
    inside = _mask_array(mask, fixed)
    difference = _scalar_array(fixed, "fixed image")[inside] - _scalar_array(warped, "warped image")[inside]
    return {
        "ncc": ncc(fixed, warped, mask=mask),
        "ssim": ssim(fixed, warped, mask=mask),
        "mse": float(np.mean(difference**2)),
    }


# --------------------------------------------------------------------------------------------------
# Label overlap and surface distances
# --------------------------------------------------------------------------------------------------


def dice(
    fixed_labels: sitk.Image, warped_labels: sitk.Image, *, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice similarity coefficient per label, ``2 |F & W| / (|F| + |W|)``.

    Parameters
    ----------
    fixed_labels, warped_labels : sitk.Image
        Integer label maps on the same grid (0 = background, never scored).
    labels : iterable of int, optional
        Label ids to score; default: every non-zero id present in either image.

    Returns
    -------
    dict[int, float]
        Label id -> DSC in [0, 1]. A label absent from one image scores 0; a label absent from both
        is NaN (undefined: there is nothing to overlap), and must be excluded from means.
    """
    _require_same_geometry(fixed_labels, warped_labels, "warped label map")
    fixed = _label_array(fixed_labels, "fixed label map")
    warped = _label_array(warped_labels, "warped label map")
    ids = _resolve_ids(labels, fixed, warped)
    if not ids:
        return {}
    both = _counts(fixed[fixed == warped], ids)
    total = _counts(fixed, ids) + _counts(warped, ids)
    return {
        label: (2.0 * float(b) / float(t) if t > 0 else math.nan)
        for label, b, t in zip(ids, both, total, strict=True)
    }


def _surface(region: np.ndarray) -> np.ndarray:
    """Voxels of ``region`` with a face neighbour outside it (voxels on the image border included)."""
    faces = ndimage.generate_binary_structure(3, 1)
    interior = ndimage.binary_erosion(region, structure=faces, border_value=0)
    return region & ~interior


def _surface_distances(first: np.ndarray, second: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Pooled distances (mm) from each surface voxel of one region to the other region's surface.

    Nearest-neighbour queries in a k-d tree of the other surface's voxel centres (in mm): the same
    distances as a Euclidean distance transform, but the cost grows with the surface area rather than
    the volume, which matters for a liver at full CT resolution.
    """
    points_first = np.argwhere(_surface(first)) * spacing_zyx
    points_second = np.argwhere(_surface(second)) * spacing_zyx
    to_second = cKDTree(points_second).query(points_first)[0]
    to_first = cKDTree(points_first).query(points_second)[0]
    return np.concatenate([to_second, to_first])


def _require_orthonormal_direction(image: sitk.Image) -> None:
    # An orthonormal direction matrix preserves lengths, so distances computed on the spacing-scaled
    # index grid are physical distances; a sheared grid would need the full metric tensor.
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_DIRECTION_TOLERANCE):
        raise ValueError("surface distances need an orthonormal direction matrix; resample the image first.")


def hausdorff(
    fixed_labels: sitk.Image, warped_labels: sitk.Image, *, labels: Iterable[int] | None = None
) -> dict[int, dict[str, float]]:
    """Symmetric Hausdorff distance and its 95th percentile per label, in mm.

    Distances are Euclidean distances between surface voxels (voxels of the label with a face
    neighbour outside it), found exactly by nearest-neighbour queries between the two surfaces'
    voxel centres on the spacing-scaled grid (``scipy.spatial.cKDTree``): physical, because the
    direction matrix is a rotation and rotations keep lengths.

    ``hd`` is the largest surface distance in either direction. ``hd95`` is the 95th percentile of
    the POOLED symmetric surface distances (fixed->warped and warped->fixed distances in one set, as
    in medpy's ``hd95``), not the maximum of the two directed percentiles.

    Parameters
    ----------
    fixed_labels, warped_labels : sitk.Image
        Integer label maps on the same grid (0 = background).
    labels : iterable of int, optional
        Label ids to score; default: every non-zero id present in either image.

    Returns
    -------
    dict[int, dict[str, float]]
        Label id -> ``{"hd": mm, "hd95": mm}``. A label empty in exactly one image gives ``inf`` (no
        surface to reach); empty in both gives NaN (undefined).
    """
    _require_same_geometry(fixed_labels, warped_labels, "warped label map")
    _require_orthonormal_direction(fixed_labels)
    fixed = _label_array(fixed_labels, "fixed label map")
    warped = _label_array(warped_labels, "warped label map")
    ids = _resolve_ids(labels, fixed, warped)
    spacing_zyx = np.asarray(fixed_labels.GetSpacing(), dtype=float)[::-1]
    return {label: _label_hausdorff(fixed, warped, label, spacing_zyx) for label in ids}


def _label_hausdorff(
    fixed: np.ndarray, warped: np.ndarray, label: int, spacing_zyx: np.ndarray
) -> dict[str, float]:
    in_fixed, in_warped = fixed == label, warped == label
    has_fixed, has_warped = bool(in_fixed.any()), bool(in_warped.any())
    if not (has_fixed or has_warped):
        return {"hd": math.nan, "hd95": math.nan}
    if not (has_fixed and has_warped):
        return {"hd": math.inf, "hd95": math.inf}
    # Both surfaces, hence every nearest-surface point, lie in the union's bounding box: cropping
    # to it gives the same distances at a fraction of the cost.
    box = ndimage.find_objects((in_fixed | in_warped).astype(np.uint8))[0]
    distances = _surface_distances(in_fixed[box], in_warped[box], spacing_zyx)
    return {"hd": float(distances.max()), "hd95": float(np.percentile(distances, 95))}


# --------------------------------------------------------------------------------------------------
# Target registration error
# --------------------------------------------------------------------------------------------------


def label_centroids(labels: sitk.Image, *, labels_ids: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """Physical centroid (unweighted mean of voxel centres) of each label.

    Parameters
    ----------
    labels : sitk.Image
        Integer label map (0 = background), any geometry.
    labels_ids : iterable of int, optional
        Ids to return; default: every non-zero id present.

    Returns
    -------
    dict[int, np.ndarray]
        Label id -> centroid, shape (3,), LPS mm; all-NaN for a requested id that is absent.
    """
    values = _label_array(labels, "label map")
    ids = _resolve_ids(labels_ids, values)
    centroids = {label: np.full(3, math.nan) for label in ids}
    # SimpleITK's shape statistics give physical (LPS mm) centroids of voxel centres directly,
    # multi-threaded: ~10x faster than scipy's center_of_mass on a full-size CT.
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.ComputeOrientedBoundingBoxOff()
    image = labels if np.issubdtype(values.dtype, np.unsignedinteger) else sitk.Cast(labels, sitk.sitkUInt32)
    stats.Execute(image)
    centroids.update({label: np.asarray(stats.GetCentroid(label)) for label in ids if stats.HasLabel(label)})
    return centroids


def _map_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) LPS mm mapped through ``transform`` (every component of a composite)."""
    if transform.GetDimension() != 3:
        raise ValueError(f"transform must be 3-D, got {transform.GetDimension()}-D.")
    mapped = [transform.TransformPoint(tuple(float(c) for c in point)) for point in points]
    return np.array(mapped, dtype=float).reshape(-1, 3)


def landmark_tre(
    fixed_points: np.ndarray, moving_points: np.ndarray, transform: sitk.Transform
) -> np.ndarray:
    """Target registration error of corresponding landmarks, ``||T(p_fixed) - p_moving||``.

    Parameters
    ----------
    fixed_points, moving_points : np.ndarray
        Corresponding points, shape (N, 3), LPS mm (ITK physical space).
    transform : sitk.Transform
        The full registration transform, fixed -> moving (resampling convention).

    Returns
    -------
    np.ndarray
        Shape (N,), mm.
    """
    fixed_points = np.asarray(fixed_points, dtype=float)
    moving_points = np.asarray(moving_points, dtype=float)
    if fixed_points.ndim != 2 or fixed_points.shape[1] != 3 or fixed_points.shape != moving_points.shape:
        raise ValueError(
            "landmarks must be two (N, 3) arrays of equal shape, "
            f"got {fixed_points.shape} and {moving_points.shape}."
        )
    return np.linalg.norm(_map_points(transform, fixed_points) - moving_points, axis=1)


def centroid_tre(
    fixed_labels: sitk.Image,
    moving_labels: sitk.Image,
    transform: sitk.Transform,
    *,
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Centroid TRE per label: ``||T(c_fixed) - c_moving||`` in mm.

    The fixed label centroid is mapped through the registration transform (fixed -> moving; the
    full composed transform, affine and deformable parts alike) and compared with the centroid of
    the same label in the moving image. This is approximate for non-rigid motion: a centroid is not
    a material point, so even a perfect non-rigid registration need not map one centroid exactly
    onto the other. Landmark TRE (:func:`landmark_tre`) is exact.

    Parameters
    ----------
    fixed_labels : sitk.Image
        Integer label map in the fixed space.
    moving_labels : sitk.Image
        Integer label map in the moving space (its own geometry; not resampled).
    transform : sitk.Transform
        The registration transform, fixed -> moving.
    labels : iterable of int, optional
        Ids to score; default: every non-zero id present in either image.

    Returns
    -------
    dict[int, float]
        Label id -> mm; NaN when the label is absent from either image (undefined).
    """
    ids = _resolve_ids(
        labels, _label_array(fixed_labels, "fixed label map"), _label_array(moving_labels, "moving label map")
    )
    fixed_centroids = label_centroids(fixed_labels, labels_ids=ids)
    moving_centroids = label_centroids(moving_labels, labels_ids=ids)
    scored = [
        label
        for label in ids
        if np.isfinite(fixed_centroids[label]).all() and np.isfinite(moving_centroids[label]).all()
    ]
    errors = landmark_tre(
        np.array([fixed_centroids[label] for label in scored]).reshape(-1, 3),
        np.array([moving_centroids[label] for label in scored]).reshape(-1, 3),
        transform,
    )
    result = {label: math.nan for label in ids}
    result.update({label: float(error) for label, error in zip(scored, errors, strict=True)})
    return result


# --------------------------------------------------------------------------------------------------
# Jacobian determinant of a displacement field
# --------------------------------------------------------------------------------------------------


def _jacobian_determinant_array(field: sitk.Image) -> np.ndarray:
    """det(I + dd/dx) at every voxel, shape (z, y, x), with physical derivatives.

    SimpleITK's DisplacementFieldJacobianDeterminantFilter scales by the spacing but ignores the
    direction cosines (checked numerically: on an oblique grid a linear field d = A x does not give
    det(I + A)), so the chain rule is applied here: dd/dx = (dd/di) M^-1 with M = direction @
    diag(spacing). Derivatives are central differences inside, one-sided at the borders.
    """
    _require_3d(field, "displacement field", components=3)
    if min(field.GetSize()) < 2:
        raise ValueError(f"displacement field needs >= 2 voxels along each axis, got size {field.GetSize()}.")
    vectors = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3), LPS mm
    matrix, _ = index_to_physical_matrix(field)
    inverse = np.linalg.inv(matrix)
    depth, rows, columns = vectors.shape[:3]
    determinant = np.empty((depth, rows, columns), dtype=np.float64)
    step = max(1, _JACOBIAN_CHUNK_VOXELS // (rows * columns))
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        # One halo slice each side so the slab's own slices get the same central differences as
        # the whole volume would; the halo's results are discarded.
        low, high = max(start - 1, 0), min(stop + 1, depth)
        slab = np.asarray(vectors[low:high], dtype=np.float64)
        # Array axes 2, 1, 0 are index axes i, j, k: gradient[..., c, a] = d(d_c)/d(index_a).
        gradient = np.stack(np.gradient(slab, axis=(2, 1, 0)), axis=-1)[start - low : stop - low]
        determinant[start:stop] = _det3(np.eye(3) + gradient @ inverse)
    return determinant


def _det3(m: np.ndarray) -> np.ndarray:
    """Determinants of stacked 3x3 matrices, shape (..., 3, 3) -> (...).

    Cofactor expansion: several times faster than ``np.linalg.det``'s per-matrix LU on millions of
    voxels, and exact enough for 3x3.
    """
    return (
        m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
        - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
        + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
    )


def jacobian_determinant(field: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``x -> x + d(x)`` as a float64 image on the field's grid.

    Parameters
    ----------
    field : sitk.Image
        Displacement field, 3-component vector image, vectors in LPS mm (``T(x) = x + d(x)``).

    Returns
    -------
    sitk.Image
        det(J) per voxel: 1 = volume preserved, < 1 compression, <= 0 folding.
    """
    determinant = sitk.GetImageFromArray(_jacobian_determinant_array(field))
    determinant.CopyInformation(field)
    return determinant


def jacobian_stats(field: sitk.Image, *, mask: sitk.Image | None = None) -> dict[str, float]:
    """Folding and smoothness statistics of a displacement field's Jacobian determinant.

    Parameters
    ----------
    field : sitk.Image
        Displacement field (3-component vector image, LPS mm, resampling convention).
    mask : sitk.Image, optional
        Region of evaluation on the field's grid (non-zero voxels); whole field if None.

    Returns
    -------
    dict[str, float]
        ``fraction_nonpositive``: fraction of voxels with det <= 0 (folding);
        ``sdlogj``: standard deviation of ``log(max(det, LOGJ_FLOOR))`` (floor 1e-6: folded voxels
        count as strong outliers rather than being dropped);
        ``min``, ``max``, ``mean``: of det over the region.
    """
    values = _jacobian_determinant_array(field)[_mask_array(mask, field)]
    return {
        "fraction_nonpositive": float(np.mean(values <= 0.0)),
        "sdlogj": float(np.std(np.log(np.maximum(values, LOGJ_FLOOR)))),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------


def _mean_defined(values: Iterable[float]) -> float:
    """Mean of the non-NaN values (inf propagates: an unreachable surface is a real failure); NaN if none."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _label_metrics(
    fixed_image: sitk.Image,
    fixed_labels: sitk.Image,
    warped_labels: sitk.Image | None,
    moving_labels: sitk.Image | None,
    transform: sitk.Transform | None,
    label_names: dict[int, str],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-label metrics keyed by name (or id as text) and their means over defined labels."""
    _require_same_geometry(fixed_image, fixed_labels, "fixed label map")
    arrays = [_label_array(fixed_labels, "fixed label map")]
    per_metric: dict[str, dict[int, float]] = {}
    if warped_labels is not None:
        _require_same_geometry(fixed_image, warped_labels, "warped label map")
        arrays.append(_label_array(warped_labels, "warped label map"))
    if moving_labels is not None:
        arrays.append(_label_array(moving_labels, "moving label map"))
    ids = sorted(_present_ids(*arrays))
    if warped_labels is not None:
        per_metric["dice"] = dice(fixed_labels, warped_labels, labels=ids)
        distances = hausdorff(fixed_labels, warped_labels, labels=ids)
        per_metric["hd"] = {label: d["hd"] for label, d in distances.items()}
        per_metric["hd95"] = {label: d["hd95"] for label, d in distances.items()}
    if moving_labels is not None:
        per_metric["centroid_tre"] = centroid_tre(fixed_labels, moving_labels, transform, labels=ids)
    table = {
        label_names.get(label, str(label)): {name: values[label] for name, values in per_metric.items()}
        for label in ids
    }
    means = {name: _mean_defined(values.values()) for name, values in per_metric.items()}
    return table, means


def registration_metrics(
    *,
    fixed_image: sitk.Image,
    warped_image: sitk.Image | None,
    fixed_labels: sitk.Image | None = None,
    warped_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    transform: sitk.Transform | None = None,
    field: sitk.Image | None = None,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    roi_mask: sitk.Image | None = None,
) -> dict:
    """Every metric the given inputs allow, as a JSON-friendly nested dict (mm, NaN kept as NaN).

    Parameters
    ----------
    fixed_image, warped_image : sitk.Image
        Fixed image and moving image warped onto the fixed grid; ``warped_image=None`` skips the
        intensity metrics (the fixed image then only defines the grid the label maps must share).
    fixed_labels, warped_labels : sitk.Image, optional
        Label maps on the fixed grid; both give Dice and HD/HD95 per label.
    moving_labels : sitk.Image, optional
        Label map in the moving space; with ``fixed_labels`` and ``transform`` gives centroid TRE.
    transform : sitk.Transform, optional
        Full registration transform, fixed -> moving; needed for any TRE.
    field : sitk.Image, optional
        Displacement field (LPS mm) whose Jacobian is summarised.
    fixed_points, moving_points : np.ndarray, optional
        Corresponding landmarks, shape (N, 3), LPS mm; with ``transform`` give landmark TRE.
    label_names : dict[int, str], optional
        Names for label ids in the output (ids without a name appear as their number in text).
    roi_mask : sitk.Image, optional
        Region for the intensity metrics (fixed grid) and the Jacobian statistics (resampled with
        nearest neighbour onto the field's grid if that grid differs).

    Returns
    -------
    dict
        ``{"ncc", "ssim", "mse"}`` always; ``"labels": {name: {"dice", "hd", "hd95",
        "centroid_tre"}}`` and ``"labels_mean"`` (means over labels where defined) when labels are
        given; ``"landmark_tre": {"mean", "median", "max", "n"}``; ``"jacobian": {...}`` (see
        :func:`jacobian_stats`).
    """
    if warped_labels is not None and fixed_labels is None:
        raise ValueError("warped_labels needs fixed_labels to compare with.")
    if moving_labels is not None and (fixed_labels is None or transform is None):
        raise ValueError("centroid TRE from moving_labels needs fixed_labels and the registration transform.")
    if (fixed_points is None) != (moving_points is None) or (fixed_points is not None and transform is None):
        raise ValueError("landmark TRE needs fixed_points, moving_points and the registration transform.")
    result: dict = (
        {} if warped_image is None else dict(intensity_metrics(fixed_image, warped_image, mask=roi_mask))
    )
    if fixed_labels is not None:
        result["labels"], result["labels_mean"] = _label_metrics(
            fixed_image, fixed_labels, warped_labels, moving_labels, transform, label_names or {}
        )
    if fixed_points is not None:
        errors = landmark_tre(fixed_points, moving_points, transform)
        defined = errors.size > 0
        result["landmark_tre"] = {
            "mean": float(errors.mean()) if defined else math.nan,
            "median": float(np.median(errors)) if defined else math.nan,
            "max": float(errors.max()) if defined else math.nan,
            "n": int(errors.size),
        }
    if field is not None:
        field_mask = roi_mask
        if roi_mask is not None and not _same_geometry(field, roi_mask):
            field_mask = resample_to_reference(roi_mask, field, interpolation="nearest")
        result["jacobian"] = jacobian_stats(field, mask=field_mask)
    return result
