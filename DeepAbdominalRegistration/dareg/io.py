"""Reading and writing everything the registration pipeline exchanges with disk.

Everything outside this module works on in-memory ``SimpleITK.Image`` objects whose geometry is in LPS
millimetres (see :mod:`dareg.geometry`); this module is the only place that knows file formats.

- Images: NIfTI, NRRD, MetaImage (``.mha``/``.mhd``) and DICOM series folders, always returned as 3-D
  scalar ``sitkFloat32``.
- Label maps: plain integer label files and 3D Slicer ``.seg.nrrd`` segmentations (via ``slicerio``),
  returned as a :class:`LabelMap` (``sitkUInt16`` ids plus optional segment names).
- Displacement fields: NIfTI (intent 1006, ITK/ANTs/Slicer-readable) or ITK transform files
  (``.h5``/``.hdf5``/``.tfm``), LPS mm vectors, resampling convention fixed -> moving.
- Landmarks: CSV (LPS mm) and Slicer markups ``.mrk.json``.
- JSON reports.

Every writer is atomic (:func:`atomic_path`): a failed or interrupted write leaves neither a partial
file nor a damaged previous version. Every error a user can cause raises :class:`DaregError`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import slicerio

from dareg.errors import DaregError
from dareg.geometry import index_to_physical_matrix, physical_overlap, resample_to_reference

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm")
LANDMARK_SUFFIXES = (".csv", ".mrk.json")

# NIFTI_INTENT_DISPVECT: ITK >= 5.3 converts such vectors from RAS to LPS when reading.
_NIFTI_INTENT_DISPVECT = 1006
# NIfTI stores vectors and the affine in RAS; LPS <-> RAS flips the first two axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_MAX_LABEL = int(np.iinfo(np.uint16).max)


def _has_suffix(path: PathLike, suffixes: Iterable[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in suffixes)


def _require_existing(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DaregError(f"{what} not found: {path}. Check the path (and the working folder) and try again.")
    return path


def _require_suffix(path: PathLike, suffixes: Iterable[str], what: str) -> None:
    suffixes = tuple(suffixes)
    if not _has_suffix(path, suffixes):
        raise DaregError(
            f"Cannot write {what} to {path}: unsupported file type. Use one of {', '.join(suffixes)}."
        )


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` to; move it into place only if the block succeeds.

    The temporary path lives in a private folder next to ``path`` (same file system, so ``os.replace``
    is atomic) and has ``path``'s file name, so writers that choose the format from the extension, or
    write companion files (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``) referring to each other by name,
    behave exactly as for the final path. On success, companion files are moved first and the named
    file last, so a reader never sees the main file before its data. On any failure the private folder
    is removed: nothing is left behind and an existing ``path`` is untouched.

    Parameters
    ----------
    path
        Final file path. Missing parent folders are created.

    Yields
    ------
    Path
        Where the caller writes the file.

    Raises
    ------
    DaregError
        If the folder cannot be created or written, or the file system refuses the write.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise DaregError(
            f"Cannot write {target}: the folder {target.parent} cannot be created or written ({exc}). "
            "Choose an output folder you have write permission for."
        ) from exc
    try:
        yield staging / target.name
        written = staging / target.name
        if not written.is_file():
            raise DaregError(f"Writing {target} produced no file; the output format may not be supported.")
        for companion in staging.iterdir():
            if companion != written:
                os.replace(companion, target.parent / companion.name)
        os.replace(written, target)
    except OSError as exc:
        raise DaregError(
            f"Cannot write {target} ({exc}). "
            f"Check the free disk space and the permissions of {target.parent}."
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_sitk_image(image: sitk.Image, path: PathLike, *, compress: bool) -> None:
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=compress)
        except RuntimeError as exc:
            raise DaregError(f"Cannot write {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def _dicom_series_files(folder: Path) -> list[str]:
    """File names of the largest DICOM series directly inside ``folder`` (sorted by GDCM)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise DaregError(
            f"No DICOM series found in folder {folder}. Pass the folder that directly contains the DICOM "
            "slice files, or an image file (.nii.gz, .nrrd, .mha)."
        )
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series, key=lambda sid: len(series[sid]))
    if len(series) > 1:
        logger.warning(
            "Folder %s holds %d DICOM series; reading the largest one (%s, %d files). "
            "Put each series in its own folder to choose another.",
            folder,
            len(series),
            chosen,
            len(series[chosen]),
        )
    return list(series[chosen])


def _read_sitk(path: Path, what: str) -> sitk.Image:
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(path))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DaregError(
            f"Cannot read {what} {path}: the file is damaged or not a supported format "
            f"({', '.join(IMAGE_SUFFIXES)}, or a DICOM series folder). Details: {exc}"
        ) from exc


def _check_volume(image: sitk.Image, path: Path, what: str) -> None:
    """Reject anything that is not one 3-D scalar volume with at least 2 voxels along every axis."""
    size = image.GetSize()
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) < 2):
        raise DaregError(
            f"{what} {path} is 2-D (size {size}); a 3-D volume is needed. "
            "For DICOM, pass the folder that holds all slices of the series, not one slice."
        )
    if image.GetDimension() != 3:
        raise DaregError(
            f"{what} {path} is {image.GetDimension()}-D (size {size}); a single 3-D volume is needed. "
            "Extract one time point or channel first (for example with 3D Slicer or SimpleITK)."
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DaregError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour, "
            "vector or displacement data); a scalar volume is needed. Convert it to a grey-level volume."
        )


def _nifti_has_non_finite(path: Path) -> bool:
    """NaN/inf in a floating-point NIfTI file. Needed because ITK's NIfTI reader silently turns NaN
    into 0 (seen with SimpleITK 2.5 / ITK 5.4), which would hide the defect instead of reporting it.
    Integer files (most CTs) cannot hold NaN and are not read twice."""
    if not _has_suffix(path, NIFTI_SUFFIXES):
        return False
    image = nib.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return False
    return not np.isfinite(np.asanyarray(image.dataobj)).all()


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3-D scalar image from a file or a DICOM series folder.

    Parameters
    ----------
    path
        A ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder holding a
        DICOM series. If the folder holds several series, the one with the most files is read and a
        warning is logged.

    Returns
    -------
    sitk.Image
        3-D ``sitkFloat32`` image with its geometry (LPS mm); intensities unchanged (DICOM rescale
        slope/intercept applied, so CT is in HU).

    Raises
    ------
    DaregError
        Missing path, unreadable or damaged file, 2-D image (including a single slice), 4-D or
        multi-component image, or NaN/infinite voxels.
    """
    path = _require_existing(path, "Image")
    image = _read_sitk(path, "image")
    _check_volume(image, path, "Image")
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all() or _nifti_has_non_finite(path):
        raise DaregError(
            f"Image {path} contains NaN or infinite voxel values. Replace them (e.g. with the background "
            "intensity) before registering."
        )
    return image


def write_image(image: sitk.Image, path: PathLike) -> None:
    """Write ``image`` atomically; the format follows the extension (gzip-compressed where possible).

    Raises
    ------
    DaregError
        Unsupported extension or a folder that cannot be written.
    """
    _require_suffix(path, IMAGE_SUFFIXES, "an image")
    _write_sitk_image(image, path, compress=True)


# ---------------------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """A label map: integer ids on an image grid, with optional segment names.

    Attributes
    ----------
    image
        ``sitkUInt16`` label ids, 0 = background, with the geometry of the segmented image.
    names
        Segment name per id (from ``.seg.nrrd`` files); empty for plain label files.

    The image is treated as immutable: make a new ``LabelMap`` rather than editing ``image``.
    """

    image: sitk.Image
    names: dict[int, str] = field(default_factory=dict)
    _ids: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def label_ids(self) -> list[int]:
        """Sorted non-zero ids present in the image (computed once: a full-size CT takes ~0.5 s)."""
        if self._ids is None:
            counts = np.bincount(sitk.GetArrayViewFromImage(self.image).ravel())
            self._ids = [int(i) for i in np.flatnonzero(counts) if i != 0]
        return list(self._ids)

    def resolve(self, label: int | str) -> int:
        """Label id for an id or a segment name (case-insensitive; a string of digits is an id).

        Raises
        ------
        DaregError
            If no segment has that id or name; the message lists the available ones.
        """
        known = sorted(set(self.label_ids()) | set(self.names))
        if isinstance(label, str):
            wanted = label.strip().casefold()
            for label_id, name in self.names.items():
                if name.strip().casefold() == wanted:
                    return label_id
            if wanted.isdigit():
                label = int(wanted)
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and int(label) in known:
            return int(label)
        available = ", ".join(f"{i} ({self.names[i]})" if i in self.names else str(i) for i in known)
        raise DaregError(
            f"Label {label!r} not found in the segmentation. Available labels: "
            f"{available or 'none (empty segmentation)'}. Pass one of these ids or names."
        )

    def with_ids_of(self, reference: LabelMap) -> LabelMap:
        """This label map renumbered so that segments named as in ``reference`` carry its ids.

        Why: two Slicer segmentations of the same anatomy often store "liver" under different label
        values; comparing them id by id would pair the wrong segments. Segments are matched by name
        (case-insensitive); unnamed maps, or names ``reference`` lacks, keep their ids unless that id
        is taken by a matched segment, in which case they move to the next free id.
        """
        if not self.names or not reference.names:
            return self
        reference_ids = {name.strip().casefold(): i for i, name in reference.names.items()}
        mapping = {
            i: reference_ids[n.strip().casefold()]
            for i, n in self.names.items()
            if n.strip().casefold() in reference_ids
        }
        taken = set(mapping.values())
        next_free = max(taken | set(self.label_ids()) | set(reference.label_ids()) | {0}) + 1
        for label_id in self.label_ids():
            if label_id not in mapping:
                if label_id in taken:
                    mapping[label_id], next_free = next_free, next_free + 1
                else:
                    mapping[label_id] = label_id
                taken.add(mapping[label_id])
        if all(old == new for old, new in mapping.items()):
            return self
        lookup = np.arange(max(max(mapping), 1) + 1, dtype=np.uint16)
        for old, new in mapping.items():
            lookup[old] = new
        array = lookup[sitk.GetArrayViewFromImage(self.image)]
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.image)
        names = {mapping.get(i, i): name for i, name in self.names.items()}
        return LabelMap(image, names)

    def mask(self, label_ids: Iterable[int]) -> sitk.Image:
        """Binary ``sitkUInt8`` mask (0/1) of the voxels whose id is in ``label_ids``, same geometry."""
        ids = np.asarray(list(label_ids), dtype=np.int64)
        if ids.size == 0:
            raise ValueError("mask() needs at least one label id")
        array = np.isin(sitk.GetArrayViewFromImage(self.image), ids).astype(np.uint8)
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(self.image)
        return mask


def _segment_ids(segments: list[dict[str, Any]]) -> list[int]:
    """One distinct label id per segment: its ``labelValue``, renumbered if layers reuse a value.

    Slicer numbers the segments of each layer from 1, so overlapping segments (several layers) can
    share a labelValue; flattening needs distinct ids, so repeats get the next free id.
    """
    values = [int(segment.get("labelValue", 1)) for segment in segments]
    next_free = max(values, default=0) + 1
    used: set[int] = set()
    ids = []
    for segment, value in zip(segments, values, strict=True):
        if value in used:
            logger.warning(
                "Segment %r shares label value %d with another layer; it gets id %d.",
                segment.get("name"),
                value,
                next_free,
            )
            value, next_free = next_free, next_free + 1
        used.add(value)
        ids.append(value)
    return ids


def _image_from_ijk(array_ijk: np.ndarray, ijk_to_lps: np.ndarray) -> sitk.Image:
    """SimpleITK image from an (i, j, k)-ordered array and its 4x4 voxel-to-LPS matrix."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    matrix = np.asarray(ijk_to_lps, dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).ravel().tolist())
    image.SetOrigin(np.asarray(ijk_to_lps, dtype=float)[:3, 3].tolist())
    return image


def _read_seg_nrrd(path: Path) -> LabelMap:
    """Read a Slicer ``.seg.nrrd``; overlapping segments (several layers) are flattened, later ones win."""
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many unrelated types for a bad file
        raise DaregError(
            f"Cannot read segmentation {path}: not a valid 3D Slicer .seg.nrrd file ({exc}). "
            "Re-export it from Slicer (Segmentations > Export) or pass a label map file."
        ) from exc
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim not in (3, 4) or min(voxels.shape[-3:]) < 2:
        raise DaregError(f"Segmentation {path} has voxel shape {voxels.shape}; a 3-D segmentation is needed.")
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels
    if len(layers) > 1:
        logger.warning(
            "Segmentation %s has overlapping segments (%d layers); they are flattened into one label map "
            "in which segments listed later win the shared voxels.",
            path,
            len(layers),
        )
    segments = list(segmentation.get("segments", []))
    ids = _segment_ids(segments)
    if max(ids, default=0) > _MAX_LABEL:
        raise DaregError(f"Segmentation {path} has over {_MAX_LABEL} segments; split it into several files.")
    flat = np.zeros(layers.shape[1:], dtype=np.uint16)
    names = {}
    for segment, label_id in zip(segments, ids, strict=True):
        flat[layers[segment.get("layer", 0)] == segment.get("labelValue", 1)] = label_id
        names[label_id] = str(segment.get("name", f"Segment_{label_id}"))
    return LabelMap(_image_from_ijk(flat, segmentation["ijkToLPS"]), names)


def _read_plain_label_map(path: Path) -> LabelMap:
    image = _read_sitk(path, "label map")
    _check_volume(image, path, "Label map")
    values = sitk.GetArrayViewFromImage(image)
    if not np.array_equal(values, np.round(values)):
        raise DaregError(
            f"Label map {path} contains non-integer values: it looks like an intensity image or a "
            "probability map. Pass a label map (integer ids, 0 = background)."
        )
    if values.size and (values.min() < 0 or values.max() > _MAX_LABEL):
        raise DaregError(
            f"Label map {path} has label values outside 0..{_MAX_LABEL} (min {values.min()}, max "
            f"{values.max()}). Labels must be non-negative integer ids; relabel the file."
        )
    return LabelMap(sitk.Cast(image, sitk.sitkUInt16), {})


def _same_grid(image: sitk.Image, reference: sitk.Image) -> bool:
    """Same voxel grid up to the float32 rounding that NIfTI headers introduce."""
    spacing = np.asarray(reference.GetSpacing())
    return (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetSpacing(), spacing, rtol=1e-5, atol=0.0)
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0.0, atol=1e-3 * spacing.min())
        and np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0.0, atol=1e-5)
    )


def _fit_to_reference(labels: sitk.Image, reference: sitk.Image, path: Path) -> sitk.Image:
    if physical_overlap(reference, labels) == 0.0:
        raise DaregError(
            f"Segmentation {path} does not overlap its image in physical space: it belongs to another "
            "scan or its geometry (origin/orientation) is wrong. Pass the segmentation of this image."
        )
    if _same_grid(labels, reference):
        # Copying the reference geometry removes header rounding that would make ITK filters refuse
        # the pair as "not occupying the same physical space".
        labels = sitk.Image(labels)
        labels.CopyInformation(reference)
        return labels
    logger.info("Resampling segmentation %s onto its image grid (nearest neighbour).", path)
    return resample_to_reference(labels, reference, interpolation="nearest")


def read_label_map(path: PathLike, *, reference: sitk.Image | None = None) -> LabelMap:
    """Read a label map (NIfTI/NRRD/MHA label file or 3D Slicer ``.seg.nrrd``).

    Parameters
    ----------
    path
        Label file (integer ids, 0 = background; float files are accepted when every value is an
        integer) or ``.seg.nrrd``. For ``.seg.nrrd`` each segment's ``labelValue`` becomes its id and
        its name goes to :attr:`LabelMap.names`. Overlapping segments (stored by Slicer on several
        layers) are flattened into one label map in which segments listed later win the shared
        voxels; label values repeated across layers are renumbered to distinct ids (logged).
    reference
        The image the labels segment. If given, labels on another grid are resampled onto it
        (nearest neighbour), and labels that do not overlap it physically are rejected.

    Returns
    -------
    LabelMap
        ``sitkUInt16`` ids (on ``reference``'s grid if given) and segment names.

    Raises
    ------
    DaregError
        Missing or unreadable file, non-integer or negative labels, 2-D/4-D/multi-component data, or no
        physical overlap with ``reference``.
    """
    path = _require_existing(path, "Segmentation")
    if path.is_dir():
        raise DaregError(f"Segmentation {path} is a folder; pass a label file (.nii.gz, .nrrd, .seg.nrrd).")
    is_slicer_segmentation = _has_suffix(path, [SEGMENTATION_SUFFIX])
    label_map = _read_seg_nrrd(path) if is_slicer_segmentation else _read_plain_label_map(path)
    if reference is not None:
        label_map.image = _fit_to_reference(label_map.image, reference, path)
    return label_map


def _write_seg_nrrd(label_map: LabelMap, path: Path) -> None:
    ids = sorted(set(label_map.label_ids()) | set(label_map.names))
    dtype = np.uint8 if max(ids, default=0) <= np.iinfo(np.uint8).max else np.uint16
    matrix, origin = index_to_physical_matrix(label_map.image)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3], ijk_to_lps[:3, 3] = matrix, origin
    segmentation = {
        "voxels": np.transpose(sitk.GetArrayFromImage(label_map.image), (2, 1, 0)).astype(dtype),
        "ijkToLPS": ijk_to_lps,
        "segments": [
            {"id": f"Segment_{i}", "name": label_map.names.get(i, f"Segment_{i}"), "labelValue": i}
            for i in ids
        ],
    }
    with atomic_path(path) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation)


def write_label_map(label_map: LabelMap, path: PathLike) -> None:
    """Write a label map atomically: a Slicer ``.seg.nrrd`` (with segment names) or a plain label file.

    A ``.seg.nrrd`` gets one segment per id present in the image or named in ``names`` (unnamed ids
    are called ``Segment_<id>``), all on one layer, so Slicer shows the names. Plain label files
    (``.nii.gz``, ``.nrrd``, ``.mha``...) keep only the ids.

    Raises
    ------
    DaregError
        Unsupported extension or a folder that cannot be written.
    """
    if _has_suffix(path, [SEGMENTATION_SUFFIX]):
        _write_seg_nrrd(label_map, Path(path))
        return
    _require_suffix(path, IMAGE_SUFFIXES, "a label map")
    _write_sitk_image(label_map.image, path, compress=True)


# ---------------------------------------------------------------------------------------------------------
# Displacement fields and transforms
# ---------------------------------------------------------------------------------------------------------


def _check_field(field: sitk.Image) -> None:
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            "a displacement field must be a 3-D image with 3 components per voxel, got "
            f"{field.GetDimension()}-D with {field.GetNumberOfComponentsPerPixel()} components"
        )


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS mm matrix, the NIfTI qform/sform of ``image``'s geometry."""
    matrix, origin = index_to_physical_matrix(image)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = _LPS_TO_RAS @ matrix, _LPS_TO_RAS @ origin
    return affine


def _write_nifti_field(field: sitk.Image, path: Path, dtype: type) -> None:
    # (z, y, x, 3) LPS -> NIfTI's (x, y, z, t=1, 3) RAS layout that ITK reads back as LPS vectors.
    vectors = np.transpose(sitk.GetArrayFromImage(field), (2, 1, 0, 3)).astype(dtype)
    vectors[..., :2] *= -1.0
    affine = _ras_affine(field)
    nifti = nib.Nifti1Image(vectors[:, :, :, np.newaxis, :], affine)
    nifti.header.set_intent(_NIFTI_INTENT_DISPVECT)
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        nib.save(nifti, str(temporary))


def write_displacement_field(field: sitk.Image, path: PathLike, *, float64: bool = False) -> None:
    """Write a displacement field (LPS mm vectors, fixed -> moving) atomically.

    Parameters
    ----------
    field
        3-D vector image with 3 components: ``T(x) = x + field(x)``, LPS mm. Not modified.
    path
        ``.nii``/``.nii.gz``: an ITK displacement field readable by SimpleITK/ITK >= 5.3, ANTs and
        3D Slicer: NIfTI intent 1006 (DISPVECT), data shape (X, Y, Z, 1, 3), qform = sform = the RAS
        affine of the grid, and the vectors stored in RAS (x, y negated) because those readers convert
        intent-1006 vectors RAS -> LPS. (SimpleITK alone cannot write this: ITK refuses intent 1006
        for SimpleITK's VectorImage, hence nibabel.)
        ``.h5``/``.hdf5``/``.tfm``: an ITK ``DisplacementFieldTransform`` transform file (always float64).
    float64
        NIfTI only: store float64 instead of the default float32. float32 halves the file size and
        its rounding (about 1e-7 relative, well under a micrometre for abdominal displacements) is far
        below any registration error.

    Raises
    ------
    DaregError
        Unsupported extension or a folder that cannot be written.
    ValueError
        If ``field`` is not a 3-D, 3-component image.
    """
    _check_field(field)
    path = Path(path)
    if _has_suffix(path, NIFTI_SUFFIXES):
        _write_nifti_field(field, path, np.float64 if float64 else np.float32)
        return
    _require_suffix(path, NIFTI_SUFFIXES + ITK_TRANSFORM_SUFFIXES, "a displacement field")
    # The transform takes ownership of (and empties) the image it is given: hand it a private copy.
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    with atomic_path(path) as temporary:
        try:
            sitk.WriteTransform(transform, str(temporary))
        except RuntimeError as exc:
            raise DaregError(f"Cannot write {path}: {exc}") from exc


def _read_itk_transform(path: Path) -> sitk.Transform:
    try:
        return sitk.ReadTransform(str(path)).Downcast()
    except RuntimeError as exc:
        raise DaregError(
            f"Cannot read transform {path}: the file is damaged or not an ITK transform file "
            f"(.h5, .hdf5, .tfm, .txt, .mat). Details: {exc}"
        ) from exc


def read_displacement_field(path: PathLike) -> sitk.Image:
    """Read a displacement field written by :func:`write_displacement_field` (or ITK, ANTs, Slicer).

    Parameters
    ----------
    path
        NIfTI displacement field (intent 1006 vectors are converted RAS -> LPS by ITK; ITK's older
        vector NIfTI files are LPS already) or an ITK ``.h5``/``.hdf5``/``.tfm`` file holding a
        ``DisplacementFieldTransform``.

    Returns
    -------
    sitk.Image
        ``sitkVectorFloat64`` image, 3 components, LPS mm, resampling convention (fixed -> moving).

    Raises
    ------
    DaregError
        Missing or unreadable file, or a file that does not hold a 3-D displacement field.
    """
    path = _require_existing(path, "Displacement field")
    if _has_suffix(path, NIFTI_SUFFIXES):
        field = _read_sitk(path, "displacement field")
    else:
        transform = _read_itk_transform(path)
        if not isinstance(transform, sitk.DisplacementFieldTransform):
            raise DaregError(
                f"{path} holds a {transform.GetName()}, not a displacement field. Use read_transform for "
                "general transforms, or pass the displacement field file."
            )
        field = transform.GetDisplacementField()
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise DaregError(
            f"{path} is not a 3-D displacement field ({field.GetDimension()}-D image with "
            f"{field.GetNumberOfComponentsPerPixel()} components per voxel; 3-D with 3 are needed)."
        )
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def read_transform(path: PathLike) -> sitk.Transform:
    """Read a registration transform (resampling convention, fixed -> moving).

    NIfTI displacement fields become a ``sitk.DisplacementFieldTransform`` (linear interpolation of
    the field); ITK transform files (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat``) are returned as
    ``sitk.ReadTransform`` reads them, down-cast to their concrete type.

    Raises
    ------
    DaregError
        Missing or unreadable file.
    """
    path = _require_existing(path, "Transform")
    if _has_suffix(path, NIFTI_SUFFIXES):
        return sitk.DisplacementFieldTransform(read_displacement_field(path))
    return _read_itk_transform(path)


# ---------------------------------------------------------------------------------------------------------
# Landmarks
# ---------------------------------------------------------------------------------------------------------


def _as_points(rows: list[list[float]], path: Path) -> np.ndarray:
    points = np.asarray(rows, dtype=float).reshape(-1, 3)
    if len(points) == 0:
        raise DaregError(f"Landmark file {path} contains no points. Add at least one point.")
    if not np.isfinite(points).all():
        raise DaregError(f"Landmark file {path} contains NaN or infinite coordinates; fix or remove them.")
    return points


def _read_landmarks_csv(path: Path) -> np.ndarray:
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            lines = list(csv.reader(stream))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DaregError(f"Cannot read landmark file {path}: not a text CSV file ({exc}).") from exc
    header = [column.strip().casefold() for column in (lines[0] if lines else [])]
    if not {"x", "y", "z"} <= set(header):
        raise DaregError(
            f"Landmark file {path} needs a header row with columns x, y, z (LPS mm); found "
            f"{header or 'an empty file'}. Add the header line 'x,y,z'."
        )
    columns = [header.index(axis) for axis in ("x", "y", "z")]
    rows = []
    for line_number, row in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            rows.append([float(row[column]) for column in columns])
        except (IndexError, ValueError):
            raise DaregError(
                f"Landmark file {path}, line {line_number}: expected numbers in the x, y, z columns, "
                f"got {row}. Fix that line."
            ) from None
    return _as_points(rows, path)


_UNIT_TO_MM = {"mm": 1.0, "um": 1e-3}


def _markup_points(markup: dict[str, Any], path: Path) -> list[list[float]]:
    """Control points of one markup, in LPS mm (Slicer's schema defaults: LPS, mm)."""
    system = markup.get("coordinateSystem", "LPS")
    units = markup.get("coordinateUnits", "mm")
    units = units[0] if isinstance(units, list) and units else units
    if system not in ("LPS", "RAS") or units not in _UNIT_TO_MM:
        raise DaregError(
            f"Markups file {path} uses coordinate system {system!r} in {units!r}; only LPS or RAS in "
            "mm or um are supported. Re-save the markups from 3D Slicer."
        )
    flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    points = []
    for index, point in enumerate(markup.get("controlPoints", [])):
        position = point.get("position")
        if point.get("positionStatus") == "undefined" or position is None or len(position) != 3:
            raise DaregError(
                f"Markups file {path}: control point {index} ({point.get('label', '')!r}) has no defined "
                "position. Place it or delete it in 3D Slicer, so that points pair up by index."
            )
        points.append((np.asarray(position, dtype=float) * flip * _UNIT_TO_MM[units]).tolist())
    return points


def _read_landmarks_markups(path: Path) -> np.ndarray:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        markups = document["markups"]
        rows = [row for markup in markups for row in _markup_points(markup, path)]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DaregError(
            f"Cannot read markups file {path}: not a valid 3D Slicer .mrk.json file ({exc}). "
            "Re-save the points from Slicer's Markups module."
        ) from exc
    return _as_points(rows, path)


def read_landmarks(path: PathLike) -> np.ndarray:
    """Read landmark points, shape (N, 3), LPS mm, in file order (points pair up by index).

    Parameters
    ----------
    path
        ``.csv``: a header row with columns ``x``, ``y``, ``z`` (any case, any order; other columns
        such as ``label`` or ``name`` are ignored) and one point per row. CSV coordinates are LPS
        millimetres (ITK/DICOM convention, as :func:`write_landmarks` writes them).
        ``.mrk.json``: 3D Slicer markups; every markup's control points in order, converted from its
        ``coordinateSystem`` (LPS or RAS; x and y negated for RAS) and ``coordinateUnits``.

    Raises
    ------
    DaregError
        Missing file, unsupported extension, malformed content, undefined control points, or no points.
    """
    path = _require_existing(path, "Landmark file")
    if _has_suffix(path, [".mrk.json"]):
        return _read_landmarks_markups(path)
    if _has_suffix(path, [".csv"]):
        return _read_landmarks_csv(path)
    raise DaregError(
        f"Unsupported landmark file {path}: use a .csv (columns x,y,z in LPS mm) or a Slicer .mrk.json."
    )


def write_landmarks(points: np.ndarray, path: PathLike) -> None:
    """Write points, shape (N, 3), LPS mm, as a CSV file with header ``x,y,z`` (atomic).

    Values are written with ``repr`` precision so that :func:`read_landmarks` returns them exactly.

    Raises
    ------
    DaregError
        Path not ending in ``.csv``, or a folder that cannot be written.
    ValueError
        If ``points`` is not an (N, 3) array of finite numbers.
    """
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
        raise ValueError(f"points must be a finite (N, 3) array, got shape {points.shape}")
    _require_suffix(path, [".csv"], "landmarks")
    with atomic_path(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["x", "y", "z"])
        writer.writerows([[repr(float(value)) for value in point] for point in points])


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """``value`` with numpy types turned into Python ones and NaN/inf into None (JSON has neither)."""
    if isinstance(value, dict):
        return {_json_ready(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(data: Any, path: PathLike) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically.

    numpy scalars and arrays become numbers and lists; NaN and infinities become ``null`` so the file
    is valid JSON for any reader; paths become strings.

    Raises
    ------
    DaregError
        A folder that cannot be written.
    TypeError
        If ``data`` holds objects JSON cannot represent.
    """
    text = json.dumps(_json_ready(data), indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
