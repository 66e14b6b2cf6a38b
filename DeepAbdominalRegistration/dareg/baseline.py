"""The ANTs SyN baseline: ``ants_register(fixed, moving, ...)`` -> the same result as ``dareg register``.

It answers "how does the deep registration compare with ANTs SyN on THIS pair?" with outputs of the
same kind (one displacement field over the whole fixed image, warped CT and labels, mapped
landmarks, metrics.json), so 3D Slicer and the evaluation import both results the same way.

Stages (the ones shared with :mod:`dareg.register` run its code, unchanged):
1. validate: :func:`dareg.register.check_inputs`;
2. initialise: :func:`dareg.initialize.initial_transform` (``init``, default "rigid" as ``register``),
   so both methods start from the same alignment and see the same liver ROI;
3. working grids: the fixed ROI box is :func:`dareg.geometry.roi_index_box` exactly as in
   ``register``; the moving box is the same function with the roles swapped (the moving liver and the
   fixed liver mapped into moving space, plus the margin and some slack for ANTs' own motion). Both
   are sampled at ``spacing_mm`` (default 2 mm; full resolution would take many minutes), nearly
   isotropic (each axis's extent divided into whole voxels, never coarser than asked), and windowed to
   [0, 1] through the CT window dareg uses (:data:`dareg.geometry.CT_WINDOW_HU`): bone and air then
   cannot dominate ANTs' mutual information, and both methods see the same intensities;
4. ANTs: ``ants.registration(type_of_transform, initial_transform=<the initialisation>)`` with
   antspyx's defaults otherwise (the paper's baselines). ANTs' own linear stage(s) still run and refine
   the initialisation. It runs in a child process because that is the only way to fix ITK's thread
   count (ITK reads ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS once, when antspyx is imported) without
   touching the caller's environment, and because antspyx 0.6.3 takes the seed only from a global
   (``ants.config``; ``registration(random_seed=...)`` is silently swallowed by ``**kwargs``). With
   one thread (the default) the same seed gives bit-identical results; with more threads ITK's
   metric sums vary from run to run;
5. compose: antsRegistration writes its composite (``write_composite_transform=True``; the
   initialisation and the linear stages collapsed into one affine ``L``, then the SyN field ``d``).
   SimpleITK reads it; ITK applies a composite's transforms last-first, so ``T(x) = L(x + d(x))``,
   checked numerically against ``ants.apply_transforms`` in the tests. That is exactly the form
   :func:`dareg.geometry.compose_displacement_field` writes: ONE field over the whole fixed image on
   the working grid's lattice, the SyN part inside the ROI (SyN keeps its field zero on the domain
   border, and beyond it ANTs' warp is the identity), the affine part everywhere;
6. warp and 7. metrics: :func:`dareg.register.apply_transform` and :func:`dareg.assessment.assess`;
   the "initial" block is ``L`` (initialisation + ANTs' linear stages), "registered" the full ``T``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dareg import geometry, initialize
from dareg.errors import DaregError
from dareg.io import LabelMap
from dareg.register import (
    Pair,
    ProgressCallback,
    RegistrationResult,
    StageClock,
    check_inputs,
    finish_registration,
)

#: antspyx's transform types offered: SyN (affine + SyN, mutual information), SyNCC (rigid + affine +
#: SyN with cross-correlation, much slower), SyNRA (rigid + affine + SyN, mutual information).
TRANSFORM_TYPES = ("SyN", "SyNCC", "SyNRA")

#: Extra room (mm) around the moving crop beyond the ROI margin: ANTs' affine and SyN stages move the
#: fixed ROI further than the initialisation did, and moving samples outside the crop carry no data.
_MOVING_SLACK_MM = 20.0

# Files exchanged with the child process, inside the working folder.
_FIXED_FILE = "fixed.mha"  # MetaImage keeps the geometry in full double precision
_MOVING_FILE = "moving.mha"
_INITIAL_FILE = "initial.mat"
_OUTPUT_PREFIX = "ants_"
COMPOSITE_FILE = _OUTPUT_PREFIX + "Composite.h5"


@dataclass(frozen=True)
class AntsOptions:
    """What ``dareg ants`` runs.

    Parameters:
        transform_type: one of :data:`TRANSFORM_TYPES`.
        init: initialisation mode before ANTs, one of :data:`dareg.initialize.INIT_MODES`.
        spacing_mm: voxel size of the working grids ANTs registers.
        margin_mm: ROI margin around the liver masks (as ``register``).
        liver_label: id or segment name of the liver in both segmentations.
        labels: label ids/names reported (SyN itself uses intensities only); None = all shared.
        seed: seeds the initialisation and ANTs' metric sampling.
        threads: ITK threads for ANTs; 1 makes the result reproducible bit for bit.
    """

    transform_type: str = "SyN"
    init: str = "rigid"
    spacing_mm: float = 2.0
    margin_mm: float = geometry.DEFAULT_MARGIN_MM
    liver_label: int | str = 1
    labels: tuple[int | str, ...] | None = None
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.transform_type not in TRANSFORM_TYPES:
            raise DaregError(
                f"Unknown ANTs transform type {self.transform_type!r}; choose one of {TRANSFORM_TYPES}."
            )
        if not self.spacing_mm > 0:
            raise DaregError(
                f"--spacing must be a positive voxel size in mm (e.g. 2.0), got {self.spacing_mm}."
            )
        if self.threads < 1:
            raise DaregError(f"--threads must be at least 1, got {self.threads}.")


def ants_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_seg: LabelMap | None = None,
    moving_seg: LabelMap | None = None,
    *,
    options: AntsOptions = AntsOptions(),
    fixed_landmarks: np.ndarray | None = None,
    moving_landmarks: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    workdir: Path | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ANTs; see the module docstring for the stages.

    Parameters are those of :func:`dareg.register.register`, plus ``workdir``: a folder that keeps
    ANTs' inputs and its own ``ants_Composite.h5`` for inspection (default: a temporary folder,
    removed afterwards).
    """
    _require_antspyx()
    clock = StageClock(progress)
    with clock.stage("validate", 0.0):
        checked = check_inputs(
            fixed, moving, fixed_seg, moving_seg, liver_label=options.liver_label, labels=options.labels
        )
        moving_seg = checked.moving_seg
    with clock.stage("initialise", 0.05):
        start = _quantised(
            initialize.initial_transform(
                fixed,
                moving,
                fixed_mask=checked.fixed_mask,
                moving_mask=checked.moving_mask,
                mode=options.init,
                seed=options.seed,
            )
        )
    with clock.stage("working grids", 0.12):
        lower, upper = geometry.roi_index_box(
            fixed,
            fixed_mask=checked.fixed_mask,
            moving_mask=checked.moving_mask,
            moving_to_fixed=start.inverse_sitk(),
            margin_mm=options.margin_mm,
        )
        grid = isotropic_grid(fixed, lower, upper, options.spacing_mm)
        moving_grid = isotropic_grid(
            moving,
            *geometry.roi_index_box(
                moving,
                fixed_mask=checked.moving_mask,
                moving_mask=checked.fixed_mask,
                moving_to_fixed=start.to_sitk(),
                margin_mm=options.margin_mm + _MOVING_SLACK_MM,
            ),
            options.spacing_mm,
        )
    with clock.stage(f"ANTs {options.transform_type}", 0.2), _working_folder(workdir) as folder:
        composite = run_ants(
            _working_image(fixed, grid), _working_image(moving, moving_grid), start, options, folder
        )
        linear, syn_field = read_composite(composite)
    displacement = geometry.resample_to_reference(syn_field, grid.reference_image())
    return finish_registration(
        clock,
        Pair(fixed, moving, fixed_seg, moving_seg, fixed_landmarks, moving_landmarks),
        checked.label_ids,
        grid=grid,
        roi_box=(lower, upper),
        affine=linear,
        displacement_mm=sitk.GetArrayFromImage(displacement),
        model_name=f"antspyx {importlib.metadata.version('antspyx')}",
        method=f"ants-{options.transform_type}",
    )


def _require_antspyx() -> None:
    if importlib.util.find_spec("ants") is None:
        raise DaregError(
            "ANTs is not installed in this Python environment. Install it with "
            "pip install 'antspyx==0.6.3' (or the package's extra: pip install 'dareg[ants]')."
        )


def _quantised(start: geometry.AffineMap) -> geometry.AffineMap:
    """``start`` rounded far below any registration effect (1e-7 matrix, 0.1 micrometre offset).

    Why: the initialisation varies in its last bits from one process to the next (about 1e-9 mm),
    and ANTs' optimiser turns such differences into different results (measured: up to ~2 mm of
    displacement on a phantom), because its convergence tests then stop at different iterations.
    Rounding removes them, so the same seed gives the same result in every process.
    """
    return geometry.AffineMap(np.round(start.matrix, 7), np.round(start.offset, 4))


# --------------------------------------------------------------------------------------------------
# working grids and images
# --------------------------------------------------------------------------------------------------


def isotropic_grid(
    image: sitk.Image, lower: np.ndarray, upper: np.ndarray, spacing_mm: float
) -> geometry.ModelGrid:
    """A grid tiling ``image``'s continuous-index box (lower, upper) with voxels of about ``spacing_mm``.

    Each axis's extent is divided into the fewest whole voxels no larger than ``spacing_mm``, so the
    spacing is within a voxel's rounding of isotropic (e.g. 1.98, 2.0, 1.99 mm) and the grid tiles
    the box exactly, as the model grid does (:func:`dareg.geometry.model_grid_for_box`).
    """
    extent_mm = (np.asarray(upper) - np.asarray(lower) + 1.0) * np.asarray(image.GetSpacing(), dtype=float)
    size_xyz = np.maximum(1, np.ceil(extent_mm / spacing_mm - 1e-6)).astype(int)
    return geometry.model_grid_for_box(image, lower, upper, tuple(int(n) for n in size_xyz[::-1]))


def _working_image(image: sitk.Image, grid: geometry.ModelGrid) -> sitk.Image:
    """``image`` sampled on ``grid`` (anti-aliased) and windowed to [0, 1], as a float32 sitk image."""
    array = geometry.normalize_ct(geometry.resample_to_grid(image, grid, default_value=-1024.0))
    working = sitk.GetImageFromArray(array)
    working.CopyInformation(grid.reference_image())
    return working


# --------------------------------------------------------------------------------------------------
# running ANTs and reading its composite transform
# --------------------------------------------------------------------------------------------------


@contextmanager
def _working_folder(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="dareg-ants-") as temporary:
        yield Path(temporary)


def run_ants(
    fixed: sitk.Image, moving: sitk.Image, initial: geometry.AffineMap, options: AntsOptions, folder: Path
) -> Path:
    """Run ``ants.registration`` in a child process; returns the path of its ``ants_Composite.h5``.

    The images are ANTs' inputs (any geometry, same physical space), ``initial`` its initial
    transform fixed -> moving. Raises :class:`DaregError` with ANTs' last message if it fails.
    """
    sitk.WriteImage(fixed, str(folder / _FIXED_FILE))
    sitk.WriteImage(moving, str(folder / _MOVING_FILE))
    sitk.WriteTransform(initial.to_sitk(), str(folder / _INITIAL_FILE))
    package_root = str(Path(__file__).resolve().parents[1])
    environment = {
        **os.environ,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(options.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "dareg.baseline", str(folder), options.transform_type, str(options.seed)]
    # On Ctrl-C / SIGTERM subprocess.run kills the child before the KeyboardInterrupt propagates.
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        message = (completed.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise DaregError(
            f"ANTs {options.transform_type} failed (exit code {completed.returncode}): {message}. "
            "Check that both images show the same anatomy and that the ROI spans a few dozen voxels at "
            "--spacing (ANTs' coarsest level shrinks it four times per axis)."
        )
    return folder / COMPOSITE_FILE


def read_composite(path: Path) -> tuple[geometry.AffineMap, sitk.Image]:
    """ANTs' composite fixed -> moving split as ``T(x) = L(x + d(x))``: (``L``, ``d`` as a field image).

    antsRegistration with collapsed outputs writes [linear, SyN displacement field]; ITK applies a
    composite's transforms last-first, so a fixed point goes through the SyN field first. Any other
    structure is refused rather than guessed.
    """
    composite = sitk.ReadTransform(str(path)).Downcast()
    if not isinstance(composite, sitk.CompositeTransform):
        raise RuntimeError(f"{path} holds a {composite.GetName()}, not ANTs' composite transform")
    *linear, deformable = (
        composite.GetNthTransform(i).Downcast() for i in range(composite.GetNumberOfTransforms())
    )
    if not linear or not isinstance(deformable, sitk.DisplacementFieldTransform):
        names = [composite.GetNthTransform(i).GetName() for i in range(composite.GetNumberOfTransforms())]
        raise RuntimeError(f"unexpected ANTs composite {names}: expected linear transform(s), then a field")
    return geometry.AffineMap.from_sitk(sitk.CompositeTransform(linear)), deformable.GetDisplacementField()


def _child_main(argv: Sequence[str]) -> None:
    """The child process: ``python -m dareg.baseline FOLDER TRANSFORM_TYPE SEED``."""
    folder, transform_type, seed = Path(argv[0]), argv[1], int(argv[2])
    import ants  # imported here, after the parent set ITK's thread count in this process's environment

    # The only way antspyx 0.6 passes --random-seed; ANTs reads seed 0 as "seed from the wall clock",
    # so every seed is shifted off it (as dareg.initialize does for SimpleITK).
    ants.config.set_ants_deterministic(False, seed % (2**31 - 2) + 1)
    ants.registration(
        ants.image_read(str(folder / _FIXED_FILE)),
        ants.image_read(str(folder / _MOVING_FILE)),
        type_of_transform=transform_type,
        initial_transform=str(folder / _INITIAL_FILE),
        outprefix=str(folder / _OUTPUT_PREFIX),
        write_composite_transform=True,
    )


if __name__ == "__main__":
    _child_main(sys.argv[1:])
