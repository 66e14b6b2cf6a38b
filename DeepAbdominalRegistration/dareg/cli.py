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
        else:
            from dareg.commands import run_demo

            run_demo(args)
    except DaregError as error:
        print(f"dareg: error: {error}", file=sys.stderr)
        return ExitCode.USER_ERROR
    except KeyboardInterrupt:
        print("dareg: cancelled; no outputs were written.", file=sys.stderr)
        return ExitCode.CANCELLED
    return ExitCode.OK


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
