"""The inference pipeline: ``register(fixed, moving, ...)`` -> one :class:`RegistrationResult`.

Stages (each timed, each reported to ``progress(fraction, stage)``):
1. validate: the images overlap physically; masks are neither empty nor everything;
2. initialise: rigid/affine fixed -> moving (:mod:`dareg.initialize`);
3. ROI and model grid: liver masks (fixed, and moving through the initial transform) + margin;
4. resample fixed and (affinely aligned) moving onto the model grid, window HU to [0, 1];
5. network (if a model is given): flow on the model grid;
6. instance optimisation (if steps > 0): refine the flow (NCC, + Dice when both segmentations are given);
7. compose ONE resampling transform fixed -> moving: a displacement field over the whole fixed image;
8. warp the moving image (linear) and its label map (nearest) at the fixed image's full resolution;
9. metrics before (unregistered), after the initial transform, and after registration
   (:mod:`dareg.assessment`); warnings when registration made similarity or Dice worse or the field folds.

Validation (:func:`check_inputs`), stage timing (:class:`StageClock`) and the warp
(:func:`apply_transform`) are public and the metrics live in :mod:`dareg.assessment`: the ANTs
baseline (:mod:`dareg.baseline`) runs them unchanged, so both methods validate, time, warp and are
measured by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from dareg import geometry, initialize
from dareg.assessment import assess, worse_warnings
from dareg.errors import DaregError
from dareg.io import LabelMap

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class RegistrationOptions:
    """What to run; every field has the default a clinician gets from ``dareg register``.

    Parameters:
        model: bundled model name, model folder, "none" (affine + instance optimisation only) or
            "default" (best bundled model, or none while no model is bundled).
        optimize_steps: instance-optimisation steps (0 = off).
        init: initialisation mode, one of :data:`dareg.initialize.INIT_MODES`.
        grid_shape: model grid (z, y, x) when no model fixes it.
        margin_mm: ROI margin around the liver masks.
        liver_label: id or segment name of the liver in both segmentations.
        labels: label ids/names that guide optimisation and are reported; None = all labels present in
            both segmentations.
        device: "auto", "cpu" or "gpu".
        seed: seeds every random draw (initialisation sampling).
    """

    model: str | None = "default"
    optimize_steps: int = 50
    init: str = "rigid"
    grid_shape: tuple[int, int, int] = geometry.DEFAULT_GRID_SHAPE
    margin_mm: float = geometry.DEFAULT_MARGIN_MM
    liver_label: int | str = 1
    labels: tuple[int | str, ...] | None = None
    device: str = "auto"
    seed: int = 0


@dataclass
class RegistrationResult:
    """Everything a registration produces, in memory (``dareg.outputs`` writes it to disk).

    ``field`` is the resampling displacement field fixed -> moving (LPS mm) over the whole fixed
    image, ``transform`` the same as a SimpleITK transform; ``metrics`` holds "unregistered",
    "initial" and "registered" blocks, ``warnings`` what went worse. ``grid`` is where the method
    worked (the model grid; ANTs' working grid), ``method`` which method made the result ("dareg",
    "ants-SyN", ...) and ``model_name`` what exactly ran (a model design, "none", an ANTs version).
    """

    field: sitk.Image
    transform: sitk.DisplacementFieldTransform
    warped_image: sitk.Image
    warped_labels: LabelMap | None
    mapped_landmarks: np.ndarray | None
    metrics: dict
    timings: dict[str, float]
    warnings: list[str]
    grid: geometry.ModelGrid
    model_name: str
    method: str = "dareg"


@dataclass
class StageClock:
    """Times named stages (``timings`` in seconds, plus "total") and reports each start to ``progress``."""

    progress: ProgressCallback | None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str, fraction: float) -> Iterator[None]:
        if self.progress is not None:
            self.progress(fraction, name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)

    def finish(self) -> dict[str, float]:
        """Record the total time, report completion; returns the timings."""
        self.timings["total"] = round(time.perf_counter() - self.started, 3)
        if self.progress is not None:
            self.progress(1.0, "done")
        return self.timings


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_seg: LabelMap | None = None,
    moving_seg: LabelMap | None = None,
    *,
    options: RegistrationOptions = RegistrationOptions(),
    fixed_landmarks: np.ndarray | None = None,
    moving_landmarks: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see the module docstring for the stages.

    Parameters:
        fixed, moving: 3-D CT images (HU), any geometry.
        fixed_seg, moving_seg: label maps on their images' grids (optional; the liver label drives the
            ROI and initialisation, every guided label the optimisation and the metrics).
        fixed_landmarks, moving_landmarks: (N, 3) LPS mm; fixed ones are mapped into moving space,
            with both the landmark TRE is reported.
    """
    clock = StageClock(progress)
    with clock.stage("validate", 0.0):
        checked = check_inputs(
            fixed, moving, fixed_seg, moving_seg, liver_label=options.liver_label, labels=options.labels
        )
        moving_seg = checked.moving_seg
    with clock.stage("initialise", 0.05):
        affine = initialize.initial_transform(
            fixed,
            moving,
            fixed_mask=checked.fixed_mask,
            moving_mask=checked.moving_mask,
            mode=options.init,
            seed=options.seed,
        )
    with clock.stage("load model", 0.12):
        loaded = _load_model(options)
    grid_shape = tuple(loaded.config.grid_shape) if loaded is not None else tuple(options.grid_shape)
    with clock.stage("model grid", 0.15):
        lower, upper = geometry.roi_index_box(
            fixed,
            fixed_mask=checked.fixed_mask,
            moving_mask=checked.moving_mask,
            moving_to_fixed=affine.inverse_sitk(),
            margin_mm=options.margin_mm,
        )
        grid = geometry.model_grid_for_box(fixed, lower, upper, grid_shape)
        window = (
            geometry.window_from_normalisation(loaded.config.normalisation)
            if loaded
            else geometry.CT_WINDOW_HU
        )
        fixed_grid = geometry.normalize_ct(
            geometry.resample_to_grid(fixed, grid, default_value=-1024.0), window
        )
        moving_grid = geometry.normalize_ct(
            geometry.resample_to_grid(moving, grid, transform=affine.to_sitk(), default_value=-1024.0), window
        )
    flow = None
    if loaded is not None:
        with clock.stage("network", 0.25):
            flow = _predict(loaded, fixed_grid, moving_grid, options.device)
    taper = geometry.taper_weights(grid, width_mm=min(options.margin_mm, 20.0))
    with clock.stage("instance optimisation", 0.35):
        fixed_labels = moving_labels = None
        if checked.label_ids and options.optimize_steps > 0:
            fixed_labels = _labels_on_grid(fixed_seg, checked.label_ids, grid, None)
            moving_labels = _labels_on_grid(moving_seg, checked.label_ids, grid, affine.to_sitk())
        flow = _optimise(
            fixed_grid, moving_grid, fixed_labels, moving_labels, flow, grid, taper, options, progress
        )
    return finish_registration(
        clock,
        Pair(fixed, moving, fixed_seg, moving_seg, fixed_landmarks, moving_landmarks),
        checked.label_ids,
        grid=grid,
        roi_box=(lower, upper),
        affine=affine,
        displacement_mm=geometry.flow_to_displacement_mm(flow, grid),
        model_name=loaded.config.design if loaded is not None else "none",
        method="dareg",
    )


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """The inputs every method registers and is measured on (segmentations/landmarks optional)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_seg: LabelMap | None
    moving_seg: LabelMap | None
    fixed_landmarks: np.ndarray | None
    moving_landmarks: np.ndarray | None


def finish_registration(
    clock: StageClock,
    pair: Pair,
    label_ids: list[int],
    *,
    grid: geometry.ModelGrid,
    roi_box: tuple[np.ndarray, np.ndarray],
    affine: geometry.AffineMap,
    displacement_mm: np.ndarray,
    model_name: str,
    method: str,
) -> RegistrationResult:
    """The common end of every method: ONE field T(x) = A(x + d(x)), full-resolution warps, assessment.

    Sharing it is what makes the deep and the ANTs results comparable: same field format, same warps,
    same metrics and warnings.
    """
    with clock.stage("compose transform", 0.8):
        field_image = geometry.compose_displacement_field(pair.fixed, grid, affine, displacement_mm)
        transform = geometry.displacement_field_transform(field_image)
    with clock.stage("warp", 0.85):
        warped_image, warped_labels, mapped = apply_transform(
            transform, pair.fixed, pair.moving, pair.moving_seg, pair.fixed_landmarks
        )
    with clock.stage("metrics", 0.9):
        report = assess(
            pair.fixed,
            pair.moving,
            pair.fixed_seg,
            pair.moving_seg,
            label_ids,
            initial=affine.to_sitk(),
            final=transform,
            field=field_image,
            roi_box=roi_box,
            fixed_landmarks=pair.fixed_landmarks,
            moving_landmarks=pair.moving_landmarks,
        )
    return RegistrationResult(
        field=field_image,
        transform=transform,
        warped_image=warped_image,
        warped_labels=warped_labels,
        mapped_landmarks=mapped,
        metrics=report,
        timings=clock.finish(),
        warnings=worse_warnings(report),
        grid=grid,
        model_name=model_name,
        method=method,
    )


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_inputs` found: liver masks (0/1, on their images' grids), the labels to use and
    the moving label map renumbered so that segments of the same name share the fixed map's ids."""

    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_ids: list[int]
    moving_seg: LabelMap | None


def check_inputs(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_seg: LabelMap | None,
    moving_seg: LabelMap | None,
    *,
    liver_label: int | str,
    labels: tuple[int | str, ...] | None,
) -> CheckedInputs:
    """Refuse inputs no method can register (:class:`DaregError` saying what to do); extract the masks.

    ``labels`` are the ids/names to guide and report (None = all labels present in both
    segmentations); the liver label is always among them.
    """
    _check_overlap(fixed, moving)
    if fixed_seg is not None and moving_seg is not None:
        moving_seg = moving_seg.with_ids_of(fixed_seg)  # pair segments by name, not by label value
    return CheckedInputs(
        fixed_mask=_liver_mask(fixed_seg, liver_label, "fixed") if fixed_seg else None,
        moving_mask=_liver_mask(moving_seg, liver_label, "moving") if moving_seg else None,
        label_ids=_guided_labels(fixed_seg, moving_seg, labels, liver_label),
        moving_seg=moving_seg,
    )


def _check_overlap(fixed: sitk.Image, moving: sitk.Image) -> None:
    if geometry.physical_overlap(fixed, moving) == 0.0 and geometry.physical_overlap(moving, fixed) == 0.0:
        raise DaregError(
            "The fixed and moving images do not overlap in physical space (LPS mm): their origins or "
            "orientations put them in different places. Check that both files carry correct geometry "
            "(e.g. re-export them from the scanner or from 3D Slicer), or align them roughly first."
        )


def _liver_mask(seg: LabelMap, liver_label: int | str, which: str) -> sitk.Image:
    if not seg.label_ids():
        raise DaregError(
            f"The {which} segmentation is empty (no labelled voxel). Give a segmentation that "
            "contains the liver, or leave it out to register the whole field of view."
        )
    label_id = seg.resolve(liver_label)
    mask = seg.mask([label_id])
    stats = sitk.StatisticsImageFilter()
    stats.Execute(mask)
    count, total = stats.GetSum(), mask.GetNumberOfPixels()
    if count == 0:
        raise DaregError(
            f"The {which} segmentation has no voxel with the liver label {liver_label!r} (id {label_id}). "
            f"Pick the liver with --liver-label (ids/names present: {_describe(seg)})."
        )
    if count == total:
        raise DaregError(
            f"The {which} segmentation's liver label {liver_label!r} covers the whole image, which is not a "
            "liver segmentation. Check that the right file and --liver-label were given."
        )
    return mask


def _describe(seg: LabelMap) -> str:
    return ", ".join(f"{i} ({seg.names[i]})" if i in seg.names else str(i) for i in seg.label_ids())


def _guided_labels(
    fixed_seg: LabelMap | None,
    moving_seg: LabelMap | None,
    labels: tuple[int | str, ...] | None,
    liver_label: int | str,
) -> list[int]:
    """Label ids shared by both segmentations that guide optimisation and are reported."""
    if fixed_seg is None or moving_seg is None:
        return []
    if labels is not None:
        return sorted({fixed_seg.resolve(label) for label in labels} | {fixed_seg.resolve(liver_label)})
    return sorted(set(fixed_seg.label_ids()) & set(moving_seg.label_ids()))


# --------------------------------------------------------------------------------------------------
# outputs of a transform
# --------------------------------------------------------------------------------------------------


def apply_transform(
    transform: sitk.Transform,
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_seg: LabelMap | None,
    fixed_landmarks: np.ndarray | None,
) -> tuple[sitk.Image, LabelMap | None, np.ndarray | None]:
    """(warped moving CT, warped labels, fixed landmarks mapped into moving space) through ``transform``.

    Both are resampled at the fixed image's full resolution: the CT linearly (integer CT stays
    integer), the labels with nearest neighbour so ids and names survive.
    """
    warped_image = _like_input_pixels(
        geometry.resample_to_reference(moving, fixed, transform=transform, default_value=-1024.0), moving
    )
    warped_labels = None
    if moving_seg is not None:
        warped_labels = LabelMap(
            geometry.resample_to_reference(
                moving_seg.image, fixed, transform=transform, interpolation="nearest"
            ),
            dict(moving_seg.names),
        )
    mapped = None
    if fixed_landmarks is not None:
        mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in fixed_landmarks])
    return warped_image, warped_labels, mapped


# --------------------------------------------------------------------------------------------------
# network and optimisation
# --------------------------------------------------------------------------------------------------


def _load_model(options: RegistrationOptions):
    from dareg.models import registry  # TensorFlow-free: resolving "default" to "none" costs nothing

    path = registry.resolve_model(options.model)
    if path is None:
        return None
    from dareg.models import modelio  # TensorFlow loads only when a model is actually used

    return modelio.load_model(path)


def _predict(loaded, fixed_grid: np.ndarray, moving_grid: np.ndarray, device: str) -> np.ndarray:
    import tensorflow as tf

    from dareg.models.device import select_device

    with tf.device(select_device(device)):
        outputs = loaded.network.predict_on_batch([moving_grid[None, ..., None], fixed_grid[None, ..., None]])
    return np.asarray(outputs["flow"][0], dtype=np.float32)


def _labels_on_grid(
    seg: LabelMap, label_ids: list[int], grid: geometry.ModelGrid, transform: sitk.Transform | None
) -> np.ndarray:
    """One-hot (z, y, x, L) float32 of ``label_ids`` sampled (nearest) on the model grid."""
    array = geometry.resample_to_grid(seg.image, grid, transform=transform, interpolation="nearest")
    return np.stack([(array == label).astype(np.float32) for label in label_ids], axis=-1)


def _optimise(
    fixed_grid: np.ndarray,
    moving_grid: np.ndarray,
    fixed_labels: np.ndarray | None,
    moving_labels: np.ndarray | None,
    flow: np.ndarray | None,
    grid: geometry.ModelGrid,
    taper: np.ndarray,
    options: RegistrationOptions,
    progress: ProgressCallback | None,
) -> np.ndarray:
    """Instance optimisation on the model grid, or just the tapered network flow when it is off."""
    if options.optimize_steps <= 0:
        return np.zeros(grid.shape + (3,), np.float32) if flow is None else flow * taper[..., None]
    from dareg.optimize import OptimizeSettings, optimize_flow

    def report(step: int, steps: int) -> None:
        if progress is not None:
            progress(0.35 + 0.45 * step / steps, f"instance optimisation {step}/{steps}")

    return optimize_flow(
        fixed_grid,
        moving_grid,
        spacing_zyx=tuple(reversed(grid.spacing)),
        taper=taper,
        initial_flow=flow,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        settings=OptimizeSettings(steps=options.optimize_steps),
        progress=report,
    )


def _like_input_pixels(warped: sitk.Image, moving: sitk.Image) -> sitk.Image:
    """Integer CT in, integer CT out: rounded int16 when the moving image holds whole numbers in range.

    Hounsfield units are integers; int16 halves the file and the time to write it.
    """
    values = sitk.GetArrayViewFromImage(moving)
    if values.min() < -32768 or values.max() > 32767 or not np.array_equal(values, np.round(values)):
        return warped
    return sitk.Cast(sitk.Round(warped), sitk.sitkInt16)
