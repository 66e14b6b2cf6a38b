"""Training configuration: a strict YAML schema, loaded into frozen dataclasses (TensorFlow-free).

Why strict: a typo in a training config (``learning_rte: 1e-4``) would otherwise be ignored and a run of
hours or days would use the default. Every unknown key, wrong type or out-of-range value raises
:class:`~dareg.errors.DaregError` naming the key and what is allowed, before anything is trained.

A config file is one YAML mapping; every section and key except ``design`` and ``data.dataset`` is
optional (the defaults are the paper's settings). Example (see ``scripts/configs/*.yaml``)::

    design: UW-NSD
    data: {dataset: data/prepared, num_labels: 2}
    model: {preset: paper, grid_shape: [128, 128, 128]}
    training: {learning_rate: 1.0e-3, accumulation_steps: 8}

Relative paths (``data.dataset``, ``output``, ``transfer.init_from``) are kept as written and resolve
against the working directory when the run starts. PyYAML reads ``1e-3`` (no dot) as a string
(YAML 1.1); float keys accept such numeric strings.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from dareg.errors import DaregError
from dareg.training.designs import DESIGNS

STRATEGIES = ("default", "mirrored", "multi_worker")
TRANSFER_MODES = ("all", "two-step")
REGULARIZERS = ("gradient_l2", "bending_energy")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise DaregError(f"Training config: {key} {message}.")


def _choice(value, choices, key: str) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """``dataset``: folder written by ``dareg prepare`` (subjects + split file); ``num_labels``: label ids
    1..num_labels are structures (0 = background), e.g. 2 = liver parenchyma and vessels."""

    dataset: str
    num_labels: int = 2

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "data.dataset", "must name the prepared dataset folder")
        _require(1 <= self.num_labels <= 255, "data.num_labels", f"must be 1..255, got {self.num_labels}")


@dataclass(frozen=True)
class ModelSection:
    """The network: a ``dareg.models`` preset on a model grid (z, y, x voxels)."""

    preset: str = "paper"
    grid_shape: tuple[int, int, int] = (128, 128, 128)
    integration_steps: int = 0

    def __post_init__(self) -> None:
        from dareg.models.specs import check_grid_shape, check_integration_steps, resolve_spec

        check_grid_shape(resolve_spec(self.preset), self.grid_shape)
        check_integration_steps(self.integration_steps)


@dataclass(frozen=True)
class TrainingSection:
    """Optimiser and schedule (paper: Adam, 8 accumulated mini-batches of 1, plateau x0.1 after 10 epochs).

    ``batch_size`` is per replica (device); one optimiser update averages ``accumulation_steps``
    mini-batches. An epoch is ``steps_per_epoch`` updates, by default one pass over the training
    subjects (at least one update). The LR drops by ``plateau_factor`` after ``plateau_patience``
    epochs without a validation improvement of ``plateau_min_delta``; training stops after
    ``early_stopping_patience`` epochs without an improvement of ``early_stopping_min_delta`` or after
    ``epochs`` epochs.
    """

    learning_rate: float = 1e-3
    batch_size: int = 1
    accumulation_steps: int = 8
    epochs: int = 10000
    steps_per_epoch: int | None = None
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_min_delta: float = 1e-4
    min_learning_rate: float = 0.0
    early_stopping_patience: int = 100
    early_stopping_min_delta: float = 1e-5

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        for key in (
            "batch_size",
            "accumulation_steps",
            "epochs",
            "plateau_patience",
            "early_stopping_patience",
        ):
            _require(getattr(self, key) >= 1, f"training.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "training.steps_per_epoch",
            "must be >= 1 or null (one pass over the training subjects)",
        )
        _require(0 < self.plateau_factor < 1, "training.plateau_factor", "must be in (0, 1)")
        for key in ("plateau_min_delta", "min_learning_rate", "early_stopping_min_delta"):
            _require(getattr(self, key) >= 0, f"training.{key}", "must be >= 0")


@dataclass(frozen=True)
class LossesSection:
    """Loss options shared by the designs (``dareg.training.losses`` documents each).

    ``regularizer_weight`` is the weight of the flow regulariser for BL/SG designs and its initial
    (by default fixed) weight for UW designs; ``ncc_quirk: ddmr`` and ``hausdorff_threshold: hard``
    reproduce the original's defects, ``uncertainty_regularizer: learned`` its decaying weight.
    """

    regularizer: str = "gradient_l2"
    regularizer_weight: float = 5e-3
    ncc_quirk: str | None = None
    ssim_patch: int = 5
    dice_variant: str = "generalised"
    hausdorff_threshold: str = "soft"
    uncertainty_form: str = "softmax"
    uncertainty_regularizer: str = "fixed"

    def __post_init__(self) -> None:
        _choice(self.regularizer, REGULARIZERS, "losses.regularizer")
        _require(self.regularizer_weight > 0, "losses.regularizer_weight", "must be > 0")
        _choice(self.ncc_quirk, (None, "ddmr"), "losses.ncc_quirk")
        _require(self.ssim_patch >= 1, "losses.ssim_patch", "must be >= 1")
        _choice(self.dice_variant, ("generalised", "macro"), "losses.dice_variant")
        _choice(self.hausdorff_threshold, ("soft", "hard"), "losses.hausdorff_threshold")
        _choice(self.uncertainty_form, ("softmax", "kendall"), "losses.uncertainty_form")
        _choice(self.uncertainty_regularizer, ("fixed", "learned"), "losses.uncertainty_regularizer")


@dataclass(frozen=True)
class AugmentationSection:
    """The synthetic-pair layer (``dareg.training.augmentation``); limits in mm and degrees (paper values)."""

    seed: int = 1
    control_points: str = "paper"
    max_deformation_mm: float = 6.0
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 30.0
    gamma: float = 1.0
    brightness: float = 0.0
    tps_nodes: int = 15

    def __post_init__(self) -> None:
        _choice(self.control_points, ("paper", "original"), "augmentation.control_points")
        for key in ("max_deformation_mm", "max_rotation_deg", "max_translation_mm", "brightness"):
            _require(getattr(self, key) >= 0, f"augmentation.{key}", "must be >= 0")
        _require(self.gamma >= 1, "augmentation.gamma", "must be >= 1 (range [1/gamma, gamma]; 1 = off)")
        _require(self.tps_nodes >= 2, "augmentation.tps_nodes", "must be >= 2")


@dataclass(frozen=True)
class ValidationSection:
    """``pairs`` validation pairs made ONCE from the validation subjects by an augmentation layer with its
    own ``seed`` (the original re-drew them every epoch, so its validation loss was noise)."""

    pairs: int = 16
    seed: int = 2

    def __post_init__(self) -> None:
        _require(self.pairs >= 1, "validation.pairs", "must be >= 1")


@dataclass(frozen=True)
class TransferSection:
    """Transfer learning: start from the weights of the model folder ``init_from`` (same preset).

    ``mode``: "all" fine-tunes every layer; "two-step" keeps the encoder frozen for ``frozen_epochs``
    epochs, then fine-tunes everything (the paper's best liver models). Either way the learning rate
    is ``learning_rate`` (paper: 1e-4) instead of ``training.learning_rate``.
    """

    init_from: str | None = None
    mode: str = "all"
    learning_rate: float = 1e-4
    frozen_epochs: int = 50

    def __post_init__(self) -> None:
        _choice(self.mode, TRANSFER_MODES, "transfer.mode")
        _require(self.learning_rate > 0, "transfer.learning_rate", "must be > 0")
        _require(self.frozen_epochs >= 1, "transfer.frozen_epochs", "must be >= 1")


@dataclass(frozen=True)
class DistributeSection:
    """``strategy``: "default" (one device: the first GPU, else the CPU), "mirrored" (all local GPUs,
    or ``devices``) or "multi_worker" (several machines, from the ``TF_CONFIG`` environment variable)."""

    strategy: str = "default"
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _choice(self.strategy, STRATEGIES, "distribute.strategy")
        _require(
            self.devices is None or (self.strategy == "mirrored" and len(self.devices) >= 1),
            "distribute.devices",
            "is only for strategy 'mirrored' and must list at least one device",
        )


@dataclass(frozen=True)
class LoggingSection:
    """TensorBoard: scalars every epoch, example slices every ``image_every`` epochs (0 = never)."""

    image_every: int = 10

    def __post_init__(self) -> None:
        _require(self.image_every >= 0, "logging.image_every", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; see the module docstring and each section's class."""

    design: str
    data: DataConfig
    seed: int = 0
    output: str = "runs/training"
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    losses: LossesSection = field(default_factory=LossesSection)
    augmentation: AugmentationSection = field(default_factory=AugmentationSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    distribute: DistributeSection = field(default_factory=DistributeSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        _choice(self.design, tuple(DESIGNS), "design")
        _require(
            self.augmentation.seed != self.validation.seed,
            "validation.seed",
            "must differ from augmentation.seed (else the validation pairs repeat the training draws)",
        )

    def to_dict(self) -> dict:
        """Plain JSON-able data (tuples as lists) that :func:`config_from_dict` reads back."""
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: two runs with the same digest train the same way."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _convert(value, kind, key: str):
    """``value`` as type ``kind`` (bool, int, float, str, tuples, optionals, nested sections)."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [a for a in arguments if a is not type(None)]
        return _convert(value, inner, key)
    if is_dataclass(kind):
        return _section(kind, value, key)
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        items = arguments[:1] * len(value) if arguments[-1] is Ellipsis else arguments
        _require(len(value) == len(items), key, f"must have {len(items)} items, got {len(value)}")
        return tuple(_convert(v, k, f"{key}[{i}]") for i, (v, k) in enumerate(zip(value, items, strict=True)))
    return _scalar(value, kind, key)


def _scalar(value, kind, key: str):
    if kind is str and isinstance(value, Path):  # overrides given from Python
        value = str(value)
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    valid = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    _require(valid, key, f"must be of type {_type_name(kind)}, got {value!r}")
    _require(not (kind is float and not math.isfinite(value)), key, f"must be finite, got {value!r}")
    return value


def _section(cls, data, where: str):
    """Build dataclass ``cls`` from a mapping; unknown or missing keys raise DaregError naming them."""
    label = where or "the config"
    _require(isinstance(data, dict), label, f"must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known), key=str)
    _require(not unknown, label, f"has unknown key(s) {unknown}; valid keys: {', '.join(known)}")
    values = {name: _convert(data[name], hints[name], f"{where}.{name}".lstrip(".")) for name in data}
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise DaregError(f"Training config: {label} lacks a required key ({error}).") from None


def config_from_dict(data) -> TrainConfig:
    """Validate parsed config data (nested dicts) into a :class:`TrainConfig`; DaregError if invalid."""
    return _section(TrainConfig, data, "")


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied section by section (nested dicts merge, other values replace)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config, apply ``overrides`` (nested dict, e.g. from the command line), validate.

    Raises
    ------
    DaregError
        The file is missing or not YAML, or any key or value is invalid.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DaregError(f"Training config {path} cannot be read ({error.strerror}).") from None
    except yaml.YAMLError as error:
        raise DaregError(f"Training config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise DaregError(f"Training config {path} must be a YAML mapping (key: value lines).")
    try:
        return config_from_dict(merge(data, overrides or {}))
    except DaregError as error:
        raise DaregError(f"{error} (in {path})") from None
