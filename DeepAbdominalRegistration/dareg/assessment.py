"""Measuring a registration result: the ONE piece of code that scores every method.

``dareg register`` (:mod:`dareg.register`) and the ANTs baseline (:mod:`dareg.baseline`) both call
:func:`assess` with the same inputs and the same kind of transforms, so their metrics.json files
compare like with like: metrics for no transform ("unregistered"), the method's linear part
("initial") and the full transform ("registered"), then :func:`worse_warnings` on the result.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from dareg import geometry, metrics
from dareg.io import LabelMap

#: A drop larger than this (NCC or Dice) counts as "registration made it worse".
_WORSE_TOLERANCE = 0.01

#: A label is reported when at least this fraction of its fixed voxels lies in the ROI box.
_INSIDE_ROI = 0.95


def assess(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_seg: LabelMap | None,
    moving_seg: LabelMap | None,
    label_ids: list[int],
    *,
    initial: sitk.Transform,
    final: sitk.Transform,
    field: sitk.Image,
    roi_box: tuple[np.ndarray, np.ndarray],
    fixed_landmarks: np.ndarray | None = None,
    moving_landmarks: np.ndarray | None = None,
) -> dict:
    """Metrics for three transforms: none ("unregistered"), ``initial`` and ``final`` ("registered").

    Parameters:
        fixed, moving: the CT images (HU) as given to the method.
        fixed_seg, moving_seg: their label maps, or None; ``label_ids`` are the labels to report.
        initial: the method's linear transform fixed -> moving (dareg: the initialisation; ANTs: its
            collapsed linear stages).
        final: the full registration transform fixed -> moving.
        field: ``final`` as a displacement field (LPS mm); its Jacobian is summarised over the ROI box.
        roi_box: continuous-index box (lower, upper), (x, y, z) order, of the fixed image: the region
            the registration was asked to align.
        fixed_landmarks, moving_landmarks: (N, 3) LPS mm, corresponding; both give landmark TRE.

    Label metrics are measured on the ROI box of the fixed image at full resolution: what the
    registration was asked to align, and affordable for a 512 x 512 x 300 CT. Labels reach into the
    report only if they lie (almost) wholly in the box, since a structure cut by the box would have a
    cut centroid; the others are listed under "labels_outside_roi".
    """
    fixed_labels, moving_labels, names, outside = _reported_labels(fixed_seg, moving_seg, label_ids, roi_box)
    stages = {
        "unregistered": sitk.Transform(3, sitk.sitkIdentity),
        "initial": initial,
        "registered": final,
    }
    has_points = fixed_landmarks is not None and moving_landmarks is not None
    grid = measurement_grid(fixed, roi_box)
    fixed_on_grid = geometry.resample_to_reference(fixed, grid.reference_image(sitk.sitkFloat32))
    report = {}
    for stage, stage_transform in stages.items():
        # NCC and SSIM on the measurement grid (the ROI at about 2 mm): at full resolution SSIM alone
        # would take ~20 s for a 512 x 512 x 300 CT, and intensity similarity needs no finer sampling.
        block = metrics.registration_metrics(
            fixed_image=fixed_on_grid,
            warped_image=geometry.resample_to_reference(
                moving, fixed_on_grid, transform=stage_transform, default_value=-1024.0
            ),
            transform=stage_transform,
            fixed_points=fixed_landmarks if has_points else None,
            moving_points=moving_landmarks if has_points else None,
        )
        if fixed_labels is not None:
            block.update(
                metrics.registration_metrics(
                    fixed_image=fixed_labels,
                    warped_image=None,
                    fixed_labels=fixed_labels,
                    warped_labels=geometry.resample_to_reference(
                        moving_labels, fixed_labels, transform=stage_transform, interpolation="nearest"
                    ),
                    moving_labels=moving_labels,
                    transform=stage_transform,
                    label_names=names,
                )
            )
        if outside:
            block["labels_outside_roi"] = outside
        report[stage] = block
    grid_on_field = sitk.Resample(
        grid.reference_image() + 1, field, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    report["registered"]["jacobian"] = metrics.jacobian_stats(field, mask=grid_on_field)
    return report


def measurement_grid(fixed: sitk.Image, roi_box: tuple[np.ndarray, np.ndarray]) -> geometry.ModelGrid:
    """Where intensity similarity and the Jacobian's region are measured: the ROI box of the fixed image
    at the default model grid's resolution (128 per axis), or at the fixed image's own where that is
    coarser.

    Why not the grid a method worked on: it depends on the method (dareg's ``--grid``, ANTs'
    ``--spacing``), and the same pair must give the same "unregistered" numbers for every method.
    For ``dareg register`` with the default grid on a CT finer than the grid, it IS the model grid.
    """
    lower, upper = roi_box
    box_voxels_zyx = np.round(np.asarray(upper) - np.asarray(lower) + 1.0).astype(int)[::-1]
    shape = np.minimum(geometry.DEFAULT_GRID_SHAPE, np.maximum(box_voxels_zyx, 1))
    return geometry.model_grid_for_box(fixed, lower, upper, tuple(int(n) for n in shape))


def _reported_labels(
    fixed_seg: LabelMap | None,
    moving_seg: LabelMap | None,
    label_ids: list[int],
    roi_box: tuple[np.ndarray, np.ndarray],
) -> tuple[sitk.Image | None, sitk.Image | None, dict[int, str], list[str]]:
    """(fixed labels cropped to the ROI box, moving labels, {id: name}, names of labels left out)."""
    if not label_ids:
        return None, None, {}, []
    lower, upper = roi_box
    start = np.floor(lower).astype(int).tolist()
    size = (np.ceil(upper).astype(int) - np.floor(lower).astype(int) + 1).tolist()
    fixed_labels_roi = sitk.RegionOfInterest(fixed_seg.image, size, start)
    inside = _fraction_inside(fixed_seg.image, fixed_labels_roi, label_ids)
    outside = [fixed_seg.names.get(i, str(i)) for i in label_ids if inside[i] < _INSIDE_ROI]
    reported = [i for i in label_ids if inside[i] >= _INSIDE_ROI]
    if not reported:
        return None, None, {}, outside
    names = {i: fixed_seg.names.get(i, moving_seg.names.get(i, str(i))) for i in reported}
    return _keep_labels(fixed_labels_roi, reported), _keep_labels(moving_seg.image, reported), names, outside


def _fraction_inside(labels: sitk.Image, labels_roi: sitk.Image, label_ids: list[int]) -> dict[int, float]:
    """Per label: voxels in the ROI crop / voxels in the whole image."""
    total = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=max(label_ids) + 1)
    inside = np.bincount(sitk.GetArrayViewFromImage(labels_roi).ravel(), minlength=max(label_ids) + 1)
    return {i: float(inside[i]) / max(float(total[i]), 1.0) for i in label_ids}


def _keep_labels(labels: sitk.Image, label_ids: list[int]) -> sitk.Image:
    array = sitk.GetArrayFromImage(labels)
    kept = sitk.GetImageFromArray(np.where(np.isin(array, label_ids), array, 0).astype(array.dtype))
    kept.CopyInformation(labels)
    return kept


def worse_warnings(report: dict) -> list[str]:
    """Human-readable warnings when registration made things worse than doing nothing."""
    before, after = report["unregistered"], report["registered"]
    warnings = []
    if after["ncc"] < before["ncc"] - _WORSE_TOLERANCE:
        warnings.append(f"image similarity dropped: NCC {before['ncc']:.3f} -> {after['ncc']:.3f}")
    for name, values in after.get("labels", {}).items():
        was, now = before["labels"][name].get("dice", math.nan), values.get("dice", math.nan)
        if not math.isnan(was) and not math.isnan(now) and now < was - _WORSE_TOLERANCE:
            warnings.append(f"Dice of {name} dropped: {was:.3f} -> {now:.3f}")
    if "landmark_tre" in after and after["landmark_tre"]["mean"] > before["landmark_tre"]["mean"]:
        warnings.append(
            f"landmark TRE grew: {before['landmark_tre']['mean']:.2f} -> "
            f"{after['landmark_tre']['mean']:.2f} mm"
        )
    folding = after.get("jacobian", {}).get("fraction_nonpositive", 0.0)
    if folding > 0:
        warnings.append(
            f"the transform folds: {100 * folding:.2g}% of the ROI's voxels have a Jacobian determinant <= 0"
        )
    return warnings
