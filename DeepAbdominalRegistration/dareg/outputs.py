"""Writing a registration result folder: all files or none.

Every file is first written into a hidden staging folder beside the output folder; only when all
of them exist are they moved into place (``os.replace``, same file system). A failed or cancelled
run therefore leaves the output folder as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dareg import io
from dareg.errors import DaregError
from dareg.register import RegistrationResult

TRANSFORM_FILE = "transform.nii.gz"
WARPED_IMAGE_FILE = "warped_moving.nii.gz"
METRICS_FILE = "metrics.json"
MAPPED_LANDMARKS_FILE = "landmarks_fixed_in_moving.csv"


def prepare_output_folder(out_dir: Path) -> Path:
    """Create ``out_dir`` if needed and prove it is writable, before any long computation starts."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".dareg-probe-")
        probe.close()
    except OSError as exc:
        raise DaregError(
            f"Cannot write to the output folder {out_dir} ({exc.strerror or exc}). "
            "Choose a folder you have write permission for, e.g. --out ~/dareg_output."
        ) from exc
    return out_dir


def warped_segmentation_name(moving_seg_path: Path | None) -> str:
    """Warped labels keep the input's kind: Slicer ``.seg.nrrd`` stays a segmentation file."""
    if moving_seg_path is not None and str(moving_seg_path).lower().endswith(io.SEGMENTATION_SUFFIX):
        return "warped_moving_seg.seg.nrrd"
    return "warped_moving_seg.nii.gz"


def write_result(
    result: RegistrationResult, out_dir: Path, *, segmentation_name: str, run_info: dict
) -> dict:
    """Write transform, warped image/labels, mapped landmarks and metrics.json; returns {kind: path}."""
    out_dir = prepare_output_folder(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".dareg-staging-", dir=out_dir))
    try:
        written = {"transform": TRANSFORM_FILE, "warped_image": WARPED_IMAGE_FILE, "metrics": METRICS_FILE}
        io.write_displacement_field(result.field, staging / TRANSFORM_FILE)
        io.write_image(result.warped_image, staging / WARPED_IMAGE_FILE)
        if result.warped_labels is not None:
            io.write_label_map(result.warped_labels, staging / segmentation_name)
            written["warped_segmentation"] = segmentation_name
        if result.mapped_landmarks is not None:
            io.write_landmarks(np.asarray(result.mapped_landmarks), staging / MAPPED_LANDMARKS_FILE)
            written["mapped_landmarks"] = MAPPED_LANDMARKS_FILE
        io.write_json(_metrics_document(result, run_info, written), staging / METRICS_FILE)
        for name in written.values():
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {kind: out_dir / name for kind, name in written.items()}


def _metrics_document(result: RegistrationResult, run_info: dict, files: dict) -> dict:
    grid = result.grid
    return {
        "method": result.method,
        "model": result.model_name,
        "run": run_info,
        "transform": {
            "file": files["transform"],
            "kind": "displacement field, resampling transform fixed -> moving, LPS mm (ITK convention)",
        },
        # where the method worked: dareg's model grid, or the ANTs working grid
        "model_grid": {"size_xyz": grid.size, "spacing_mm": grid.spacing, "origin_lps": grid.origin},
        "metrics": result.metrics,
        "timings_s": result.timings,
        "warnings": result.warnings,
        "files": files,
    }
