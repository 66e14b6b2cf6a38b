"""The trainer end to end on phantom datasets (compact network, 32^3 grid, a few updates per run).

What is checked against what:
- every design trains from its shipped config and its loss on the FIXED validation set drops;
- a model trained a few hundred updates beats the identity on held-out phantom pairs, scored with
  ``dareg.metrics.dice`` and, for the TRE, against the exact ground-truth flow of the augmentation layer;
- uncertainty weights sum to 1, move, and reach TensorBoard (event files read back with TensorFlow);
- a ``dareg train`` subprocess killed with SIGKILL after its first checkpoint resumes at the right
  epoch, LR and optimiser iteration (read from the checkpoint files, independently of the trainer);
- one update on 2 logical CPU devices (MirroredStrategy) equals the single-device update (subprocess:
  logical devices must be configured before TensorFlow initialises);
- the saved model runs in ``dareg register --model``; two-step transfer learning freezes the encoder
  first; bad inputs exit with code 2 before any training (nothing written).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf
import yaml

from dareg import metrics
from dareg.cli import main
from dareg.models.config import ModelConfig
from dareg.models.modelio import load_model, save_model
from dareg.models.transformer import warp
from dareg.models.unet import build_registration_network
from dareg.training import dataset
from dareg.training.augmentation import SyntheticPairAugmentation
from dareg.training.config import load_config, merge
from dareg.training.designs import DESIGNS
from dareg.training.trainer import CHECKPOINT_DIR, ENCODER_PREFIX, HISTORY_FILE, MODEL_DIR, train

from cli_helpers import folder_listing, write_case
from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "scripts" / "configs"
#: Every design's config, shrunk: compact network, 32^3, gentle deformations (a 32^3 voxel is ~6 mm).
TINY = {
    "model": {"preset": "compact", "grid_shape": [32, 32, 32]},
    "training": {"epochs": 2, "steps_per_epoch": 10, "accumulation_steps": 1},
    "augmentation": {"max_translation_mm": 10.0, "max_rotation_deg": 5.0, "tps_nodes": 8},
    "validation": {"pairs": 2},
    "logging": {"image_every": 0},
}


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> Path:
    """12 phantom subjects on a 32^3 grid: 8 train, 2 validation, 2 test."""
    folder = tmp_path_factory.mktemp("phantom_dataset")
    return dataset.make_phantom_dataset(
        folder, n_subjects=12, grid_shape=(32, 32, 32), seed=0, val_fraction=0.15, test_fraction=0.15
    )


def tiny_config(design: str, dataset_dir: Path, overrides: dict | None = None):
    return load_config(
        CONFIGS / f"{design}.yaml", merge(merge(TINY, {"data": {"dataset": dataset_dir}}), overrides or {})
    )


@pytest.fixture(scope="module")
def design_runs(phantom_dataset, tmp_path_factory) -> dict:
    """Each design trained for 2 epochs of 10 updates from its shipped config (UW-NSD also logs images)."""
    runs = {}
    for design in DESIGNS:
        overrides = {"logging": {"image_every": 1}} if design == "UW-NSD" else {}
        out = tmp_path_factory.mktemp(design)
        runs[design] = (out, train(tiny_config(design, phantom_dataset, overrides), out))
    return runs


@pytest.mark.parametrize("design", list(DESIGNS))
def test_each_design_trains_from_its_config_and_its_validation_loss_drops(design_runs, design):
    out, result = design_runs[design]
    history = result.history
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert [r["iterations"] for r in history] == [0, 10, 20]
    losses = [r["validation"]["loss"] for r in history]
    assert losses[-1] < losses[0], losses
    assert set(DESIGNS[design].terms) < set(history[-1]["train"]) and "regularizer" in history[-1]["train"]
    assert json.loads((out / HISTORY_FILE).read_text()) == history
    loaded = load_model(out / MODEL_DIR)
    assert loaded.config.design == design
    assert loaded.config.training["epoch"] == result.best_epoch
    assert loaded.config.training["validation"]["loss"] == pytest.approx(min(losses))
    assert loaded.config.normalisation == {"kind": "ct_window", "low": -200.0, "high": 300.0}


@pytest.mark.parametrize("design", ["UW-NSD", "UW-NSDH"])
def test_uncertainty_weights_sum_to_one_and_move(design_runs, design):
    _, result = design_runs[design]
    terms = DESIGNS[design].terms
    for record in result.history[1:]:
        weights = [record["train"][f"weight_{t}"] for t in terms]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        assert record["train"]["weight_regularizer"] == pytest.approx(5e-3)  # held fixed (no decay)
    assert max(abs(w - 1 / len(terms)) for w in weights) > 1e-3


def event_values(folder: Path) -> dict[str, list]:
    """tag -> [(step, plugin, value)] from TensorBoard event files, read with TensorFlow alone."""
    values: dict[str, list] = {}
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                values.setdefault(value.tag, []).append((event.step, plugin, tf.make_ndarray(value.tensor)))
    return values


def test_tensorboard_logs_losses_weights_learning_rate_and_examples(design_runs):
    out, result = design_runs["UW-NSD"]
    train_events = event_values(out / "logs" / "train")
    for tag in ("loss", "ncc", "ssim", "dice", "regularizer", "weight_ncc", "weight_dice", "learning_rate"):
        assert [(s, p) for s, p, _ in train_events[tag]] == [(1, "scalars"), (2, "scalars")], tag
    assert float(train_events["weight_ssim"][-1][2]) == pytest.approx(
        result.history[2]["train"]["weight_ssim"]
    )
    validation_events = event_values(out / "logs" / "validation")
    assert [s for s, _, _ in validation_events["loss"]] == [0, 1, 2]
    assert float(validation_events["flow_error_mm"][0][2]) == pytest.approx(
        result.history[0]["validation"]["flow_error_mm"]
    )
    (step, plugin, image), *_ = validation_events["examples/fixed_moving_warped_difference"]
    assert plugin == "images" and (image[0], image[1]) == (b"128", b"32")  # 4 slices of 32 side by side
    assert tf.io.decode_png(image[2]).shape == (32, 128, 1)


def held_out_scores(network, paths: list[Path], pairs_per_subject: int = 4) -> dict[str, float]:
    """Mean parenchyma DSC and TRE (mm, over fixed parenchyma voxels) of ``network`` and of the identity.

    Pairs come from an augmentation layer with its own seed; its flow is the exact ground truth, so the
    TRE of a voxel is |predicted - true displacement| in mm, and the identity's is |true displacement|.
    """
    scores = {"dsc": [], "dsc_identity": [], "tre": [], "tre_identity": []}
    for path in paths:
        subject = dataset.read_subject(path)
        spacing = np.asarray(subject.attrs["spacing_mm"], np.float32)
        layer = SyntheticPairAugmentation(spacing, seed=123, max_translation_mm=10.0, max_rotation_deg=5.0)
        image = np.repeat(subject.image[None, ..., None], pairs_per_subject, axis=0)
        ids = np.repeat(subject.labels[None, ..., None].astype(np.float32), pairs_per_subject, axis=0)
        pair = layer(image, ids)  # nearest: label ids stay ids
        flow = network.predict_on_batch([pair["moving"], pair["fixed"]])["flow"]
        warped_ids = warp(pair["moving_labels"], flow, interpolation="nearest").numpy()
        for k in range(pairs_per_subject):
            fixed_ids = pair["fixed_labels"][k, ..., 0].numpy().astype(np.uint8)
            fixed_image = sitk.GetImageFromArray(fixed_ids)
            for key, moved in (("dsc", warped_ids[k]), ("dsc_identity", pair["moving_labels"][k].numpy())):
                dice = metrics.dice(
                    fixed_image, sitk.GetImageFromArray(moved[..., 0].astype(np.uint8)), labels=[1]
                )
                scores[key].append(dice[1])
            liver = fixed_ids == 1
            truth = pair["flow"][k].numpy()[liver] * spacing
            scores["tre"].append(np.linalg.norm(flow[k][liver] * spacing - truth, axis=1).mean())
            scores["tre_identity"].append(np.linalg.norm(truth, axis=1).mean())
    return {key: float(np.mean(values)) for key, values in scores.items()}


def test_a_few_hundred_updates_beat_the_identity_on_held_out_pairs(phantom_dataset, tmp_path):
    """BL-N, 600 updates of batch 1 (about 30 s on 2 CPU cores), scored on the held-out test subjects.

    Measured: parenchyma DSC 0.75 -> 0.83, TRE 10.3 -> 7.4 mm (a 32^3 voxel is about 6 mm).
    """
    config = tiny_config(
        "BL-N",
        phantom_dataset,
        {"training": {"epochs": 6, "steps_per_epoch": 100}, "validation": {"pairs": 4}},
    )
    result = train(config, tmp_path / "run")
    network = load_model(result.model_dir).network
    scores = held_out_scores(network, dataset.load_split(phantom_dataset)["test"])
    print("held-out phantom pairs (model vs identity):", scores)
    assert scores["tre"] < 0.85 * scores["tre_identity"], scores
    assert scores["dsc"] > scores["dsc_identity"] + 0.04, scores


def test_the_trained_model_registers_with_dareg_register(design_runs, tmp_path, capsys):
    out, _ = design_runs["UW-NSD"]
    case = write_case(tmp_path / "case")
    code = main(
        [*case.args(tmp_path / "registered")[:-6], "--model", str(out / MODEL_DIR), "--optimize", "0"]
    )
    assert code == 0, capsys.readouterr().err
    assert "model: UW-NSD" in capsys.readouterr().out
    document = json.loads((tmp_path / "registered" / "metrics.json").read_text())
    assert document["model"] == "UW-NSD"
    assert document["model_grid"]["size_xyz"] == [32, 32, 32]


def network_at(checkpoint: str):
    """A compact 32^3 network with the weights of a trainer checkpoint."""
    network = build_registration_network("compact", (32, 32, 32))
    tf.train.Checkpoint(network=tf.train.Checkpoint(weights=network.weights)).read(
        checkpoint
    ).expect_partial()
    return network


def test_two_step_transfer_freezes_the_encoder_first(design_runs, phantom_dataset, tmp_path):
    source = load_model(design_runs["BL-N"][0] / MODEL_DIR).network
    overrides = {
        "transfer": {
            "init_from": str(design_runs["BL-N"][0] / MODEL_DIR),
            "mode": "two-step",
            "frozen_epochs": 1,
        },
        "training": {"steps_per_epoch": 3},
    }
    out = tmp_path / "transfer"
    result = train(tiny_config("BL-N", phantom_dataset, overrides), out)
    assert [r["learning_rate"] for r in result.history] == pytest.approx([1e-4] * 3)
    first, second = (network_at(str(out / CHECKPOINT_DIR / f"ckpt-{e}")) for e in (1, 2))
    for layer in source.layers:
        if not layer.weights:
            continue
        before = layer.get_weights()[0]
        after_first = first.get_layer(layer.name).get_weights()[0]
        after_second = second.get_layer(layer.name).get_weights()[0]
        if layer.name.startswith(ENCODER_PREFIX):
            np.testing.assert_array_equal(after_first, before, err_msg=layer.name)
            assert not np.array_equal(after_second, after_first), layer.name
        else:
            assert not np.array_equal(after_first, before), layer.name


def write_config(path: Path, dataset_dir: Path, overrides: dict) -> Path:
    data = merge(yaml.safe_load((CONFIGS / "ci.yaml").read_text()), {"data": {"dataset": str(dataset_dir)}})
    path.write_text(yaml.safe_dump(merge(data, overrides)), encoding="utf-8")
    return path


def checkpoint_value(folder: Path, name: str):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder / CHECKPOINT_DIR)))
    return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")


def test_a_killed_run_resumes_at_its_epoch_learning_rate_and_optimizer_state(
    phantom_dataset, tmp_path, capsys
):
    """SIGKILL after the first checkpoint; the LR drops every epoch after the first (plateau patience 1,
    an unreachable min_delta), so a restarted LR or iteration count would show."""
    epochs, steps = 8, 2
    overrides = {
        "training": {
            "epochs": epochs,
            "steps_per_epoch": steps,
            "plateau_patience": 1,
            "plateau_min_delta": 100.0,
        },
        "logging": {"image_every": 0},
    }
    config = write_config(tmp_path / "run.yaml", phantom_dataset, overrides)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dareg", "train", "--config", str(config), "--out", str(out)]
    log = tmp_path / "first_run.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT_DIR / "checkpoint").exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = int(checkpoint_value(out, "schedule/epoch"))
    assert 1 <= killed_at < epochs, "the run was not killed mid-training"
    assert int(checkpoint_value(out, "optimizer/_iterations")) == killed_at * steps

    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(out), "--resume"]) == 0
    printed = [line.split()[1] for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert printed == [f"{e}/{epochs}" for e in range(killed_at + 1, epochs + 1)]
    assert int(checkpoint_value(out, "schedule/epoch")) == epochs
    assert int(checkpoint_value(out, "optimizer/_iterations")) == epochs * steps
    assert float(checkpoint_value(out, "optimizer/_learning_rate")) == pytest.approx(
        1e-3 * 0.1 ** (epochs - 1)
    )
    history = json.loads((out / HISTORY_FILE).read_text())
    assert [r["epoch"] for r in history] == list(range(epochs + 1))
    assert [r["iterations"] for r in history] == [e * steps for e in range(epochs + 1)]
    expected_rates = [1e-3 * 0.1 ** max(0, e - 2) for e in range(epochs + 1)]
    assert [r["learning_rate"] for r in history] == pytest.approx(expected_rates, rel=1e-5)
    load_model(out / MODEL_DIR)

    other = write_config(
        tmp_path / "other.yaml", phantom_dataset, merge(overrides, {"training": {"learning_rate": 1e-4}})
    )
    assert main(["train", "--config", str(other), "--out", str(out), "--resume"]) == 2
    assert "training.learning_rate: 0.001 -> 0.0001" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err


DISTRIBUTED_STEP = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from scipy.ndimage import gaussian_filter
    from dareg.training.config import load_config
    from dareg.training.trainer import Trainer

    def trainer(strategy, batch_size):
        training = {"batch_size": batch_size, "accumulation_steps": 2}
        config = load_config(sys.argv[1], {"data": {"dataset": "-"}, "training": training})
        return Trainer(config, strategy, (5.0, 5.5, 6.0))

    single = trainer(tf.distribute.OneDeviceStrategy("/cpu:0"), 2)
    mirrored = trainer(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 1)
    mirrored.network.set_weights(single.network.get_weights())
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random((2, 32, 32, 32)), (0, 2, 2, 2))
    image = ((image - image.min()) / np.ptp(image))[..., None].astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[np.digitize(image[..., 0], [0.45, 0.6])]
    pairs = [single.make_pairs(image, labels) for _ in range(2)]
    start = [v.numpy() for v in single.variables]
    losses = [single.update(pairs), mirrored.update(pairs)]
    after = [[v.numpy() for v in t.variables] for t in (single, mirrored)]
    print(json.dumps({
        "replicas": mirrored.strategy.num_replicas_in_sync,
        "losses": losses,
        "largest_change": max(float(np.abs(a - s).max()) for a, s in zip(after[0], start)),
        "largest_difference": max(float(np.abs(a - b).max()) for a, b in zip(*after)),
    }))
    """
)


def test_a_distributed_update_equals_the_single_device_update():
    completed = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_STEP, str(CONFIGS / "ci.yaml")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    single, mirrored = result["losses"]
    assert set(single) == set(mirrored) and all(
        single[k] == pytest.approx(mirrored[k], rel=1e-5, abs=1e-7) for k in single
    )
    assert result["largest_change"] > 1e-4  # the update did something (Adam moves by about the LR)
    assert result["largest_difference"] < 1e-6, result


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_train_in_lockstep(phantom_dataset, tmp_path):
    """MultiWorkerMirroredStrategy: two `dareg train` processes on localhost (TF_CONFIG) share each update."""
    overrides = {"training": {"epochs": 2, "steps_per_epoch": 2}, "distribute": {"strategy": "multi_worker"}}
    config = write_config(
        tmp_path / "workers.yaml", phantom_dataset, merge(overrides, {"logging": {"image_every": 0}})
    )
    out = tmp_path / "run"
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    logs, processes = [tmp_path / f"worker{i}.log" for i in range(2)], []
    for index, log in enumerate(logs):
        environment = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        with log.open("wb") as stderr:
            command = [sys.executable, "-m", "dareg", "train", "--config", str(config), "--out", str(out)]
            processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
            )
    codes = [process.wait(timeout=240) for process in processes]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    epochs = [[line for line in log.read_text().splitlines() if line.startswith("epoch ")] for log in logs]
    assert len(epochs[0]) == 3  # epochs 0, 1, 2; the same losses on both workers (timings aside)
    assert [line.rsplit("(", 1)[0] for line in epochs[0]] == [line.rsplit("(", 1)[0] for line in epochs[1]]
    readers = [
        tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder)))
        for folder in (out / CHECKPOINT_DIR, out / ".worker-1" / CHECKPOINT_DIR)
    ]
    names = [
        name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(str(out / CHECKPOINT_DIR)))
    ]
    weights = [name for name in names if name.startswith("network/")]
    assert weights and all(
        np.array_equal(readers[0].get_tensor(n), readers[1].get_tensor(n)) for n in weights
    )
    assert int(readers[0].get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 4
    assert sorted(p.name for p in (out / ".worker-1").iterdir()) == [CHECKPOINT_DIR]
    assert (out / MODEL_DIR).is_dir() and (out / HISTORY_FILE).is_file()


def failing_train(args: list[str], out: Path, capsys, expected: str) -> None:
    """Exit code 2 with ``expected`` in the message, no traceback, and nothing written to ``out``."""
    before = folder_listing(out)
    assert main(["train", *args, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dareg: error:") and "Traceback" not in error
    assert expected in error, error
    assert folder_listing(out) == before


def test_bad_configs_exit_2_before_training(phantom_dataset, tmp_path, capsys):
    unknown_key = write_config(tmp_path / "key.yaml", phantom_dataset, {"training": {"epochz": 3}})
    failing_train(
        ["--config", str(unknown_key)], tmp_path / "a", capsys, "training has unknown key(s) ['epochz']"
    )
    unknown_design = write_config(tmp_path / "design.yaml", phantom_dataset, {"design": "UW-NSDX"})
    failing_train(["--config", str(unknown_design)], tmp_path / "b", capsys, "design must be one of")
    grid = write_config(tmp_path / "grid.yaml", phantom_dataset, {"model": {"grid_shape": [64, 64, 64]}})
    failing_train(["--config", str(grid)], tmp_path / "c", capsys, "is on a (32, 32, 32) grid")


def test_bad_datasets_exit_2_before_training(phantom_dataset, tmp_path, capsys):
    config = write_config(tmp_path / "ci.yaml", phantom_dataset, {})
    empty = tmp_path / "empty"
    empty.mkdir()
    failing_train(
        ["--config", str(config), "--dataset", str(empty)], tmp_path / "a", capsys, "not a prepared dataset"
    )
    (empty / dataset.SPLIT_FILE).write_text(json.dumps({"train": [], "val": [], "test": []}))
    failing_train(
        ["--config", str(config), "--dataset", str(empty)], tmp_path / "b", capsys, "lists no subjects"
    )
    one_label = write_config(tmp_path / "one.yaml", phantom_dataset, {"data": {"num_labels": 1}})
    failing_train(["--config", str(one_label)], tmp_path / "c", capsys, "outside the label map 0..1")
    failing_train(["--config", str(config), "--resume"], tmp_path / "d", capsys, "Nothing to resume")


def test_a_transfer_source_of_another_architecture_exits_2(phantom_dataset, tmp_path, capsys):
    source = tmp_path / "velocity_model"
    save_model(
        build_registration_network("compact", (32, 32, 32), integration_steps=2),
        source,
        ModelConfig(preset="compact", grid_shape=(32, 32, 32), integration_steps=2),
    )
    config = write_config(tmp_path / "ci.yaml", phantom_dataset, {})
    args = ["--config", str(config), "--init-from", str(source)]
    failing_train(args, tmp_path / "run", capsys, "Start from a model of the same architecture")
