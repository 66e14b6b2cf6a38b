"""Fast rigid/affine initialisation (SimpleITK), fixed -> moving.

Why: the paper's test pairs carry up to 30 mm shifts and 10 degree rotations, more than a U-Net
trained on a 128^3 crop captures reliably. A coarse, masked intensity registration takes about a
second and leaves the network and the optimiser with the local, non-rigid part.

Modes:
- ``none``: identity.
- ``center``: translation that aligns the liver-mask centroids (both masks given) or the body
  centroids (intensity above -500 HU) otherwise.
- ``rigid`` / ``affine``: ``center`` then a Mattes mutual-information registration on images binned
  to about 3 mm, restricted to the fixed liver mask grown by 20 mm when a mask is given. ``affine``
  refines the rigid result; between scans of one patient the extra scaling and shearing mostly fit
  deformation the later stages handle better (on phantoms it ends ~1 mm further from the truth than
  ``rigid``), so ``rigid`` is the default.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dareg.geometry import AffineMap

INIT_MODES = ("none", "center", "rigid", "affine")

#: Voxel size (mm) the intensity registration runs at: fine enough for a 1-2 mm accurate start.
_WORKING_SPACING_MM = 3.0
#: Body threshold for the centroid initialisation when no mask is given.
_BODY_HU = -500.0
#: Metric samples per iteration.
_METRIC_SAMPLES = 50_000


def initial_transform(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    mode: str = "rigid",
    seed: int = 0,
) -> AffineMap:
    """Initial resampling transform fixed -> moving, as an :class:`AffineMap` (LPS mm).

    Parameters:
        fixed, moving: CT images (HU).
        fixed_mask, moving_mask: liver masks (0/1) on their images' grids, optional.
        mode: one of :data:`INIT_MODES`.
        seed: seeds the metric's random sampling, so the result is reproducible.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"initialisation mode must be one of {INIT_MODES}, got {mode!r}")
    if mode == "none":
        return AffineMap.identity()
    translation = _centroid_translation(fixed, moving, fixed_mask, moving_mask)
    if mode == "center":
        return AffineMap(np.eye(3), translation)
    rigid = _register_intensities(fixed, moving, fixed_mask, _euler_start(fixed, translation), seed=seed)
    if mode == "rigid":
        return rigid
    # Affine refines the rigid result: started from scratch, the 12 parameters drift on abdominal CT.
    return _register_intensities(fixed, moving, fixed_mask, rigid.to_sitk(), seed=seed, learning_rate=0.2)


def _euler_start(fixed: sitk.Image, translation: np.ndarray) -> sitk.Euler3DTransform:
    """A rigid transform about the fixed image's centre, starting at ``translation``."""
    centre = fixed.TransformContinuousIndexToPhysicalPoint(tuple((np.asarray(fixed.GetSize()) - 1) / 2.0))
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(map(float, centre)))
    transform.SetTranslation(tuple(map(float, translation)))
    return transform


def _centroid(mask: sitk.Image) -> np.ndarray | None:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    return np.asarray(stats.GetCentroid(1)) if stats.HasLabel(1) else None


def _centroid_translation(fixed, moving, fixed_mask, moving_mask) -> np.ndarray:
    """Translation t with T(x) = x + t mapping the fixed centroid onto the moving one (mm)."""
    if fixed_mask is not None and moving_mask is not None:
        fixed_centre, moving_centre = _centroid(fixed_mask), _centroid(moving_mask)
    else:
        fixed_centre = _centroid(_downsample(fixed) > _BODY_HU)
        moving_centre = _centroid(_downsample(moving) > _BODY_HU)
    if fixed_centre is None or moving_centre is None:
        return np.zeros(3)
    return moving_centre - fixed_centre


def _downsample(image: sitk.Image) -> sitk.Image:
    """Average-bin an image to about ``_WORKING_SPACING_MM`` voxels (cheap, no aliasing)."""
    factors = [max(1, int(round(_WORKING_SPACING_MM / s))) for s in image.GetSpacing()]
    image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _register_intensities(
    fixed, moving, fixed_mask, transform: sitk.Transform, *, seed: int, learning_rate: float = 2.0
) -> AffineMap:
    """Mattes-MI registration of ``transform``'s parameters (optimised in place) at about 3 mm."""
    fixed_small, moving_small = _downsample(fixed), _downsample(moving)

    method = sitk.ImageRegistrationMethod()
    # One thread: multi-threaded metric sums are added in a varying order and the optimiser amplifies
    # the round-off into visibly different results; the same seed must give the same transform.
    method.SetNumberOfThreads(1)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    samples = fixed_small.GetNumberOfPixels()
    if fixed_mask is not None:
        # Grow the mask on the 3 mm grid: at full CT resolution a 20 mm dilation takes seconds.
        mask_small = sitk.Resample(
            sitk.Cast(fixed_mask > 0, sitk.sitkUInt8),
            fixed_small,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )
        mask_small = sitk.BinaryDilate(
            mask_small, [max(1, int(round(20.0 / s))) for s in mask_small.GetSpacing()]
        )
        if sitk.GetArrayViewFromImage(mask_small).any():
            method.SetMetricFixedMask(mask_small)
            samples = int(sitk.GetArrayViewFromImage(mask_small).sum())
    # About 50k samples are plenty for a 6-12 parameter fit and keep the whole stage near a second.
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift every seed off it.
    method.SetMetricSamplingPercentage(min(0.5, _METRIC_SAMPLES / max(samples, 1)), seed % (2**31 - 2) + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=0.01,
        numberOfIterations=150,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed_small, moving_small)
    return AffineMap.from_sitk(transform)
