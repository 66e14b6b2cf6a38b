"""What the ``dareg`` subcommands do (argument parsing lives in :mod:`dareg.cli`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tqdm import tqdm

from dareg import io, outputs
from dareg.errors import DaregError
from dareg.register import RegistrationOptions, RegistrationResult, register


class _Progress:
    """tqdm bar on stderr and, for 3D Slicer, ``PROGRESS <fraction> <stage>`` lines on stdout."""

    def __init__(self, lines: bool) -> None:
        self.lines = lines
        self.bar = tqdm(
            total=100,
            unit="%",
            file=sys.stderr,
            leave=False,
            disable=None,
            bar_format="{l_bar}{bar}| {elapsed}",
        )

    def __call__(self, fraction: float, stage: str) -> None:
        self.bar.set_description(stage)
        self.bar.update(max(0, round(100 * fraction) - self.bar.n))
        if self.lines:
            print(f"PROGRESS {fraction:.3f} {stage}", flush=True)

    def close(self) -> None:
        self.bar.close()


def _options(args: argparse.Namespace) -> RegistrationOptions:
    if args.optimize < 0:
        raise DaregError(f"--optimize must be 0 (off) or a positive number of steps, got {args.optimize}.")
    if args.grid < 16 or args.grid % 16:
        raise DaregError(f"--grid must be a multiple of 16 (e.g. 64, 128), got {args.grid}.")
    return RegistrationOptions(
        model=args.model,
        optimize_steps=args.optimize,
        init=args.init,
        grid_shape=(args.grid,) * 3,
        margin_mm=args.margin,
        liver_label=args.liver_label,
        labels=tuple(args.labels) if args.labels else None,
        device=args.device,
        seed=args.seed,
    )


def run_register(args: argparse.Namespace) -> RegistrationResult:
    """Read inputs, check the output folder, register, write everything, print the summary."""
    options = _options(args)
    out_dir = outputs.prepare_output_folder(args.out)
    fixed = io.read_image(args.fixed)
    moving = io.read_image(args.moving)
    fixed_seg = io.read_label_map(args.fixed_seg, reference=fixed) if args.fixed_seg else None
    moving_seg = io.read_label_map(args.moving_seg, reference=moving) if args.moving_seg else None
    fixed_points = io.read_landmarks(args.landmarks_fixed) if args.landmarks_fixed else None
    moving_points = io.read_landmarks(args.landmarks_moving) if args.landmarks_moving else None
    if fixed_points is not None and moving_points is not None and len(fixed_points) != len(moving_points):
        raise DaregError(
            f"--landmarks-fixed has {len(fixed_points)} points but --landmarks-moving has "
            f"{len(moving_points)}; they must correspond one to one, in the same order."
        )
    progress = _Progress(args.progress_lines)
    try:
        result = register(
            fixed,
            moving,
            fixed_seg,
            moving_seg,
            options=options,
            fixed_landmarks=fixed_points,
            moving_landmarks=moving_points,
            progress=progress,
        )
    finally:
        progress.close()
    run_info = {
        "command": "register",
        "options": {k: _plain(v) for k, v in vars(options).items()},
        "inputs": {
            k: str(getattr(args, k))
            for k in ("fixed", "moving", "fixed_seg", "moving_seg", "landmarks_fixed", "landmarks_moving")
            if getattr(args, k) is not None
        },
    }
    files = outputs.write_result(
        result,
        out_dir,
        run_info=run_info,
        segmentation_name=outputs.warped_segmentation_name(args.moving_seg),
    )
    print(summary(result, files))
    return result


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def summary(result: RegistrationResult, files: dict[str, Path]) -> str:
    """The one-screen summary: metrics before/after, runtimes, warnings, where the outputs are."""
    stages = ("unregistered", "initial", "registered")
    blocks = [result.metrics[s] for s in stages]
    rows = [("NCC", [_fmt(b["ncc"]) for b in blocks]), ("SSIM", [_fmt(b["ssim"]) for b in blocks])]
    if "landmark_tre" in blocks[0]:
        rows.append(
            (
                f"landmark TRE mm (n={blocks[0]['landmark_tre']['n']})",
                [_fmt(b["landmark_tre"]["mean"], 2) for b in blocks],
            )
        )
    for name in blocks[0].get("labels", {}):
        values = [b["labels"][name] for b in blocks]
        rows.append((f"{name} DSC", [_fmt(v["dice"]) for v in values]))
        rows.append((f"{name} HD95 mm", [_fmt(v["hd95"], 1) for v in values]))
        rows.append((f"{name} centroid TRE mm", [_fmt(v["centroid_tre"], 2) for v in values]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':{width}}{'unregistered':>14}{'initial':>10}{'registered':>12}"]
    lines += [f"{label:{width}}{a:>14}{b:>10}{c:>12}" for label, (a, b, c) in rows]
    jacobian = result.metrics["registered"].get("jacobian")
    if jacobian:
        lines.append(
            f"Jacobian (ROI): {100 * jacobian['fraction_nonpositive']:.2g}% folding voxels, "
            f"SDlogJ {jacobian['sdlogj']:.3f}"
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if k != "total")
    lines.append(f"time: {result.timings['total']:.1f} s ({timings}); model: {result.model_name}")
    lines += [f"WARNING: {w}" for w in result.warnings]
    lines.append("outputs:")
    lines += [f"  {kind:20} {path}" for kind, path in files.items()]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> RegistrationResult:
    """Phantom pair with a known deformation -> inputs on disk -> the same path as ``dareg register``."""
    from dareg.phantom import make_phantom, make_synthetic_pair

    out_dir = outputs.prepare_output_folder(args.out)
    inputs = out_dir / "inputs"
    print(f"Generating a phantom abdominal CT pair (seed {args.seed}) in {inputs} ...", file=sys.stderr)
    phantom = make_phantom(seed=args.seed)
    pair = make_synthetic_pair(phantom.image, phantom.labels, seed=args.seed)
    paths = {
        "fixed": inputs / "fixed.nii.gz",
        "moving": inputs / "moving.nii.gz",
        "fixed_seg": inputs / "fixed_seg.seg.nrrd",
        "moving_seg": inputs / "moving_seg.seg.nrrd",
        "landmarks_fixed": inputs / "landmarks_fixed.csv",
        "landmarks_moving": inputs / "landmarks_moving.csv",
    }
    io.write_image(phantom.image, paths["fixed"])
    io.write_image(pair.moving_image, paths["moving"])
    io.write_label_map(io.LabelMap(phantom.labels, dict(phantom.names)), paths["fixed_seg"])
    io.write_label_map(io.LabelMap(pair.moving_labels, dict(phantom.names)), paths["moving_seg"])
    io.write_landmarks(pair.fixed_landmarks, paths["landmarks_fixed"])
    io.write_landmarks(pair.moving_landmarks, paths["landmarks_moving"])
    register_args = argparse.Namespace(
        **paths,
        liver_label=1,
        labels=None,
        model=args.model,
        optimize=args.optimize,
        init="rigid",
        grid=128,
        margin=40.0,
        device="auto",
        seed=args.seed,
        out=out_dir,
        progress_lines=False,
    )
    result = run_register(register_args)
    before, after = result.metrics["unregistered"], result.metrics["registered"]
    liver_before, liver_after = before["labels"]["liver"]["dice"], after["labels"]["liver"]["dice"]
    print(
        f"\nDemo: liver DSC {liver_before:.3f} -> {liver_after:.3f}, "
        f"landmark TRE {before['landmark_tre']['mean']:.2f} -> {after['landmark_tre']['mean']:.2f} mm. "
        f"Outputs in {out_dir.resolve()}"
    )
    return result
