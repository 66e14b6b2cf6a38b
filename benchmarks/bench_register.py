"""Speed of `dareg register` against ANTs SyN, measured in ONE run on the same machine.

Part A: a phantom pair on a 128^3 grid (about 2 mm voxels):
  - the network alone (forward pass at 128^3) for the `paper` and `compact` presets;
  - `dareg register` end to end (reading and writing included) with `compact` + rigid
    initialisation, and with no model + instance optimisation (what ships until models are trained);
  - ANTs SyN (antspyx, `type_of_transform="SyN"`, seeded, one thread per core) on the same pair.
Part B: the same anatomy at clinical size (512 x 512 x 300, 0.78 x 0.78 x 1 mm): everything but the
  network (read, ROI, resampling, field, full-resolution warps of image and labels, write).

Targets (ratios, never timed assertions): Part B under 5 s; compact + init >= 10x faster than SyN.
Usage: python benchmarks/bench_register.py [--out bench_output] [--skip-paper]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dareg import io
from dareg.cli import main as dareg_main
from dareg.geometry import normalisation_config
from dareg.phantom import make_phantom, make_synthetic_pair


def write_pair(folder: Path, *, size, spacing, seed: int = 0) -> dict[str, Path]:
    """A phantom pair with a known deformation, resampled to ``size``/``spacing`` (same field of view)."""
    phantom = make_phantom(seed=seed)
    pair = make_synthetic_pair(phantom.image, phantom.labels, seed=seed)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    extent = (np.asarray(size) - 1) * np.asarray(spacing)
    reference.SetOrigin(tuple(-extent / 2))
    images = {
        "fixed": sitk.Resample(phantom.image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0),
        "moving": sitk.Resample(pair.moving_image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0),
        "fixed_seg": sitk.Resample(phantom.labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0),
        "moving_seg": sitk.Resample(
            pair.moving_labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"{name}.nii.gz"
        if name.endswith("seg"):
            io.write_label_map(io.LabelMap(sitk.Cast(image, sitk.sitkUInt8), {}), paths[name])
        else:
            io.write_image(sitk.Cast(sitk.Round(image), sitk.sitkInt16), paths[name])  # CT files are int16
    return paths


def timed(function, repeats: int = 1) -> float:
    """Median wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def network_forward_seconds(preset: str) -> float:
    import tensorflow as tf

    from dareg.models import build_registration_network

    network = build_registration_network(preset, (128, 128, 128))
    inputs = [
        tf.random.uniform((1, 128, 128, 128, 1), seed=1),
        tf.random.uniform((1, 128, 128, 128, 1), seed=2),
    ]
    network.predict_on_batch(inputs)  # warm-up: graph building and memory allocation
    seconds = timed(lambda: network.predict_on_batch(inputs), repeats=3)
    tf.keras.backend.clear_session()  # free the paper network's 3.6 GB before the next measurement
    return seconds


def save_compact_model(folder: Path) -> Path:
    from dareg.models import ModelConfig, build_registration_network, save_model

    network = build_registration_network("compact", (128, 128, 128))
    config = ModelConfig(
        preset="compact",
        grid_shape=(128, 128, 128),
        normalisation=normalisation_config(),
        design="untrained (benchmark: timing only)",
    )
    return save_model(network, folder / "compact_untrained", config)


def run_register(paths: dict[str, Path], out: Path, *extra: str) -> tuple[float, dict]:
    args = [
        "register",
        "--fixed",
        str(paths["fixed"]),
        "--moving",
        str(paths["moving"]),
        "--fixed-seg",
        str(paths["fixed_seg"]),
        "--moving-seg",
        str(paths["moving_seg"]),
        "--out",
        str(out),
        *extra,
    ]
    start = time.perf_counter()
    code = dareg_main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"dareg register failed with exit code {code}")
    return seconds, json.loads((out / "metrics.json").read_text())


def ants_syn_seconds(paths: dict[str, Path], seed: int = 1) -> tuple[float, float]:
    """(registration alone, registration + warping the image and the labels): SyN's own deliverables."""
    import ants

    fixed, moving = ants.image_read(str(paths["fixed"])), ants.image_read(str(paths["moving"]))
    moving_labels = ants.image_read(str(paths["moving_seg"]))
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=seed)
    registration = time.perf_counter() - start
    ants.apply_transforms(fixed, moving, result["fwdtransforms"], interpolator="linear")
    ants.apply_transforms(fixed, moving_labels, result["fwdtransforms"], interpolator="nearestNeighbor")
    return registration, time.perf_counter() - start


def document_core_seconds(stages: dict[str, float]) -> float:
    """Registration proper (initialisation to full-resolution warps): the stages without metrics."""
    return stages["total"] - stages.get("metrics", 0.0) - stages.get("load model", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper preset (3.6 GB, ~5 s/pass)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count()))
    results: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        small = write_pair(scratch / "pair128", size=(128, 128, 128), spacing=(1.9, 1.6, 1.5))
        model = save_compact_model(scratch)
        results["network_compact_s"] = network_forward_seconds("compact")
        if not args.skip_paper:
            results["network_paper_s"] = network_forward_seconds("paper")
        wall, document = run_register(small, scratch / "compact", "--model", str(model), "--optimize", "0")
        results["register_compact_init_s"] = wall
        results["register_compact_stages_s"] = document["timings_s"]
        wall, document = run_register(small, scratch / "optimised", "--model", "none", "--optimize", "50")
        results["register_none_optimize50_s"] = wall
        results["register_none_optimize50_stages_s"] = document["timings_s"]
        results["ants_syn_s"], results["ants_syn_with_warps_s"] = ants_syn_seconds(small)
        compact_core = document_core_seconds(results["register_compact_stages_s"])
        results["register_compact_core_s"] = compact_core
        results["ratio_syn_over_compact_end_to_end"] = (
            results["ants_syn_s"] / results["register_compact_init_s"]
        )
        results["ratio_syn_with_warps_over_compact_core"] = results["ants_syn_with_warps_s"] / compact_core
        results["ratio_syn_over_optimize50_end_to_end"] = (
            results["ants_syn_s"] / results["register_none_optimize50_s"]
        )

        large = write_pair(scratch / "pair512", size=(512, 512, 300), spacing=(0.78, 0.78, 1.0))
        wall, document = run_register(large, scratch / "large", "--model", str(model), "--optimize", "0")
        stages = document["timings_s"]
        results["large_wall_s"] = wall
        results["large_stages_s"] = stages
        results["large_read_write_s"] = wall - stages["total"]
        results["large_all_but_network_s"] = (
            wall - stages.get("network", 0.0) - stages["metrics"] - stages["load model"]
        )
        results["large_all_but_network_with_metrics_s"] = (
            wall - stages.get("network", 0.0) - stages["load model"]
        )
    (args.out / "bench_register.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    ratio = results["ratio_syn_with_warps_over_compact_core"]
    print(f"\nANTs SyN (+ warps) vs compact + init (registration + warps): {ratio:.1f}x (target >= 10x)")
    ratio = results["ratio_syn_over_compact_end_to_end"]
    print(f"ANTs SyN vs compact + init end to end (read, metrics, write included): {ratio:.1f}x")
    large = results["large_all_but_network_s"]
    print(f"512x512x300, all but network and metrics: {large:.1f} s (target < 5 s)")


if __name__ == "__main__":
    main()
