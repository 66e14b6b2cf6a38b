"""Small phantom cases on disk for CLI and pipeline tests (kept tiny: 2 CPU cores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dareg import io
from dareg.phantom import make_phantom, make_synthetic_pair

#: A small field of view at coarse spacing: the registration runs on a 32^3 grid in seconds.
SMALL = {"size": (64, 56, 44), "spacing": (3.75, 3.6, 4.4)}
FAST_ARGS = ["--grid", "32", "--optimize", "10", "--model", "none"]


@dataclass
class Case:
    fixed: Path
    moving: Path
    fixed_seg: Path
    moving_seg: Path
    landmarks_fixed: Path
    landmarks_moving: Path

    def args(self, out: Path, *, segs: bool = True) -> list[str]:
        args = ["register", "--fixed", str(self.fixed), "--moving", str(self.moving), "--out", str(out)]
        if segs:
            args += ["--fixed-seg", str(self.fixed_seg), "--moving-seg", str(self.moving_seg)]
        return args + FAST_ARGS


def write_case(
    folder: Path, *, seed: int = 0, direction: np.ndarray | None = None, moving_reference=None, **deformation
) -> Case:
    """A phantom fixed CT and a synthetic moving CT with a known deformation, written to ``folder``."""
    direction = None if direction is None else tuple(np.asarray(direction, dtype=float).ravel())
    phantom = make_phantom(seed=seed, direction=direction, **SMALL)
    pair = make_synthetic_pair(
        phantom.image, phantom.labels, seed=seed, reference=moving_reference, **deformation
    )
    folder.mkdir(parents=True, exist_ok=True)
    case = Case(
        *(
            folder / name
            for name in (
                "fixed.nii.gz",
                "moving.nrrd",
                "fixed_seg.nii.gz",
                "moving_seg.seg.nrrd",
                "fixed.csv",
                "moving.csv",
            )
        )
    )
    io.write_image(phantom.image, case.fixed)
    io.write_image(pair.moving_image, case.moving)
    io.write_label_map(io.LabelMap(phantom.labels, dict(phantom.names)), case.fixed_seg)
    io.write_label_map(io.LabelMap(pair.moving_labels, dict(phantom.names)), case.moving_seg)
    io.write_landmarks(pair.fixed_landmarks, case.landmarks_fixed)
    io.write_landmarks(pair.moving_landmarks, case.landmarks_moving)
    return case


def folder_listing(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative), hidden ones included: to prove nothing was left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
