"""Training data: one HDF5 file per subject on the model grid, a seeded split, and streaming to training.

Preparation (``dareg prepare``), per subject
---------------------------------------------
1. Read the CT and its label map (:mod:`dareg.io`: NIfTI, NRRD, MHA, DICOM folders, ``.seg.nrrd``).
2. Region of interest: the liver's box grown by ``margin_mm`` (40 mm, as the paper's crops) and clamped to
   the CT (:func:`dareg.geometry.roi_index_box`). The label map may sit on another grid than the CT (a
   flipped or cropped export): its liver box is mapped through physical space, never through indices.
3. Resample the ROI to ~1 mm isotropic (the grid that tiles the box with the whole number of voxels nearest
   to 1 mm), then to the model grid (:func:`dareg.geometry.model_grid_for_box`, anisotropic in general),
   as the DDMR original did. Images: linear with anti-aliasing; labels: nearest neighbour. The two
   Gaussian low-passes compose into the one :func:`dareg.geometry.resample_to_grid` would apply directly,
   so the network sees what ``dareg register`` feeds it at inference.
4. Window HU to [0, 1] with :func:`dareg.geometry.normalize_ct` (recorded as ``normalisation``).
5. Map label ids through a :class:`LabelMapping` (anything not mapped becomes 0 = background).
6. Write ``<id>.h5`` atomically. Subjects that cannot be used (unreadable, no liver, label map that does
   not match the CT) are reported and listed in ``skipped.csv``; they never stop the run.
7. ``split.json``: a seeded train / val / test split of the written subjects.

File format (``SUBJECT_FORMAT_VERSION`` 1)
------------------------------------------
Datasets ``image`` (z, y, x) float32 in [0, 1] and ``labels`` (z, y, x) uint8 (gzip). Attributes:
``format_version``; ``spacing_mm`` of the model grid in ARRAY order (z, y, x); ``origin_lps`` (LPS mm of
voxel [0, 0, 0]'s centre) and ``direction`` (ITK row-major 3x3: column c = direction of ITK index axis c,
i.e. of array axis 2 - c), so :func:`subject_grid` rebuilds the exact :class:`~dareg.geometry.ModelGrid`;
``label_names`` {id: name}, ``label_ids`` (ids present), ``source_image``, ``source_labels``,
``subject_id``, and what preparation did (``label_map``, ``label_mapping`` {source id: training id},
``liver_label``, ``margin_mm``, ``isotropic_shape``, ``normalisation``). Dict-valued attributes are stored
as JSON text (HDF5 attributes cannot hold mappings), named in the ``json_attrs`` attribute, and read back
with integer keys where the keys are integers.

Folder inputs: how images and label maps pair up
------------------------------------------------
In a folder (not recursive), a *label file* is a ``.seg.nrrd`` file, or an image file (``.nii``,
``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) whose name without extension ends in ``_seg``,
``_segmentation``, ``_labels`` or ``_label``; every other image file, and every sub-folder (a DICOM
series), is an *image*. An image and a label file pair when their names are equal once the extension and
that ending are removed: ``A.nii.gz`` + ``A_seg.nii.gz``, ``B.nrrd`` + ``B.seg.nrrd``, DICOM folder ``C/`` +
``C_labels.nii.gz``; that name is the subject id. Hidden entries and the output folder are ignored;
unpaired or ambiguous entries are reported and skipped. A CSV lists one subject per row with columns
``image`` and ``labels`` (and optionally ``id``); relative paths are relative to the CSV's folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import SimpleITK as sitk

from dareg import io
from dareg.errors import DaregError
from dareg.geometry import (
    CT_WINDOW_HU,
    DEFAULT_GRID_SHAPE,
    DEFAULT_MARGIN_MM,
    ModelGrid,
    model_grid_for_box,
    normalisation_config,
    normalize_ct,
    resample_to_grid,
    roi_index_box,
)
from dareg.phantom import LABELS as PHANTOM_LABELS
from dareg.phantom import make_phantom

SUBJECT_FORMAT_VERSION = 1
SPLIT_FILE = "split.json"
SKIPPED_FILE = "skipped.csv"
SPLIT_KEYS = ("train", "val", "test")

#: Attributes every subject file carries (``write_subject`` adds ``format_version`` and ``label_ids``).
REQUIRED_ATTRS = ("spacing_mm", "origin_lps", "direction", "label_names", "source_image", "source_labels")

_AIR_HU = -1024.0  # what lies outside the CT, should the grid's edge reach past it
_ISOTROPIC_MM = 1.0
_MIN_LIVER_INSIDE = 0.9  # fraction of the label map's liver that must lie inside the CT
_LABEL_NAME_ENDINGS = ("_segmentation", "_labels", "_label", "_seg")
_SEG_NRRD = ".seg.nrrd"


# ---------------------------------------------------------------------------------------------------------
# One subject on disk
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A prepared subject: ``image`` (z, y, x) float32 in [0, 1], ``labels`` (z, y, x) uint8, ``attrs``."""

    image: np.ndarray
    labels: np.ndarray
    attrs: dict[str, Any]


def write_subject(path: io.PathLike, image: np.ndarray, labels: np.ndarray, *, attrs: dict) -> None:
    """Write one subject file atomically (a failed write leaves no file and keeps an older one).

    Parameters
    ----------
    path : ``.h5`` file
    image : ndarray, shape (z, y, x), float32 in [0, 1]
    labels : ndarray, shape (z, y, x), uint8 training label ids (0 = background)
    attrs : dict
        At least :data:`REQUIRED_ATTRS`; ``spacing_mm`` in array order (z, y, x). Dict values are stored
        as JSON. ``format_version`` and ``label_ids`` (the ids present) are set here.

    Raises
    ------
    ValueError
        Arrays of the wrong type, range or shape, or missing attributes (a programming error).
    DaregError
        The file cannot be written.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.dtype != np.float32 or labels.dtype != np.uint8:
        raise ValueError(f"image must be float32 and labels uint8, got {image.dtype} and {labels.dtype}")
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(f"image and labels must be 3-D of one shape, got {image.shape} and {labels.shape}")
    if not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
        raise ValueError("image values must lie in [0, 1] (normalise with dareg.geometry.normalize_ct)")
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"subject attributes missing: {missing}")
    present = [int(i) for i in np.flatnonzero(np.bincount(labels.ravel())) if i]
    values = {**attrs, "format_version": SUBJECT_FORMAT_VERSION, "label_ids": present}
    json_keys = sorted(key for key, value in values.items() if isinstance(value, dict))
    with io.atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        for name, array in (("image", image), ("labels", labels)):
            file.create_dataset(name, data=array, compression="gzip", compression_opts=4, shuffle=True)
        for key, value in values.items():
            file.attrs[key] = _encode_attr(value)
        file.attrs["json_attrs"] = json.dumps(json_keys)


def read_subject(path: io.PathLike) -> Subject:
    """Read a subject file written by :func:`write_subject` (attrs decoded: tuples, dicts, ints).

    Raises
    ------
    DaregError
        Missing or damaged file, not a dareg subject file, or a newer format version.
    """
    with _open_subject(path) as file:
        return Subject(file["image"][...], file["labels"][...], _decode_attrs(file.attrs))


def subject_grid(subject: Subject) -> ModelGrid:
    """The model grid (physical placement, LPS mm) the subject's arrays are sampled on."""
    attrs = subject.attrs
    return ModelGrid(
        origin=tuple(map(float, attrs["origin_lps"])),
        spacing=tuple(float(s) for s in reversed(attrs["spacing_mm"])),
        direction=tuple(map(float, attrs["direction"])),
        size=tuple(int(n) for n in reversed(subject.image.shape)),
    )


def _encode_attr(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps({str(k): v for k, v in value.items()})
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _decode_attrs(raw: h5py.AttributeManager) -> dict[str, Any]:
    json_keys = set(json.loads(raw.get("json_attrs", "[]")))
    attrs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "json_attrs":
            continue
        if key in json_keys:
            attrs[key] = {_int_or_text(k): v for k, v in json.loads(value).items()}
        elif isinstance(value, np.ndarray):
            attrs[key] = tuple(value.tolist())
        elif isinstance(value, np.generic):
            attrs[key] = value.item()
        else:
            attrs[key] = value
    return attrs


def _int_or_text(key: str) -> int | str:
    """JSON turns integer keys (label ids) into text; give them back as ints."""
    return int(key) if key.lstrip("-").isdigit() else key


@contextlib.contextmanager
def _open_subject(path: io.PathLike) -> Iterator[h5py.File]:
    """Open a subject file for reading after checking that it is one this version understands."""
    path = Path(path)
    if not path.is_file():
        raise DaregError(f"Subject file {path} not found; run 'dareg prepare' again.")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise DaregError(f"Subject file {path} is damaged or not HDF5 ({exc}); prepare it again.") from exc
    with file:
        version = file.attrs.get("format_version")
        if version is None or not {"image", "labels"} <= set(file):
            raise DaregError(f"{path} is not a dareg subject file; make subject files with 'dareg prepare'.")
        if int(version) > SUBJECT_FORMAT_VERSION:
            raise DaregError(
                f"Subject file {path} has format version {int(version)}, newer than this dareg's "
                f"{SUBJECT_FORMAT_VERSION}; update dareg."
            )
        yield file


# ---------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------


def load_split(dataset_dir: io.PathLike) -> dict[str, list[Path]]:
    """Subject files of a prepared dataset: {"train": [...], "val": [...], "test": [...]} (absolute paths).

    Raises
    ------
    DaregError
        No such folder, no ``split.json`` (not a prepared dataset), no subject at all, or listed files
        that are missing.
    """
    dataset_dir = Path(dataset_dir).absolute()
    info = _read_split_file(dataset_dir)
    split = {key: [dataset_dir / name for name in info.get(key, [])] for key in SPLIT_KEYS}
    if not any(split.values()):
        raise DaregError(f"Dataset {dataset_dir} lists no subjects; prepare it again with 'dareg prepare'.")
    missing = [path.name for paths in split.values() for path in paths if not path.is_file()]
    if missing:
        raise DaregError(
            f"Dataset {dataset_dir}: {len(missing)} subject file(s) listed in {SPLIT_FILE} are missing "
            f"({', '.join(missing[:5])}); prepare the dataset again."
        )
    return split


def load_dataset_info(dataset_dir: io.PathLike) -> dict[str, Any]:
    """What ``split.json`` says about the whole dataset besides the split.

    Keys: ``label_names`` {id: name}, ``grid_shape`` (z, y, x), ``spacing_mm`` (mean over the subjects,
    array order z, y, x: the augmentation layer's mm limits need one spacing), ``normalisation``,
    ``seed``, ``val_fraction``, ``test_fraction``.
    """
    info = _read_split_file(Path(dataset_dir))
    info = {key: value for key, value in info.items() if key not in SPLIT_KEYS}
    info["label_names"] = {int(k): v for k, v in info.get("label_names", {}).items()}
    return info


def _read_split_file(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / SPLIT_FILE
    if not dataset_dir.is_dir():
        raise DaregError(f"Dataset folder {dataset_dir} not found; make one with 'dareg prepare'.")
    if not path.is_file():
        raise DaregError(
            f"{dataset_dir} is not a prepared dataset (no {SPLIT_FILE}); make one with 'dareg prepare'."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DaregError(f"{path} cannot be read ({exc}); prepare the dataset again.") from exc


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) counts for ``n`` subjects.

    Each count is its fraction of ``n`` rounded to the nearest integer, but a positive fraction gets at
    least one subject, and training always keeps at least one (test gives way first, then validation):
    so 3 subjects with 0.1 / 0.1 give 1 / 1 / 1, 10 give 8 / 1 / 1, 2 give 1 / 1 / 0.
    """
    _check_fractions(val_fraction, test_fraction)
    val, test = (max(int(f > 0), math.floor(f * n + 0.5)) for f in (val_fraction, test_fraction))
    while val + test >= n and val + test > 0:
        if test >= val and test > 0:
            test -= 1
        else:
            val -= 1
    return n - val - test, val, test


def make_split(
    subject_ids: Sequence[str], *, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Seeded split of subject ids into train / val / test (see :func:`split_sizes`); each list sorted.

    The ids are sorted before the seeded permutation, so the split depends on the set of ids and the
    seed only, not on the order the subjects were found in.
    """
    ids = sorted(set(subject_ids))
    _, n_val, n_test = split_sizes(len(ids), val_fraction, test_fraction)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {
        "train": sorted(order[n_val + n_test :]),
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
    }


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction >= 1:
        raise DaregError(
            f"Validation and test fractions must be >= 0 and sum to less than 1 (training needs subjects); "
            f"got {val_fraction} and {test_fraction}."
        )


# ---------------------------------------------------------------------------------------------------------
# Streaming to the trainer
# ---------------------------------------------------------------------------------------------------------


def iter_training_arrays(
    paths: Sequence[io.PathLike],
    *,
    num_labels: int,
    seed: int | None = None,
    repeat: bool = False,
    first_epoch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Subjects as (image (D, H, W, 1), one-hot labels (D, H, W, num_labels + 1)), float32 numpy arrays.

    Every file is checked BEFORE the first item (so a bad dataset fails before training starts): same
    grid shape everywhere, label ids within 0..num_labels. Channel 0 of the labels is background.

    Parameters
    ----------
    seed : None = the given order; an int = a new seeded permutation per epoch, epoch ``e``'s order
        depending only on (seed, e), so a resumed run passes ``first_epoch`` and sees the same order.
    repeat : cycle epochs forever (``first_epoch``, ``first_epoch + 1``, ...) instead of one pass.

    Raises
    ------
    DaregError
        No paths, unreadable files, grids of different shapes, or labels outside 0..num_labels (the
        message names the subject).
    """
    paths = [Path(p) for p in paths]
    _check_subjects(paths, num_labels)
    return _stream(paths, num_labels, seed, repeat, first_epoch)


def training_arrays(
    paths: Sequence[io.PathLike],
    *,
    num_labels: int,
    seed: int | None = None,
    repeat: bool = False,
    first_epoch: int = 0,
):
    """:func:`iter_training_arrays` as a ``tf.data.Dataset`` of (image, one-hot labels), unbatched.

    The files are checked here, before the dataset is returned (an error raised later, inside the
    generator, would reach the caller as a TensorFlow error); each iteration of the dataset restarts at
    ``first_epoch``. Batch it as needed (``.batch(1)`` for the paper's mini-batches of 1).
    """
    import tensorflow as tf

    paths = [Path(p) for p in paths]
    shape = _check_subjects(paths, num_labels)
    signature = (
        tf.TensorSpec(shape + (1,), tf.float32),
        tf.TensorSpec(shape + (num_labels + 1,), tf.float32),
    )
    return tf.data.Dataset.from_generator(
        lambda: _stream(paths, num_labels, seed, repeat, first_epoch), output_signature=signature
    )


def epoch_order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    """Subject order of one epoch: 0..n-1 if ``seed`` is None, else a permutation seeded by (seed, epoch)."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _stream(
    paths: list[Path], num_labels: int, seed: int | None, repeat: bool, first_epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    epoch = first_epoch
    while True:
        for index in epoch_order(len(paths), seed, epoch):
            subject = read_subject(paths[index])
            _check_label_range([int(subject.labels.max())], num_labels, paths[index])
            one_hot = np.eye(num_labels + 1, dtype=np.float32)[subject.labels]
            yield subject.image[..., None].astype(np.float32), one_hot
        if not repeat:
            return
        epoch += 1


def _check_subjects(paths: list[Path], num_labels: int) -> tuple[int, int, int]:
    """Check every file's header (format, shape, label ids present); returns the common grid shape."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise DaregError(
            f"num_labels must be a positive integer (labels besides background), got {num_labels!r}."
        )
    if not paths:
        raise DaregError("No subject files to train on; check the dataset's split.json.")
    shapes = {}
    for path in paths:
        with _open_subject(path) as file:
            shapes[path] = tuple(file["image"].shape)
            _check_label_range(file.attrs.get("label_ids", ()), num_labels, path)
    first = paths[0]
    for path, shape in shapes.items():
        if shape != shapes[first]:
            raise DaregError(
                f"Subject {path.stem} ({path}) is on a {shape} grid but {first.stem} on {shapes[first]}; "
                "prepare all subjects with the same --grid."
            )
    return shapes[first]


def _check_label_range(label_ids: Sequence[int], num_labels: int, path: Path) -> None:
    outside = sorted(int(i) for i in label_ids if not 0 <= int(i) <= num_labels)
    if outside:
        raise DaregError(
            f"Subject {path.stem} ({path}) has label ids {outside} outside the label map 0..{num_labels}. "
            "Prepare the dataset with a label map that gives at most that many labels (--label-map), or "
            "raise the configuration's number of labels."
        )


# ---------------------------------------------------------------------------------------------------------
# Label mappings: source label ids -> training label ids
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingLabel:
    """One training label: its id (1..255), its name, and the source ids or segment names that become it."""

    id: int
    name: str
    sources: tuple[int | str, ...]


@dataclass(frozen=True)
class LabelMapping:
    """How a subject's label ids become training label ids; no ``labels`` = identity (ids kept, <= 255).

    Sources are label ids or segment names (case-insensitive; names come with ``.seg.nrrd`` files). A
    source a subject lacks maps nothing (a subject without vessels has no label 2); every id that no
    label lists becomes 0 (background).
    """

    name: str
    labels: tuple[TrainingLabel, ...] = ()

    def lookup(self, label_map: io.LabelMap) -> tuple[np.ndarray, dict[int, str]]:
        """(``lut``, names): ``lut[source id]`` is the training id (uint8); names of the ids, 0 included."""
        present = label_map.label_ids()
        size = max(present, default=0) + 1
        if not self.labels:
            if size > 256:
                raise DaregError(
                    f"The identity label map keeps ids as they are, but this label map has id {size - 1} "
                    "(at most 255 fit the uint8 training labels). Pass --label-map FILE.yaml to renumber."
                )
            names = {i: label_map.names.get(i, f"label_{i}") for i in present}
            return np.arange(size, dtype=np.uint8), {0: "background", **names}
        lut = np.zeros(size, dtype=np.uint8)
        for label in self.labels:
            for source in label.sources:
                for source_id in _source_ids(source, label_map):
                    if source_id < size:
                        lut[source_id] = label.id
        return lut, {0: "background", **{label.id: label.name for label in self.labels}}


def _source_ids(source: int | str, label_map: io.LabelMap) -> list[int]:
    if isinstance(source, int):
        return [source]
    wanted = source.strip().casefold()
    return [i for i, name in label_map.names.items() if name.strip().casefold() == wanted]


#: TotalSegmentator v2 ("total" task) -> the OSLO-COMET labels of the paper: 1 parenchyma = liver (5,
#: which includes lesions); 2 vessels = inferior vena cava (63) and portal + splenic vein (64), the
#: large veins the task segments in and at the liver (it has no hepatic-vein label); the ROI keeps
#: the parts near the liver. Aorta (52) and everything else -> background.
TOTALSEGMENTATOR = LabelMapping(
    "totalsegmentator",
    (TrainingLabel(1, "parenchyma", (5,)), TrainingLabel(2, "vessels", (63, 64))),
)
_PHANTOM_IDS = {name: label_id for label_id, name in PHANTOM_LABELS.items()}
#: :mod:`dareg.phantom` label ids (liver 1, tumour 4; portal vein 2, hepatic veins 3, IVC 9) -> the same
#: two labels, as TotalSegmentator's liver includes lesions and its vessel label the IVC.
PHANTOM = LabelMapping(
    "phantom",
    (
        TrainingLabel(1, "parenchyma", tuple(_PHANTOM_IDS[n] for n in ("liver", "tumour"))),
        TrainingLabel(2, "vessels", tuple(_PHANTOM_IDS[n] for n in ("portal_vein", "hepatic_veins", "ivc"))),
    ),
)
IDENTITY = LabelMapping("identity")
LABEL_MAPPINGS = {mapping.name: mapping for mapping in (TOTALSEGMENTATOR, PHANTOM, IDENTITY)}

LABEL_MAP_FILE_EXAMPLE = """labels:
  1: {name: parenchyma, source: [5]}
  2: {name: vessels, source: [63, 64, portal vein]}"""


def load_label_mapping(spec: str | io.PathLike) -> LabelMapping:
    """A preset (:data:`LABEL_MAPPINGS`: totalsegmentator, phantom, identity) or a YAML file like::

        labels:
          1: {name: parenchyma, source: [5]}
          2: {name: vessels, source: [63, 64, portal vein]}

    (training id: its name and the source label ids or segment names that become it).

    Raises
    ------
    DaregError
        Unknown preset, unreadable file, unknown keys, bad ids, or a source listed under two labels.
    """
    if str(spec) in LABEL_MAPPINGS:
        return LABEL_MAPPINGS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise DaregError(
            f"Label map {spec!r} is neither a preset ({', '.join(LABEL_MAPPINGS)}) nor an existing YAML file."
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DaregError(f"Label map file {path} cannot be read ({exc}).") from exc
    if not isinstance(data, dict) or set(data) != {"labels"} or not isinstance(data["labels"], dict):
        raise DaregError(
            f"Label map file {path} must hold one 'labels' mapping, e.g.\n{LABEL_MAP_FILE_EXAMPLE}"
        )
    labels = tuple(
        sorted((_training_label(k, v, path) for k, v in data["labels"].items()), key=lambda t: t.id)
    )
    if not labels:
        raise DaregError(f"Label map file {path} defines no labels; e.g.\n{LABEL_MAP_FILE_EXAMPLE}")
    seen: dict[int | str, int] = {}
    for label in labels:
        for source in label.sources:
            key = source.strip().casefold() if isinstance(source, str) else source
            if key in seen:
                raise DaregError(
                    f"Label map file {path}: source {source!r} is listed under two labels, "
                    f"{seen[key]} and {label.id}."
                )
            seen[key] = label.id
    return LabelMapping(str(path), labels)


def _training_label(key: Any, entry: Any, path: Path) -> TrainingLabel:
    where = f"Label map file {path}, label {key!r}"
    if isinstance(key, bool) or not isinstance(key, int) or not 1 <= key <= 255:
        raise DaregError(f"{where}: training ids must be integers 1..255 (0 is background).")
    if not isinstance(entry, dict) or set(entry) != {"name", "source"}:
        raise DaregError(
            f"{where}: needs exactly the keys 'name' and 'source', e.g.\n{LABEL_MAP_FILE_EXAMPLE}"
        )
    sources = entry["source"] if isinstance(entry["source"], list) else [entry["source"]]
    valid = all(
        (isinstance(s, int) and not isinstance(s, bool) and s >= 1) or (isinstance(s, str) and s.strip())
        for s in sources
    )
    if not sources or not valid or not isinstance(entry["name"], str) or not entry["name"].strip():
        raise DaregError(
            f"{where}: 'name' must be text and 'source' a list of label ids >= 1 or segment names."
        )
    return TrainingLabel(key, entry["name"].strip(), tuple(sources))


# ---------------------------------------------------------------------------------------------------------
# One subject onto the model grid
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareOptions:
    """How subjects are prepared (the ``dareg prepare`` options).

    ``grid_shape`` is in array order (z, y, x), each a multiple of 16; ``liver_label`` is the SOURCE
    label map's liver (id or segment name; TotalSegmentator: 5) that places the ROI.
    """

    grid_shape: tuple[int, int, int] = DEFAULT_GRID_SHAPE
    margin_mm: float = DEFAULT_MARGIN_MM
    liver_label: int | str = 5
    label_mapping: LabelMapping = TOTALSEGMENTATOR
    window: tuple[float, float] = CT_WINDOW_HU

    def __post_init__(self) -> None:
        if len(self.grid_shape) != 3 or any(int(n) < 16 or int(n) % 16 for n in self.grid_shape):
            raise DaregError(
                f"The grid must be 3 sizes, each a multiple of 16 (e.g. 64, 128), got {self.grid_shape}."
            )
        if not self.margin_mm >= 0:
            raise DaregError(f"The ROI margin must be >= 0 mm, got {self.margin_mm}.")


def prepare_subject(
    image: sitk.Image,
    label_map: io.LabelMap,
    *,
    options: PrepareOptions,
    subject_id: str,
    sources: tuple[str, str],
) -> Subject:
    """One subject on the model grid, in memory (steps 2-5 of the module docstring).

    Parameters
    ----------
    image : CT in HU; label_map : its labels, on any grid that covers it physically.
    sources : (image, labels) descriptions (paths) recorded in the attributes.

    Raises
    ------
    DaregError
        No liver label, or a label map whose liver lies mostly outside the CT (another scan, or a wrong
        origin / orientation).
    """
    try:
        liver_id = label_map.resolve(options.liver_label)
    except DaregError as exc:
        raise DaregError(
            f"No liver: label {options.liver_label!r} is not in the label map (set the liver label)."
        ) from exc
    liver = label_map.mask([liver_id])
    # The liver box goes through physical space (the moving-mask path with no transform): a label map on
    # another grid than the CT still places the ROI correctly.
    lower, upper = roi_index_box(image, moving_mask=liver, margin_mm=options.margin_mm)
    extent_mm = (upper - lower + 1.0) * np.asarray(image.GetSpacing())
    isotropic_shape = tuple(max(2, round(e / _ISOTROPIC_MM)) for e in reversed(extent_mm))
    iso_grid = model_grid_for_box(image, lower, upper, isotropic_shape)
    grid = model_grid_for_box(image, lower, upper, tuple(int(n) for n in options.grid_shape))
    iso_ids = resample_to_grid(label_map.image, iso_grid, interpolation="nearest")
    _check_liver_inside(liver, np.count_nonzero(iso_ids == liver_id) * np.prod(iso_grid.spacing), liver_id)
    ids = resample_to_grid(_on_grid(iso_ids, iso_grid), grid, interpolation="nearest").astype(np.int64)
    iso_hu = resample_to_grid(image, iso_grid, default_value=_AIR_HU)
    hu = resample_to_grid(_on_grid(iso_hu, iso_grid), grid, default_value=_AIR_HU)
    lut, names = options.label_mapping.lookup(label_map)
    attrs = {
        "subject_id": subject_id,
        "source_image": sources[0],
        "source_labels": sources[1],
        "spacing_mm": tuple(reversed(grid.spacing)),
        "origin_lps": grid.origin,
        "direction": grid.direction,
        "label_names": names,
        "label_map": options.label_mapping.name,
        "label_mapping": {i: int(t) for i, t in enumerate(lut) if t},
        "liver_label": liver_id,
        "margin_mm": float(options.margin_mm),
        "isotropic_shape": iso_grid.shape,
        "normalisation": normalisation_config(options.window),
    }
    return Subject(normalize_ct(hu, options.window), lut[ids], attrs)


def _on_grid(array: np.ndarray, grid: ModelGrid) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid.reference_image())
    return image


def _check_liver_inside(liver: sitk.Image, volume_in_roi_mm3: float, liver_id: int) -> None:
    """The liver of the label map must lie inside the CT: the ROI is clamped to the CT, so liver voxels
    beyond the CT are missing from the ROI; more than a few percent missing means the two do not match."""
    volume_mm3 = np.count_nonzero(sitk.GetArrayViewFromImage(liver)) * np.prod(liver.GetSpacing())
    inside = volume_in_roi_mm3 / volume_mm3
    if inside < _MIN_LIVER_INSIDE:
        raise DaregError(
            f"Only {inside:.0%} of the liver (label {liver_id}) lies inside the CT: the label map does not "
            "match the image (another scan, or a wrong origin or orientation)."
        )


# ---------------------------------------------------------------------------------------------------------
# Finding subjects: folders and CSV files
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectSource:
    """A subject to prepare: its id (the output file's name) and its image and label files."""

    subject_id: str
    image: Path
    labels: Path


@dataclass(frozen=True)
class Skipped:
    """A subject left out, and why (one row of ``skipped.csv``)."""

    subject_id: str
    image: str
    labels: str
    reason: str


def find_subjects(
    inputs: Sequence[io.PathLike], *, exclude: io.PathLike | None = None
) -> tuple[list[SubjectSource], list[Skipped]]:
    """Subjects listed by folders and CSV files (pairing rule: module docstring); ``exclude`` = the output.

    Entries that cannot pair, and repeated subject ids (after the first), come back as skipped.

    Raises
    ------
    DaregError
        An input that is neither a folder nor a ``.csv`` file, or a CSV without image/labels columns.
    """
    found: list[SubjectSource] = []
    skipped: list[Skipped] = []
    for source in map(Path, inputs):
        if source.is_dir():
            subjects, problems = _folder_subjects(source, None if exclude is None else Path(exclude))
        elif source.is_file() and source.suffix.lower() == ".csv":
            subjects, problems = _csv_subjects(source)
        else:
            raise DaregError(
                f"Input {source} is neither a folder nor a .csv file; pass folders or CSV lists."
            )
        found += subjects
        skipped += problems
    unique: dict[str, SubjectSource] = {}
    for subject in found:
        if subject.subject_id in unique:
            first = unique[subject.subject_id]
            reason = f"subject id {subject.subject_id!r} repeats the one of {first.image}; ids must be unique"
            skipped.append(Skipped(subject.subject_id, str(subject.image), str(subject.labels), reason))
        else:
            unique[subject.subject_id] = subject
    return list(unique.values()), skipped


def _name_role(name: str, is_dir: bool) -> tuple[str, bool] | None:
    """(subject id, is a label file) of a folder entry's name; None if it is no image or label file."""
    if is_dir:
        return name, False
    lower = name.lower()
    if lower.endswith(_SEG_NRRD):
        return name[: -len(_SEG_NRRD)], True
    suffix = next((s for s in sorted(io.IMAGE_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)
    if suffix is None:
        return None
    stem = name[: -len(suffix)]
    ending = next((e for e in _LABEL_NAME_ENDINGS if stem.lower().endswith(e)), None)
    return (stem[: -len(ending)], True) if ending else (stem, False)


def _folder_subjects(folder: Path, exclude: Path | None) -> tuple[list[SubjectSource], list[Skipped]]:
    groups: dict[str, tuple[list[Path], list[Path]]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or (exclude is not None and entry.resolve() == exclude.resolve()):
            continue
        role = _name_role(entry.name, entry.is_dir())
        if role is not None:
            groups.setdefault(role[0], ([], []))[int(role[1])].append(entry)
    subjects, skipped = [], []
    for name, (images, labels) in groups.items():
        if len(images) == 1 and len(labels) == 1:
            subjects.append(SubjectSource(_safe_id(name), images[0], labels[0]))
            continue
        if not labels:
            reason = f"no label file for image {images[0].name} (expected {name}_seg.nii.gz or similar)"
        elif not images:
            reason = (
                f"no image for label file {labels[0].name} (expected {name}.nii.gz or a DICOM folder {name}/)"
            )
        else:
            reason = f"several images or label files share the name {name!r}; keep one of each"
        skipped.append(Skipped(name, ";".join(map(str, images)), ";".join(map(str, labels)), reason))
    return subjects, skipped


def _csv_subjects(path: Path) -> tuple[list[SubjectSource], list[Skipped]]:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DaregError(f"CSV file {path} cannot be read ({exc}).") from exc
    columns = {str(c).strip().lower(): c for c in (rows[0].keys() if rows else [])}
    if rows and not {"image", "labels"} <= set(columns):
        raise DaregError(
            f"CSV file {path} needs the columns 'image' and 'labels' (and optionally 'id'); "
            f"it has {sorted(columns)}."
        )
    subjects, skipped = [], []
    for number, row in enumerate(rows, start=2):
        image, labels, given_id = (
            (row.get(columns.get(c, "")) or "").strip() for c in ("image", "labels", "id")
        )
        if not image and not labels:
            continue
        role = _name_role(Path(image).name, (path.parent / image).is_dir()) if image else None
        subject_id = _safe_id(given_id or (role[0] if role else Path(image).name))
        if not image or not labels:
            skipped.append(
                Skipped(subject_id, image, labels, f"{path.name} row {number}: image or labels cell empty")
            )
        else:
            subjects.append(SubjectSource(subject_id, path.parent / image, path.parent / labels))
    return subjects, skipped


def _safe_id(name: str) -> str:
    """A subject id usable as a file name on every system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "subject"


# ---------------------------------------------------------------------------------------------------------
# The whole dataset
# ---------------------------------------------------------------------------------------------------------

#: ``progress(done, total, subject_id, reason)`` after each subject; ``reason`` is None when it was written.
ProgressCallback = Callable[[int, int, str, str | None], None]


@dataclass
class PreparedDataset:
    """What :func:`prepare_dataset` made: the folder, the split (subject ids) and the skipped subjects."""

    dataset_dir: Path
    split: dict[str, list[str]]
    skipped: list[Skipped] = field(default_factory=list)


def prepare_dataset(
    inputs: Sequence[io.PathLike],
    out_dir: io.PathLike,
    *,
    options: PrepareOptions | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: ProgressCallback | None = None,
) -> PreparedDataset:
    """``dareg prepare``: every subject of ``inputs`` (folders / CSV files) into ``out_dir``, with a split.

    Writes ``<id>.h5`` per usable subject, ``split.json`` (:func:`make_split` with ``seed``) and
    ``skipped.csv`` (id, image, labels, reason). Subjects that fail (any :class:`DaregError`: unreadable,
    no liver, mismatched label map...) are skipped and reported through ``progress``.

    Raises
    ------
    DaregError
        Bad inputs or fractions, no subject found, or no usable subject (the reasons are in the message).
    """
    options = options or PrepareOptions()
    _check_fractions(val_fraction, test_fraction)
    out_dir = Path(out_dir)
    sources, skipped = find_subjects(inputs, exclude=out_dir)
    if not sources and not skipped:
        raise DaregError(
            f"No subjects found in {', '.join(map(str, inputs))}. A folder needs image + label file pairs "
            "such as A.nii.gz + A_seg.nii.gz (or a DICOM folder A/ + A_seg.nii.gz); a CSV needs the "
            "columns image, labels (and optionally id)."
        )
    report = progress or (lambda *args: None)
    total = len(sources) + len(skipped)
    for done, problem in enumerate(list(skipped), start=1):
        report(done, total, problem.subject_id, problem.reason)
    written = {}
    for done, source in enumerate(sources, start=len(skipped) + 1):
        try:
            image = io.read_image(source.image)
            label_map = io.read_label_map(source.labels)
            names = (str(source.image), str(source.labels))
            written[source.subject_id] = _prepare_and_write(
                out_dir, source.subject_id, image, label_map, options, names
            )
        except DaregError as error:
            skipped.append(Skipped(source.subject_id, str(source.image), str(source.labels), str(error)))
            report(done, total, source.subject_id, str(error))
            continue
        report(done, total, source.subject_id, None)
    return _finish_dataset(
        out_dir,
        written,
        skipped,
        grid_shape=options.grid_shape,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def make_phantom_dataset(
    dataset_dir: io.PathLike,
    *,
    n_subjects: int,
    grid_shape: tuple[int, int, int],
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Path:
    """A prepared dataset of :mod:`dareg.phantom` subjects (tests, the demo, benchmarks); returns the folder.

    Each subject is a phantom with its own seed, its spacing varied by up to +-10 % per axis and its field
    of view shifted by up to +-10 mm, prepared by the same :func:`prepare_subject` as real CTs (labels
    through :data:`PHANTOM`: 1 parenchyma, 2 vessels) and split like ``dareg prepare`` does.
    """
    options = PrepareOptions(grid_shape=tuple(grid_shape), liver_label="liver", label_mapping=PHANTOM)
    out_dir = Path(dataset_dir)
    written = {}
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(n_subjects)):
        phantom_seed = int(child.generate_state(1)[0])
        rng = np.random.default_rng(child)
        spacing = np.asarray(_PHANTOM_SPACING) * rng.uniform(0.9, 1.1, 3)
        origin = -(np.asarray(_PHANTOM_SIZE) - 1.0) / 2.0 * spacing + rng.uniform(-10.0, 10.0, 3)
        phantom = make_phantom(
            size=_PHANTOM_SIZE, spacing=tuple(spacing), origin=tuple(origin), seed=phantom_seed
        )
        label_map = io.LabelMap(sitk.Cast(phantom.labels, sitk.sitkUInt16), dict(phantom.names))
        described = f"phantom(seed={phantom_seed}, spacing={np.round(spacing, 3).tolist()} mm)"
        subject_id = f"phantom_{index:03d}"
        written[subject_id] = _prepare_and_write(
            out_dir, subject_id, phantom.image, label_map, options, (described, described)
        )
    _finish_dataset(
        out_dir,
        written,
        [],
        grid_shape=options.grid_shape,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    return out_dir


_PHANTOM_SIZE = (96, 80, 64)  # dareg.phantom's default field of view: 240 x 200 x 192 mm
_PHANTOM_SPACING = (2.5, 2.5, 3.0)


def _prepare_and_write(
    out_dir: Path,
    subject_id: str,
    image: sitk.Image,
    label_map: io.LabelMap,
    options: PrepareOptions,
    sources: tuple[str, str],
) -> dict[str, Any]:
    """The one path from an in-memory subject to its file; returns its attributes."""
    subject = prepare_subject(image, label_map, options=options, subject_id=subject_id, sources=sources)
    write_subject(out_dir / f"{subject_id}.h5", subject.image, subject.labels, attrs=subject.attrs)
    return subject.attrs


def _finish_dataset(
    out_dir: Path,
    written: dict[str, dict[str, Any]],
    skipped: list[Skipped],
    *,
    grid_shape: tuple[int, int, int],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> PreparedDataset:
    """Write ``split.json`` and ``skipped.csv`` for the subjects written (attributes by subject id)."""
    if not written:
        reasons = "; ".join(f"{s.subject_id}: {s.reason}" for s in skipped[:5])
        raise DaregError(
            f"No usable subject among {len(skipped)} ({reasons}{'; ...' if len(skipped) > 5 else ''})."
        )
    split = make_split(list(written), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    attrs = list(written.values())
    label_names: dict[int, str] = {}
    for subject_attrs in attrs:
        label_names.update(subject_attrs["label_names"])
    info = {
        "format_version": SUBJECT_FORMAT_VERSION,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "grid_shape": [int(n) for n in grid_shape],
        "spacing_mm": np.mean([a["spacing_mm"] for a in attrs], axis=0).tolist(),
        "label_names": {str(k): v for k, v in sorted(label_names.items())},
        "normalisation": attrs[0]["normalisation"],
        **{key: [f"{subject_id}.h5" for subject_id in split[key]] for key in SPLIT_KEYS},
    }
    io.write_json(info, out_dir / SPLIT_FILE)
    with (
        io.atomic_path(out_dir / SKIPPED_FILE) as temporary,
        temporary.open("w", newline="", encoding="utf-8") as f,
    ):
        writer = csv.writer(f)
        writer.writerow(["id", "image", "labels", "reason"])
        writer.writerows([s.subject_id, s.image, s.labels, s.reason] for s in skipped)
    return PreparedDataset(out_dir, split, skipped)
