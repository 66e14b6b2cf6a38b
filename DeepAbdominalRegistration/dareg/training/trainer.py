"""The trainer: ``dareg train``. A custom ``tf.GradientTape`` loop under a ``tf.distribute`` strategy.

One optimiser update (Adam) averages the gradients of ``accumulation_steps`` mini-batches of
``batch_size`` pairs per replica (the paper: 8 x 1). Pairs are made on the fly from single subjects by
the synthetic-pair augmentation layer, outside the replicas, so every replica count sees the same pairs.
After each epoch the model is scored on a FIXED validation set (made once by its own seeded
augmentation layer), the LR is reduced on plateau (x0.1 after 10 epochs), training stops early when
the validation loss no longer improves, and the best model on validation is saved.

Run folder (``--out``)
----------------------
- ``run_config.json``  the config as run and its digest; ``--resume`` refuses a different config.
- ``checkpoints/``     ``tf.train.Checkpoint`` after every epoch: network, optimiser (moments, iteration
  count, LR), uncertainty weights, the augmentation layer's random state and the schedule state
  (epoch, best losses, plateau and early-stopping counters, history), so a resumed run continues
  exactly where the last checkpoint left it, at the right epoch, LR and optimiser state.
- ``model/``           the best model on validation, a model folder ``dareg register --model`` loads,
  saved atomically BEFORE the checkpoint of its epoch (a crash in between replays that epoch).
- ``logs/``            TensorBoard: ``train/`` and ``validation/`` scalars (losses, every term,
  uncertainty weights, LR) and example slices (fixed | moving | warped | difference).
- ``history.json``     one record per epoch (epoch 0 = the untrained network on the validation set).

Distribution: gradients are accumulated per replica in ON_READ variables (each replica its own sum),
and the Keras optimiser all-reduces (sums) them across replicas when it applies them; each replica's
loss is scaled by 1 / (accumulation_steps x replicas), so a distributed update equals the
single-device update on the same global batch. With several workers, worker ``w`` reads its slice of
every global mini-batch and only worker 0 writes the model, the logs and the history.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from dareg import io
from dareg.errors import DaregError
from dareg.models.config import ModelConfig
from dareg.models.device import select_device
from dareg.models.modelio import load_model, save_model
from dareg.models.transformer import warp
from dareg.models.unet import build_registration_network
from dareg.training import dataset
from dareg.training.augmentation import SyntheticPairAugmentation
from dareg.training.config import DistributeSection, TrainConfig
from dareg.training.designs import DESIGNS, build_objective
from dareg.training.losses import SoftDice

RUN_CONFIG_FILE = "run_config.json"
HISTORY_FILE = "history.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
ENCODER_PREFIX = "unet_enc_"  # the encoder convs of dareg.models.unet (frozen first in "two-step")
_CHECKPOINTS_KEPT = 2


# ---------------------------------------------------------------------------------------------------------
# The model, its objective and optimiser, and the compiled steps
# ---------------------------------------------------------------------------------------------------------


def make_strategy(section: DistributeSection) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy a config asks for; create it before any other TensorFlow work."""
    try:
        if section.strategy == "mirrored":
            return tf.distribute.MirroredStrategy(list(section.devices) if section.devices else None)
        if section.strategy == "multi_worker":
            return tf.distribute.MultiWorkerMirroredStrategy()
        return tf.distribute.OneDeviceStrategy(select_device("auto"))
    except (ValueError, RuntimeError) as error:
        raise DaregError(f"distribute.strategy {section.strategy!r} cannot start: {error}") from None


def worker_position(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(index, count) of this worker among the machines of a multi-worker run; (0, 1) otherwise."""
    local = len(strategy.extended.worker_devices)
    resolver = strategy.cluster_resolver
    index = resolver.task_id if resolver is not None and resolver.task_id is not None else 0
    return int(index), strategy.num_replicas_in_sync // local


class Trainer:
    """Network, design objective and Adam under ``strategy``, with compiled update and validation steps.

    Parameters
    ----------
    config : the run's configuration.
    strategy : from :func:`make_strategy`; the network and uncertainty weights are created in its scope.
    spacing_mm : (z, y, x) grid spacing for the augmentation layer's mm limits and the mm flow error.

    A *pair* is a dict ``fixed``, ``moving`` (B, D, H, W, 1), ``fixed_labels``, ``moving_labels``
    (B, D, H, W, L; only segmentation-guided designs need them in training) for the replicas' global
    batch B = ``batch_size`` x replicas on this worker.
    """

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy, spacing_mm) -> None:
        self.config = config
        self.strategy = strategy
        self.design = DESIGNS[config.design]
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.worker_index, self.worker_count = worker_position(strategy)
        keras.utils.set_random_seed(config.seed)  # the network's initial weights
        with strategy.scope():
            self.network = build_registration_network(
                config.model.preset, config.model.grid_shape, integration_steps=config.model.integration_steps
            )
            self.objective = build_objective(config.design, config.losses)
            self.variables = list(self.network.trainable_variables) + self.objective.trainable_variables
            self.optimizer = keras.optimizers.Adam(self._initial_learning_rate())
            self.optimizer.build(self.variables)
            self.accumulators = [
                tf.Variable(
                    tf.zeros(v.shape, v.dtype),
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.SUM,
                )
                for v in self.variables
            ]
        worker_seed = int(
            np.random.SeedSequence([config.augmentation.seed, self.worker_index]).generate_state(1)[0]
        )
        self.augmentation = self._augmentation_layer(worker_seed)
        self._encoder_frozen = False
        self._compiled: dict[bool, tuple[Callable, Callable]] = {}
        self._evaluate = tf.function(self._evaluate_pair)

    def _initial_learning_rate(self) -> float:
        transfer = self.config.transfer
        return transfer.learning_rate if transfer.init_from else self.config.training.learning_rate

    def _augmentation_layer(self, seed: int) -> SyntheticPairAugmentation:
        section = self.config.augmentation
        return SyntheticPairAugmentation(
            self.spacing_mm,
            seed=seed,
            control_points=section.control_points,
            max_deformation_mm=section.max_deformation_mm,
            max_rotation_deg=section.max_rotation_deg,
            max_translation_mm=section.max_translation_mm,
            gamma=section.gamma,
            brightness=section.brightness,
            label_interpolation="nearest",  # fixed labels stay one-hot targets
            tps_nodes=section.tps_nodes,
        )

    # --- weights --------------------------------------------------------------------------------------

    def load_initial_weights(self, model_dir: str | Path) -> None:
        """Transfer learning: copy every layer's weights from a model folder of the same preset."""
        source = load_model(model_dir)
        model = self.config.model
        if (source.config.preset, source.config.integration_steps) != (model.preset, model.integration_steps):
            raise DaregError(
                f"transfer.init_from {model_dir} is a {source.config.preset!r} network with "
                f"integration_steps {source.config.integration_steps}; this config trains "
                f"{model.preset!r} with {model.integration_steps}. Start from a model of the same "
                "architecture (preset and integration steps)."
            )
        for layer in self.network.layers:
            if layer.weights:
                layer.set_weights(source.network.get_layer(layer.name).get_weights())

    def freeze_encoder(self, frozen: bool) -> None:
        """Exclude (or include again) the encoder convs from the updates (two-step transfer learning)."""
        for layer in self.network.layers:
            if layer.name.startswith(ENCODER_PREFIX):
                layer.trainable = not frozen
        self._encoder_frozen = frozen

    # --- training -------------------------------------------------------------------------------------

    def make_pairs(self, image, labels) -> dict:
        """Training pairs from subjects (B, D, H, W, 1) and one-hot labels (B, D, H, W, L)."""
        pair = self.augmentation(image, labels if self.design.needs_labels else None)
        return {key: pair[key] for key in _pair_keys(self.design.needs_labels)}

    def update(self, pairs: Iterable[dict]) -> dict[str, float]:
        """One optimiser update from exactly ``accumulation_steps`` pairs; mean loss and terms, UW weights."""
        micro_step, apply_step = self._steps()
        sums, count = {}, 0
        for pair in pairs:
            values = micro_step(self._distribute(pair))
            sums = {key: sums.get(key, 0.0) + value for key, value in values.items()}
            count += 1
        if count != self.config.training.accumulation_steps:
            raise ValueError(f"an update needs {self.config.training.accumulation_steps} pairs, got {count}")
        apply_step()
        means = {key: float(value) / count for key, value in sums.items()}
        return {**means, **{key: float(value) for key, value in self.objective.weights().items()}}

    def _distribute(self, pair: dict):
        """Split a worker's batch among its replicas (replica r gets rows r*b .. (r+1)*b - 1)."""
        size = self.config.training.batch_size
        local = len(self.strategy.extended.worker_devices)

        def part(context):
            start = (context.replica_id_in_sync_group % local) * size
            return {key: value[start : start + size] for key, value in pair.items()}

        return self.strategy.experimental_distribute_values_from_function(part)

    def _steps(self) -> tuple[Callable, Callable]:
        """The compiled (micro step, apply step) for the current set of trainable variables."""
        if self._encoder_frozen not in self._compiled:
            trainable = {id(v) for v in self.network.trainable_variables + self.objective.trainable_variables}
            chosen = [i for i, v in enumerate(self.variables) if id(v) in trainable]
            variables = [self.variables[i] for i in chosen]
            accumulators = [self.accumulators[i] for i in chosen]
            scale = 1.0 / (self.config.training.accumulation_steps * self.strategy.num_replicas_in_sync)

            def replica_micro(pair):
                with tf.GradientTape() as tape:
                    outputs = self.network([pair["moving"], pair["fixed"]], training=True)
                    total, terms = self.objective(
                        pair["fixed"],
                        outputs["warped"],
                        outputs["flow"],
                        pair.get("fixed_labels"),
                        pair.get("moving_labels"),
                    )
                    scaled = total * scale
                gradients = tape.gradient(scaled, variables)
                for accumulator, gradient in zip(accumulators, gradients, strict=True):
                    accumulator.assign_add(gradient)
                return {"loss": total, **terms}

            @tf.function
            def micro_step(distributed_pair):
                values = self.strategy.run(replica_micro, args=(distributed_pair,))
                return {k: self.strategy.reduce("MEAN", v, axis=None) for k, v in values.items()}

            def replica_apply():
                # Each replica passes its own sums; the Keras optimiser all-reduces (sums) them.
                sums = [a.read_value() for a in accumulators]
                self.optimizer.apply_gradients(zip(sums, variables, strict=True))
                for accumulator in accumulators:
                    accumulator.assign(tf.zeros_like(accumulator))

            @tf.function
            def apply_step():
                self.strategy.run(replica_apply)

            self._compiled[self._encoder_frozen] = (micro_step, apply_step)
        return self._compiled[self._encoder_frozen]

    # --- validation -----------------------------------------------------------------------------------

    def make_validation_set(self, paths: list[Path]) -> list[dict]:
        """``validation.pairs`` pairs made ONCE from the validation subjects (cycled) by a layer seeded with
        ``validation.seed``; kept compact in memory (labels as ids, the true flow as float16)."""
        layer = self._augmentation_layer(self.config.validation.seed)
        count = self.config.validation.pairs
        cycled = [paths[i % len(paths)] for i in range(count)]
        pairs = []
        for image, labels in dataset.iter_training_arrays(cycled, num_labels=self.config.data.num_labels):
            pair = layer(image[None], labels[None])
            pairs.append(
                {
                    "fixed": pair["fixed"].numpy(),
                    "moving": pair["moving"].numpy(),
                    "fixed_labels": np.argmax(pair["fixed_labels"].numpy(), axis=-1).astype(np.uint8),
                    "moving_labels": np.argmax(labels, axis=-1).astype(np.uint8)[None],
                    "flow": pair["flow"].numpy().astype(np.float16),
                }
            )
        return pairs

    def evaluate(self, pairs: list[dict]) -> dict[str, float]:
        """Mean over the validation pairs of the monitored loss, every term, ``dice_score`` (mean soft Dice of
        the labels, higher is better) and ``flow_error_mm`` (|predicted - true flow| over labelled voxels)."""
        sums: dict[str, float] = {}
        for pair in pairs:
            for key, value in self._evaluate(**pair).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {key: value / len(pairs) for key, value in sums.items()}

    def _evaluate_pair(self, fixed, moving, fixed_labels, moving_labels, flow):
        channels = self.config.data.num_labels + 1
        fixed_labels = tf.one_hot(tf.cast(fixed_labels, tf.int32), channels)
        moving_labels = tf.one_hot(tf.cast(moving_labels, tf.int32), channels)
        outputs = self.network([moving, fixed], training=False)
        terms = self.objective.terms(fixed, outputs["warped"], outputs["flow"], fixed_labels, moving_labels)
        warped_labels = warp(moving_labels, outputs["flow"], interpolation="linear")
        error_mm = tf.norm((outputs["flow"] - tf.cast(flow, tf.float32)) * self.spacing_mm, axis=-1)
        labelled = tf.reduce_sum(fixed_labels[..., 1:], axis=-1)
        return {
            "loss": self.objective.monitor(terms),
            **terms,
            "dice_score": 1.0 - SoftDice(variant="macro")(fixed_labels, warped_labels),
            "flow_error_mm": tf.reduce_sum(error_mm * labelled) / tf.maximum(tf.reduce_sum(labelled), 1.0),
        }

    def example_slices(self, pair: dict) -> np.ndarray:
        """Middle axial slice of fixed | moving | warped | |fixed - warped| side by side, (H, 4W), [0, 1]."""
        outputs = self.network([pair["moving"], pair["fixed"]], training=False)
        middle = pair["fixed"].shape[1] // 2
        fixed, moving = pair["fixed"][0, middle, ..., 0], pair["moving"][0, middle, ..., 0]
        warped = outputs["warped"].numpy()[0, middle, ..., 0]
        return np.clip(np.concatenate([fixed, moving, warped, np.abs(fixed - warped)], axis=1), 0.0, 1.0)


def _pair_keys(with_labels: bool) -> tuple[str, ...]:
    return ("fixed", "moving", "fixed_labels", "moving_labels") if with_labels else ("fixed", "moving")


# ---------------------------------------------------------------------------------------------------------
# Schedule state (checkpointed), TensorBoard, the run folder
# ---------------------------------------------------------------------------------------------------------


class ScheduleState(tf.Module):
    """Everything besides weights and optimiser that a resumed run needs, as checkpointed variables."""

    def __init__(self) -> None:
        super().__init__(name="schedule")
        self.epoch = tf.Variable(0, dtype=tf.int64)  # epochs completed
        self.best_loss = tf.Variable(math.inf, dtype=tf.float64)  # of the saved model
        self.best_epoch = tf.Variable(0, dtype=tf.int64)
        self.plateau_best = tf.Variable(math.inf, dtype=tf.float64)
        self.plateau_wait = tf.Variable(0, dtype=tf.int64)
        self.stopping_best = tf.Variable(math.inf, dtype=tf.float64)
        self.stopping_wait = tf.Variable(0, dtype=tf.int64)
        self.history = tf.Variable("[]")  # JSON list of epoch records

    def records(self) -> list[dict]:
        return json.loads(self.history.numpy().decode("utf-8"))

    def append(self, record: dict) -> None:
        self.history.assign(json.dumps([*self.records(), record]))


def _improves(value: float, best: tf.Variable, wait: tf.Variable, min_delta: float) -> bool:
    """Keras-style patience bookkeeping: reset ``wait`` on an improvement by more than ``min_delta``."""
    if value < float(best.numpy()) - min_delta:
        best.assign(value)
        wait.assign(0)
        return True
    wait.assign_add(1)
    return False


def _plugin_metadata(plugin: str, data_class: int) -> bytes:
    """TensorBoard summary metadata (written with core TensorFlow: the tensorboard package is optional)."""
    metadata = summary_pb2.SummaryMetadata(data_class=data_class)
    metadata.plugin_data.plugin_name = plugin
    return metadata.SerializeToString()


_SCALAR_METADATA = _plugin_metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
_IMAGE_METADATA = _plugin_metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)


class TensorBoardLog:
    """Scalars and images in TensorBoard's event format, one writer per split (``train``, ``validation``)."""

    def __init__(self, folder: Path) -> None:
        self.writers = {
            split: tf.summary.create_file_writer(str(folder / split)) for split in ("train", "validation")
        }

    def scalars(self, split: str, values: dict[str, float], step: int) -> None:
        with self.writers[split].as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)

    def image(self, split: str, tag: str, image: np.ndarray, step: int) -> None:
        """A (H, W) image in [0, 1] as an 8-bit PNG."""
        png = tf.io.encode_png(tf.constant(np.round(image * 255).astype(np.uint8)[..., None]))
        height, width = image.shape
        with self.writers[split].as_default():
            tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height)), png])
            tf.summary.write(tag, tensor, step=step, metadata=_IMAGE_METADATA)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()


def _differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: recorded -> current`` for every leaf that differs between two config dicts."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


@dataclass(frozen=True)
class RunFolder:
    """The files of one run under ``root`` (see the module docstring); workers > 0 keep private checkpoints
    (every worker must take part in saving a multi-worker checkpoint) and write nothing else."""

    root: Path
    worker: int = 0

    @property
    def chief(self) -> bool:
        return self.worker == 0

    @property
    def checkpoints(self) -> Path:
        return (
            self.root / CHECKPOINT_DIR
            if self.chief
            else self.root / f".worker-{self.worker}" / CHECKPOINT_DIR
        )

    def check(self, config: TrainConfig, resume: bool) -> None:
        """DaregError unless ``resume`` matches what the folder holds (read-only: nothing is created)."""
        path = self.root / RUN_CONFIG_FILE
        if not resume:  # only the chief: the others may look while it creates the folder
            if self.chief and (path.exists() or (self.root / CHECKPOINT_DIR).exists()):
                raise DaregError(
                    f"{self.root} already holds a training run; pass --resume to continue it or choose "
                    "another output folder (--out)."
                )
            return
        if not path.is_file():
            raise DaregError(
                f"Nothing to resume in {self.root} (no {RUN_CONFIG_FILE}); start without --resume."
            )
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DaregError(f"{path} is damaged ({error}); start a new run in another folder.") from None
        changes = _differences(recorded, config.to_dict())
        if changes:
            raise DaregError(
                f"{self.root} was trained with another config ({'; '.join(changes)}); resume with the "
                "config it was started with, or start a new run in another folder."
            )

    def create(self, config: TrainConfig) -> None:
        if self.chief:
            io.write_json(
                {"config": config.to_dict(), "digest": config.digest()}, self.root / RUN_CONFIG_FILE
            )


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingResult:
    """How a run ended: ``start_epoch`` > 0 when it resumed; ``history`` as in ``history.json``."""

    model_dir: Path
    start_epoch: int
    epochs: int
    best_epoch: int
    best_validation_loss: float
    stopped_early: bool
    history: list[dict]


@dataclass(frozen=True)
class _Data:
    train: list[Path]
    val: list[Path]
    spacing_mm: tuple[float, float, float]
    normalisation: dict


def _load_data(config: TrainConfig) -> _Data:
    """The split, checked before training: subjects exist, grids match the model, labels in range."""
    split = dataset.load_split(config.data.dataset)
    info = dataset.load_dataset_info(config.data.dataset)
    for key in ("train", "val"):
        if not split[key]:
            raise DaregError(
                f"Dataset {config.data.dataset} has no {key} subjects; prepare it with more subjects or "
                "other split fractions."
            )
    # Checks every file's header (format, grid, label ids) now; the returned stream itself is not needed.
    dataset.iter_training_arrays(split["train"] + split["val"], num_labels=config.data.num_labels)
    grid = tuple(info.get("grid_shape", ()))
    if grid != config.model.grid_shape:
        raise DaregError(
            f"Dataset {config.data.dataset} is on a {grid} grid but model.grid_shape is "
            f"{config.model.grid_shape}; prepare the dataset with that grid or change the config."
        )
    return _Data(split["train"], split["val"], tuple(info["spacing_mm"]), info["normalisation"])


def _epoch_subjects(paths: list[Path], seed: int, epoch: int, count: int) -> list[Path]:
    """The ``count`` subjects epoch ``epoch`` (0-based) trains on: the next ``count`` of an endless stream of
    passes over ``paths``, pass p in :func:`dareg.training.dataset.epoch_order` (seed, p). A function of
    (seed, epoch) only, so a resumed run sees the same subjects."""
    orders: dict[int, np.ndarray] = {}
    chosen = []
    for position in range(epoch * count, (epoch + 1) * count):
        sweep, offset = divmod(position, len(paths))
        if sweep not in orders:
            orders[sweep] = dataset.epoch_order(len(paths), seed, sweep)
        chosen.append(paths[orders[sweep][offset]])
    return chosen


class _Run:
    """One training run: the epoch loop with validation, schedule, checkpoints, logs and the best model."""

    def __init__(self, config: TrainConfig, trainer: Trainer, data: _Data, folder: RunFolder) -> None:
        self.config, self.trainer, self.data, self.folder = config, trainer, data, folder
        self.state = ScheduleState()
        # Weights as explicit lists: a Keras 3 functional model is not tracked as a checkpoint child.
        checkpoint = tf.train.Checkpoint(
            network=tf.train.Checkpoint(weights=trainer.network.weights),
            optimizer=trainer.optimizer,
            objective=tf.train.Checkpoint(weights=trainer.objective.variables),
            augmentation_rng=trainer.augmentation.seed_generator.state,
            schedule=self.state,
        )
        self.manager = tf.train.CheckpointManager(checkpoint, str(folder.checkpoints), _CHECKPOINTS_KEPT)
        self.log: TensorBoardLog | None = None  # created with the first record: nothing is written before
        training = config.training
        self.global_batch = training.batch_size * trainer.strategy.num_replicas_in_sync
        self.updates = training.steps_per_epoch or max(
            1, len(data.train) // (self.global_batch * training.accumulation_steps)
        )

    def restore(self) -> bool:
        """Load the last checkpoint, if any; True when there was one."""
        if not self.manager.latest_checkpoint:
            return False
        self.manager.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return True

    def run(self, on_epoch: Callable[[dict], None] | None) -> TrainingResult:
        start = int(self.state.epoch.numpy())
        validation = self.trainer.make_validation_set(self.data.val)
        if start == 0:
            self._finish_epoch(
                0, {}, self.trainer.evaluate(validation), validation, time.perf_counter(), on_epoch
            )
        training = self.config.training
        stopped = int(self.state.stopping_wait.numpy()) >= training.early_stopping_patience  # resumed
        epoch = start + 1
        while not stopped and epoch <= training.epochs:
            began = time.perf_counter()
            train_values = self._train_epoch(epoch)
            stopped = self._finish_epoch(
                epoch, train_values, self.trainer.evaluate(validation), validation, began, on_epoch
            )
            epoch += 1
        return TrainingResult(
            model_dir=self.folder.root / MODEL_DIR,
            start_epoch=start,
            epochs=int(self.state.epoch.numpy()),
            best_epoch=int(self.state.best_epoch.numpy()),
            best_validation_loss=float(self.state.best_loss.numpy()),
            stopped_early=stopped,
            history=self.state.records(),
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        transfer = self.config.transfer
        two_step = transfer.init_from is not None and transfer.mode == "two-step"
        self.trainer.freeze_encoder(two_step and epoch <= transfer.frozen_epochs)
        accumulation = self.config.training.accumulation_steps
        batches = self._batches(epoch, self.updates * accumulation)
        sums: dict[str, float] = {}
        for _ in range(self.updates):
            pairs = (
                self.trainer.make_pairs(image, labels)
                for image, labels in itertools.islice(batches, accumulation)
            )
            for key, value in self.trainer.update(pairs).items():
                sums[key] = sums.get(key, 0.0) + value
        return {key: value / self.updates for key, value in sums.items()}

    def _batches(self, epoch: int, micro_batches: int) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        """This worker's part of each global mini-batch of the epoch, read ahead in the background."""
        subjects = _epoch_subjects(
            self.data.train, self.config.seed, epoch - 1, micro_batches * self.global_batch
        )
        local = self.global_batch // self.trainer.worker_count
        mine = [
            path
            for start in range(0, len(subjects), self.global_batch)
            for path in subjects[
                start + self.trainer.worker_index * local : start + (self.trainer.worker_index + 1) * local
            ]
        ]
        arrays = dataset.training_arrays(mine, num_labels=self.config.data.num_labels)
        return iter(arrays.batch(local).prefetch(2))

    def _finish_epoch(self, epoch, train_values, val_values, validation, began, on_epoch) -> bool:
        """Schedule, best model, checkpoint, logs; returns True when early stopping ends the run."""
        training = self.config.training
        learning_rate = float(self.trainer.optimizer.learning_rate.numpy())
        loss = val_values["loss"]
        improved = loss < float(self.state.best_loss.numpy())
        if improved:
            self.state.best_loss.assign(loss)
            self.state.best_epoch.assign(epoch)
        stop = False
        if epoch > 0:
            if not _improves(
                loss, self.state.plateau_best, self.state.plateau_wait, training.plateau_min_delta
            ):
                if int(self.state.plateau_wait.numpy()) >= training.plateau_patience:
                    reduced = max(learning_rate * training.plateau_factor, training.min_learning_rate)
                    self.trainer.optimizer.learning_rate.assign(reduced)
                    self.state.plateau_wait.assign(0)
            if not _improves(
                loss, self.state.stopping_best, self.state.stopping_wait, training.early_stopping_min_delta
            ):
                stop = int(self.state.stopping_wait.numpy()) >= training.early_stopping_patience
        record = {
            "epoch": epoch,
            "learning_rate": learning_rate,
            "iterations": int(self.trainer.optimizer.iterations.numpy()),
            "train": train_values,
            "validation": val_values,
            "seconds": round(time.perf_counter() - began, 3),
        }
        self.state.epoch.assign(epoch)
        self.state.append(record)
        if improved and self.folder.chief:
            self._save_model(record)
        if epoch > 0:
            self.manager.save(checkpoint_number=epoch)
        if self.folder.chief:
            self._log(record, validation)
            io.write_json(self.state.records(), self.folder.root / HISTORY_FILE)
        if on_epoch is not None:
            on_epoch(record)
        return stop

    def _save_model(self, record: dict) -> None:
        config = self.config
        facts = {
            "epoch": record["epoch"],
            "validation": record["validation"],
            "dataset": config.data.dataset,
            "subjects": {"train": len(self.data.train), "val": len(self.data.val)},
            "replicas": self.trainer.strategy.num_replicas_in_sync,
            "config": config.to_dict(),
            "config_digest": config.digest(),
        }
        model_config = ModelConfig(
            preset=config.model.preset,
            grid_shape=config.model.grid_shape,
            integration_steps=config.model.integration_steps,
            normalisation=self.data.normalisation,
            design=config.design,
            training=facts,
        )
        save_model(self.trainer.network, self.folder.root / MODEL_DIR, model_config, overwrite=True)

    def _log(self, record: dict, validation: list[dict]) -> None:
        if self.log is None:
            self.log = TensorBoardLog(self.folder.root / LOG_DIR)
        epoch = record["epoch"]
        if record["train"]:
            self.log.scalars("train", {**record["train"], "learning_rate": record["learning_rate"]}, epoch)
        self.log.scalars("validation", record["validation"], epoch)
        every = self.config.logging.image_every
        if every and epoch % every == 0:
            self.log.image(
                "validation",
                "examples/fixed_moving_warped_difference",
                self.trainer.example_slices(validation[0]),
                epoch,
            )
        self.log.flush()


def train(
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """Train ``config``'s design; everything a user can get wrong is checked before the first step.

    Parameters
    ----------
    config : the run (see :mod:`dareg.training.config`).
    out_dir : run folder (default ``config.output``); see the module docstring for its files.
    resume : continue the run in ``out_dir`` from its last checkpoint (same config required).
    on_epoch : called with each epoch's record (as in ``history.json``), e.g. to print progress.

    Raises
    ------
    DaregError
        Bad dataset (missing, no subjects, grid or labels that do not fit the config), an output folder
        that holds another run (or nothing to resume), or a transfer source of another architecture.
    """
    strategy = make_strategy(config.distribute)  # first: a multi-worker strategy must precede other TF work
    folder = RunFolder(Path(out_dir if out_dir is not None else config.output), worker_position(strategy)[0])
    folder.check(config, resume)
    data = _load_data(config)
    trainer = Trainer(config, strategy, data.spacing_mm)
    run = _Run(config, trainer, data, folder)
    if not (resume and run.restore()) and config.transfer.init_from is not None:
        trainer.load_initial_weights(config.transfer.init_from)
    if not resume:
        folder.create(config)
    return run.run(on_epoch)
