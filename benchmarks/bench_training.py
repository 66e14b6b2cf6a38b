"""Training step time (``compact`` network, UW-NSD loss), measured in ONE run on the same machine.

For each grid (64^3, and 128^3 unless ``--grids 64``), one optimiser update (forward, backward, Adam;
accumulation 1) on phantom subjects from ``make_phantom_dataset``:
  1. batch 1 on pairs made beforehand (the network and loss alone);
  2. batch 1 with the pairs made by the augmentation layer inside the loop (what training does);
  3. global batch 2 on one CPU device, and split over 2 logical CPU devices (MirroredStrategy, 1 each).
The CPU is split into 2 logical devices at start-up (before TensorFlow initialises); both share the
same cores, so (3) measures the cost of the distribution machinery, not a speed-up.
Ratios are printed, never asserted. Usage: python benchmarks/bench_training.py [--grids 64 128]
[--repeats 10] [--out bench_output]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def median_seconds(functions: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds, after ``warmup`` rounds (tracing).

    Each round calls every function once, so a change of machine load during the run affects all
    settings alike and their ratios stay comparable.
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_grid(grid: int, repeats: int, folder: Path) -> dict[str, float]:
    """Median seconds per update of the four settings at a ``grid``^3 model grid."""
    import numpy as np
    import tensorflow as tf

    from dareg.training import dataset
    from dareg.training.config import load_config
    from dareg.training.trainer import Trainer

    data = dataset.make_phantom_dataset(
        folder, n_subjects=2, grid_shape=(grid,) * 3, seed=0, val_fraction=0.0, test_fraction=0.0
    )
    paths = dataset.load_split(data)["train"]
    subjects = list(dataset.iter_training_arrays(paths, num_labels=2))
    images = np.stack([image for image, _ in subjects])
    labels = np.stack([label for _, label in subjects])
    spacing = dataset.load_dataset_info(data)["spacing_mm"]
    configs = Path(__file__).resolve().parents[1] / "scripts" / "configs"

    def trainer(strategy, batch_size: int) -> Trainer:
        overrides = {
            "data": {"dataset": str(data)},
            "model": {"grid_shape": [grid] * 3},
            "training": {"batch_size": batch_size, "accumulation_steps": 1},
            "augmentation": {"tps_nodes": 15, "max_rotation_deg": 10.0, "max_translation_mm": 30.0},
        }
        return Trainer(load_config(configs / "ci.yaml", overrides), strategy, spacing)

    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    single = trainer(one_device, 1)
    pair = single.make_pairs(images[:1], labels[:1])
    batch_two = trainer(one_device, 2)
    mirrored = trainer(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 1)
    pair_two = batch_two.make_pairs(images, labels)
    settings = {
        "batch 1, pairs made beforehand": lambda: single.update([pair]),
        "batch 1, augmentation layer in the loop": lambda: single.update(
            [single.make_pairs(images[:1], labels[:1])]
        ),
        "batch 2, 1 device": lambda: batch_two.update([pair_two]),
        "batch 2, 2 logical devices (1 each)": lambda: mirrored.update([pair_two]),
    }
    return median_seconds(settings, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--grids", type=int, nargs="+", default=[64, 128], help="grid sizes (multiples of 32)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (one update per setting each)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench_output"), help="folder for training_steps.json"
    )
    args = parser.parse_args()

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for grid in args.grids:
            results[f"{grid}^3"] = measure_grid(grid, args.repeats, Path(folder) / str(grid))
    for grid, times in results.items():
        print(f"\ncompact, UW-NSD, {grid} grid: median seconds per update ({args.repeats} rounds)")
        for setting, seconds in times.items():
            print(f"  {setting:42s} {seconds:8.3f}")
        augmentation = (
            times["batch 1, augmentation layer in the loop"] / times["batch 1, pairs made beforehand"]
        )
        devices = times["batch 2, 2 logical devices (1 each)"] / times["batch 2, 1 device"]
        print(f"  ratio with / without augmentation layer:  {augmentation:.2f}")
        print(f"  ratio 2 logical devices / 1 device:       {devices:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_steps.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
