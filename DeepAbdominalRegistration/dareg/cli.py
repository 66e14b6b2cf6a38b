"""``dareg``: the command line.

Exit codes: 0 success, 1 internal error (a bug: traceback kept), 2 a user error (one clear message,
no traceback, no partial outputs), 130 cancelled (Ctrl-C / SIGINT / SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path

from dareg import __version__

EXAMPLE_REGISTER = """example:
  dareg register --fixed fixed.nii.gz --moving moving.nii.gz \\
      --fixed-seg fixed_seg.nii.gz --moving-seg moving_seg.nii.gz --liver-label 5 --out result/
The moving image is expected to show the same patient; the transform written is a resampling
transform fixed -> moving (ITK/ANTs/Slicer convention), in LPS millimetres."""


EXAMPLE_ANTS = """example:
  dareg ants --fixed fixed.nii.gz --moving moving.nii.gz \\
      --fixed-seg fixed_seg.nii.gz --moving-seg moving_seg.nii.gz --liver-label 5 --out result_ants/
Runs ANTs SyN on the liver ROI (2 mm) from the same initial alignment as 'register' and writes the
same files (transform.nii.gz, warped images, metrics.json), so both results load and compare alike."""


EXAMPLE_PREPARE = """example:
  dareg prepare --inputs ct_folder/ --out dataset/ --grid 128 --label-map totalsegmentator
A folder pairs A.nii.gz (or a DICOM folder A/) with A_seg.nii.gz, A_labels.nrrd or A.seg.nrrd; a CSV has
the columns image, labels (and optionally id), paths relative to the CSV. Writes one <id>.h5 per usable
subject, split.json (seeded train/val/test) and skipped.csv (subjects left out, and why)."""


EXAMPLE_TRAIN = """example:
  dareg train --config scripts/configs/UW-NSD.yaml --dataset dataset/ --out runs/uw_nsd
  dareg train --config scripts/configs/UW-NSD.yaml --dataset dataset/ --out runs/uw_nsd --resume
Writes the best model on validation to OUT/model (use it as 'dareg register --model OUT/model'),
checkpoints after every epoch (--resume continues from the last one), TensorBoard logs in OUT/logs."""


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USER_ERROR = 2
    CANCELLED = 130


def _label(value: str) -> int | str:
    """A label given as an id ("5") or as a segment name ("liver")."""
    return int(value) if value.lstrip("-").isdigit() else value


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Inputs, identical for every registration method."""
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--fixed", required=True, type=Path, help="fixed CT: NIfTI, NRRD, MHA or a DICOM folder"
    )
    inputs.add_argument(
        "--moving", required=True, type=Path, help="moving CT: NIfTI, NRRD, MHA or a DICOM folder"
    )
    inputs.add_argument("--fixed-seg", type=Path, help="label map or Slicer .seg.nrrd of the fixed CT")
    inputs.add_argument("--moving-seg", type=Path, help="label map or Slicer .seg.nrrd of the moving CT")
    inputs.add_argument(
        "--liver-label", type=_label, default=1, help="liver label id or segment name (TotalSegmentator: 5)"
    )
    inputs.add_argument(
        "--labels",
        type=_label,
        nargs="+",
        help="label ids/names that are reported and, for 'register', guide the optimisation "
        "(default: all shared)",
    )
    inputs.add_argument(
        "--landmarks-fixed", type=Path, help="fixed landmarks: CSV of LPS mm x,y,z or .mrk.json"
    )
    inputs.add_argument(
        "--landmarks-moving",
        type=Path,
        help="corresponding moving landmarks (same order); with --landmarks-fixed gives TRE",
    )


def _add_shared_method_arguments(method: argparse._ArgumentGroup) -> None:
    """Method settings every registration method has: initial alignment, ROI margin, seed."""
    from dareg.initialize import INIT_MODES

    method.add_argument("--init", choices=INIT_MODES, default="rigid", help="initial alignment")
    method.add_argument("--margin", type=float, default=40.0, help="ROI margin around the liver masks (mm)")
    method.add_argument("--seed", type=int, default=0, help="seed of every random draw")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; files replaced)")
    parser.add_argument(
        "--progress-lines",
        action="store_true",
        help="print 'PROGRESS <fraction> <stage>' lines on stdout (for 3D Slicer)",
    )


def _add_register_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_arguments(parser)
    method = parser.add_argument_group("method")
    method.add_argument(
        "--model",
        default="default",
        help="bundled model name, model folder, 'none' (affine + instance optimisation) "
        "or 'default' (best bundled model; none while no model is bundled)",
    )
    method.add_argument(
        "--optimize", type=int, default=50, metavar="N", help="instance-optimisation steps (0 = off)"
    )
    method.add_argument(
        "--grid", type=int, default=128, help="model grid size per axis when no model sets it"
    )
    method.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto", help="where the network runs"
    )
    _add_shared_method_arguments(method)
    _add_output_arguments(parser)


def _add_ants_arguments(parser: argparse.ArgumentParser) -> None:
    from dareg.baseline import TRANSFORM_TYPES

    _add_input_arguments(parser)
    method = parser.add_argument_group("method")
    method.add_argument(
        "--transform-type",
        choices=TRANSFORM_TYPES,
        default="SyN",
        help="antspyx transform: SyN (affine + SyN, mutual information), SyNCC (rigid + affine + SyN, "
        "cross-correlation; much slower), SyNRA (rigid + affine + SyN)",
    )
    method.add_argument(
        "--spacing", type=float, default=2.0, help="voxel size (mm) of the ROI images ANTs registers"
    )
    method.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ITK threads for ANTs; 1 gives bit-identical results for the same seed, more are faster "
        "but vary slightly from run to run",
    )
    _add_shared_method_arguments(method)
    _add_output_arguments(parser)


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inputs", required=True, nargs="+", type=Path, help="folders of image + label pairs, or CSV lists"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="dataset folder (created; subject files replaced)"
    )
    parser.add_argument(
        "--grid", type=int, default=128, help="model grid size per axis (default: %(default)s)"
    )
    parser.add_argument(
        "--margin", type=float, default=40.0, help="ROI margin around the liver, mm (default: %(default)s)"
    )
    parser.add_argument(
        "--label-map",
        default="totalsegmentator",
        help="training labels: totalsegmentator (5 -> 1 parenchyma; 63, 64 -> 2 vessels), phantom, identity, "
        "or a YAML file (default: %(default)s)",
    )
    parser.add_argument(
        "--liver-label",
        type=_label,
        default=5,
        help="liver id or segment name in the source label maps; places the ROI (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="validation share (default: %(default)s)"
    )
    parser.add_argument("--test-fraction", type=float, default=0.1, help="test share (default: %(default)s)")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="training config (YAML, one design)")
    parser.add_argument("--out", type=Path, help="run folder (default: the config's output)")
    parser.add_argument("--dataset", type=Path, help="prepared dataset folder (overrides data.dataset)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="MODEL",
        help="transfer learning: start from this model folder (overrides transfer.init_from)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dareg", description="Deep abdominal CT deformable registration.")
    parser.add_argument("--version", action="version", version=f"dareg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser(
        "register",
        help="register a moving CT to a fixed CT",
        epilog=EXAMPLE_REGISTER,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_register_arguments(register)
    ants = commands.add_parser(
        "ants",
        help="the same registration with ANTs SyN (baseline for comparison; needs antspyx)",
        epilog=EXAMPLE_ANTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_ants_arguments(ants)
    prepare = commands.add_parser(
        "prepare",
        help="build a training dataset (one HDF5 file per subject on the model grid, and a split)",
        epilog=EXAMPLE_PREPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_prepare_arguments(prepare)
    train = commands.add_parser(
        "train",
        help="train a registration network (one of the six DDMR designs) from a config",
        epilog=EXAMPLE_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_arguments(train)
    demo = commands.add_parser(
        "demo",
        help="generate a phantom pair with a known deformation, register it and report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="phantom and deformation seed")
    demo.add_argument("--optimize", type=int, default=50, metavar="N", help="instance-optimisation steps")
    demo.add_argument("--model", default="default", help="as for 'register'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dareg`` console script; returns the exit code."""
    from dareg.errors import DaregError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if args.command == "register":
            from dareg.commands import run_register

            run_register(args)
        elif args.command == "ants":
            from dareg.commands import run_ants

            run_ants(args)
        elif args.command == "prepare":
            from dareg.commands import run_prepare

            run_prepare(args)
        elif args.command == "train":
            from dareg.commands import run_train

            run_train(args)
        else:
            from dareg.commands import run_demo

            run_demo(args)
    except DaregError as error:
        print(f"dareg: error: {error}", file=sys.stderr)
        return ExitCode.USER_ERROR
    except KeyboardInterrupt:
        if args.command != "train":  # training says itself how to resume from its checkpoints
            print("dareg: cancelled; no outputs were written.", file=sys.stderr)
        return ExitCode.CANCELLED
    return ExitCode.OK


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
