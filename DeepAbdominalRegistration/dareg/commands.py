"""What the ``dareg`` subcommands do (argument parsing lives in :mod:`dareg.cli`)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from dareg import io, outputs
from dareg.baseline import AntsOptions, ants_register
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


def _ants_options(args: argparse.Namespace) -> AntsOptions:
    return AntsOptions(
        transform_type=args.transform_type,
        init=args.init,
        spacing_mm=args.spacing,
        margin_mm=args.margin,
        liver_label=args.liver_label,
        labels=tuple(args.labels) if args.labels else None,
        seed=args.seed,
        threads=args.threads,
    )


def run_register(args: argparse.Namespace) -> RegistrationResult:
    """Read inputs, check the output folder, register, write everything, print the summary."""
    return _run_method(args, "register", _options(args), register)


def run_ants(args: argparse.Namespace) -> RegistrationResult:
    """As :func:`run_register`, with ANTs SyN (:mod:`dareg.baseline`) instead of dareg's pipeline."""
    return _run_method(args, "ants", _ants_options(args), ants_register)


def _run_method(
    args: argparse.Namespace,
    command: str,
    options: RegistrationOptions | AntsOptions,
    method: Callable[..., RegistrationResult],
) -> RegistrationResult:
    """The path every registration command shares: check the output folder, read, run, write, report.

    ``method`` has :func:`dareg.register.register`'s signature; ``options`` is its options object.
    """
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
        result = method(
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
        "command": command,
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


def _triple(blocks: list[dict], value, digits: int) -> str:
    """One metric for the three stages, as "before  initial  after"."""
    return " ".join(f"{_fmt(value(b), digits):>6}" for b in blocks)


def summary(result: RegistrationResult, files: dict[str, Path]) -> str:
    """The one-screen summary: metrics before/after, runtimes, warnings, where the outputs are.

    Each metric shows three numbers: unregistered, after the initial (rigid/affine) transform, registered.
    """
    blocks = [result.metrics[s] for s in ("unregistered", "initial", "registered")]
    rows = [
        ("NCC", _triple(blocks, lambda b: b["ncc"], 3)),
        ("SSIM", _triple(blocks, lambda b: b["ssim"], 3)),
    ]
    if "landmark_tre" in blocks[0]:
        label = f"landmark TRE mm (n={blocks[0]['landmark_tre']['n']})"
        rows.append((label, _triple(blocks, lambda b: b["landmark_tre"]["mean"], 2)))
    width = max([len(r[0]) for r in rows] + [len(n) for n in blocks[0].get("labels", {})]) + 2
    lines = [f"{'':{width}}{'unregistered, initial, registered'}"]
    lines += [f"{label:{width}}{values}" for label, values in rows]
    if blocks[0].get("labels"):
        lines.append(f"{'segment':{width}}{'DSC':<21}{'HD95 mm':<21}centroid TRE mm")
        for name in blocks[0]["labels"]:
            cells = [
                _triple(blocks, lambda b, m=m, n=name: b["labels"][n][m], d)
                for m, d in (("dice", 3), ("hd95", 1), ("centroid_tre", 2))
            ]
            lines.append(f"{name:{width}}" + "".join(f"{c:<21}" for c in cells).rstrip())
    outside = blocks[-1].get("labels_outside_roi")
    if outside:
        lines.append(f"not scored (mostly outside the ROI): {', '.join(outside)}")
    jacobian = result.metrics["registered"].get("jacobian")
    if jacobian:
        lines.append(
            f"Jacobian (ROI): {100 * jacobian['fraction_nonpositive']:.2g}% folding voxels, "
            f"SDlogJ {jacobian['sdlogj']:.3f}"
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items() if k != "total")
    lines.append(
        f"time: {result.timings['total']:.1f} s ({timings}); "
        f"method: {result.method}, model: {result.model_name}"
    )
    lines += [f"WARNING: {w}" for w in result.warnings]
    lines.append("outputs:")
    lines += [f"  {kind:20} {path}" for kind, path in files.items()]
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> None:
    """Prepare a training dataset; a tqdm bar per subject, skipped subjects reported as they happen."""
    from dareg.training import dataset

    options = dataset.PrepareOptions(
        grid_shape=(args.grid,) * 3,
        margin_mm=args.margin,
        liver_label=args.liver_label,
        label_mapping=dataset.load_label_mapping(args.label_map),
    )
    bar = tqdm(unit="subject", file=sys.stderr, disable=None)

    def report(done: int, total: int, subject_id: str, reason: str | None) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if reason:
            tqdm.write(f"skipped {subject_id}: {reason}", file=sys.stderr)

    try:
        prepared = dataset.prepare_dataset(
            args.inputs,
            args.out,
            options=options,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=report,
        )
    finally:
        bar.close()
    counts = ", ".join(f"{key} {len(ids)}" for key, ids in prepared.split.items())
    skipped = f"; {len(prepared.skipped)} skipped (see {dataset.SKIPPED_FILE})" if prepared.skipped else ""
    total = sum(map(len, prepared.split.values()))
    print(f"Prepared {total} subjects in {prepared.dataset_dir} ({counts}){skipped}.")


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


def run_train(args: argparse.Namespace):
    """Check the config (with the command line's overrides), train, and say where the model is.

    The config is read and checked before TensorFlow is imported, so a bad one fails at once.
    """
    from dareg.training.config import load_config

    overrides: dict = {}
    if args.dataset is not None:
        overrides["data"] = {"dataset": str(args.dataset)}
    if args.init_from is not None:
        overrides["transfer"] = {"init_from": str(args.init_from)}
    config = load_config(args.config, overrides)
    from dareg.training.trainer import train

    epochs = config.training.epochs

    def report(record: dict) -> None:
        validation = record["validation"]
        train_loss = record["train"].get("loss")
        trained = f"train {train_loss:.4f}  " if train_loss is not None else ""
        print(
            f"epoch {record['epoch']}/{epochs}  {trained}validation {validation['loss']:.4f}  "
            f"lr {record['learning_rate']:.1e}  ({record['seconds']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    try:
        result = train(config, args.out, resume=args.resume, on_epoch=report)
    except KeyboardInterrupt:
        print("dareg: training interrupted; continue it with the same command and --resume.", file=sys.stderr)
        raise
    ending = "stopped early" if result.stopped_early else "finished"
    print(
        f"Training {ending} after {result.epochs} epochs. Best model (epoch {result.best_epoch}, validation "
        f"loss {result.best_validation_loss:.4f}): {result.model_dir}\n"
        f"Use it with: dareg register --model {result.model_dir} ..."
    )
    return result
