"""MRML nodes <-> the files ``dareg`` reads and writes.

Geometry goes through Slicer's own storage nodes (``vtkMRMLVolumeArchetypeStorageNode``,
``vtkMRMLTransformStorageNode``), which convert between Slicer's RAS memory and the LPS files of
ITK: no axis is flipped by hand here.

Segmentations are written as single-layer ``.seg.nrrd`` label maps on their volume's voxel grid,
with ONE name -> id table shared by the fixed and the moving segmentation (:class:`LabelTable`):
the core matches labels across the two files by id, so "liver" must carry the same id in both even
when the segments are stored in a different order. Names are matched case-insensitively.

Nothing here adds nodes to the scene or changes an input node: exports read nodes and write files;
imports fill nodes that are not (yet) in a scene, which the caller adds in one go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _key(name: str) -> str:
    return name.strip().casefold()


def segment_names(segmentation_node) -> list[str]:
    """Segment names in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def find_segment_id(segmentation_node, name: str) -> str | None:
    """ID of the segment called ``name`` (case-insensitive, surrounding spaces ignored), or None."""
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        if _key(segmentation.GetNthSegment(index).GetName()) == _key(name):
            return segmentation.GetNthSegmentID(index)
    return None


def _check_unique(names: list[str], what: str) -> None:
    keys = [_key(n) for n in names]
    repeated = sorted({n for n, k in zip(names, keys, strict=True) if keys.count(k) > 1})
    if repeated:
        raise ValueError(
            f"The {what} segmentation has several segments called {', '.join(map(repr, repeated))} "
            "(names are compared ignoring case). Rename them so that every name is unique: segments "
            "are matched between the fixed and moving segmentations by name."
        )


@dataclass(frozen=True)
class LabelTable:
    """Label id -> segment name, shared by the fixed and the moving label maps.

    Ids are 1, 2, ... in order of first appearance: the fixed segmentation's segments, then those only
    the moving segmentation has.
    """

    names: dict[int, str]

    @classmethod
    def from_names(cls, fixed: list[str], moving: list[str]) -> LabelTable:
        _check_unique(fixed, "fixed")
        _check_unique(moving, "moving")
        names: dict[int, str] = {}
        seen: set[str] = set()
        for name in [*fixed, *moving]:
            if _key(name) not in seen:
                seen.add(_key(name))
                names[len(names) + 1] = name
        return cls(names)

    def id_of(self, name: str) -> int | None:
        """Id of ``name`` (case-insensitive), or None."""
        return next((i for i, n in self.names.items() if _key(n) == _key(name)), None)

    def restricted_to(self, names: list[str]) -> dict[int, str]:
        """Id -> name for ``names`` (one segmentation's segments), spelled as in ``names``."""
        spelling = {_key(n): n for n in names}
        return {i: spelling[_key(n)] for i, n in self.names.items() if _key(n) in spelling}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _write(storage_node, node, path: Path) -> None:
    storage_node.SetFileName(str(path))
    if not storage_node.WriteData(node):
        raise OSError(f"Could not write {node.GetName() or node.GetClassName()} to {path}.")


def write_volume(volume_node, path: Path) -> None:
    """Write a volume with its geometry (in its own coordinates; parent transforms are not applied)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetUseCompression(False)  # a temporary file: speed matters, size does not
    _write(storage, volume_node, path)


def _oriented_image(volume_node):
    """The volume's voxels and geometry as the image type segmentations use (voxels shared, not copied)."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(volume_node.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _label_values(segmentation_node, table: LabelTable) -> tuple[vtk.vtkStringArray, vtk.vtkIntArray]:
    segment_ids, values = vtk.vtkStringArray(), vtk.vtkIntArray()
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        values.InsertNextValue(table.id_of(segmentation.GetNthSegment(index).GetName()))
    return segment_ids, values


def _with_binary_labelmap(segmentation_node):
    """The node itself if it holds binary labelmaps, else a converted copy (the input stays as it is)."""
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation_node.GetSegmentation().ContainsRepresentation(name):
        return segmentation_node
    copy = slicer.vtkMRMLSegmentationNode()
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    if not copy.GetSegmentation().CreateRepresentation(name):
        raise ValueError(
            f"Segmentation {segmentation_node.GetName()!r} cannot be converted to a binary labelmap. "
            "Open it in the Segmentations module and create the 'Binary labelmap' representation."
        )
    return copy


def _segment(name: str, label_id: int, labels, colors_from) -> object:
    """A segment stored as the value ``label_id`` of the shared label map ``labels``."""
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetLabelValue(label_id)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labels)
    source_id = find_segment_id(colors_from, name) if colors_from is not None else None
    if source_id is not None:
        segment.SetColor(colors_from.GetSegmentation().GetSegment(source_id).GetColor())
    return segment


def _segmentation_from_labels(labels, names: dict[int, str], colors_from):
    """A segmentation node (not in a scene): one segment per ``names`` entry, all sharing ``labels``."""
    node = slicer.vtkMRMLSegmentationNode()
    for label_id, name in names.items():
        node.GetSegmentation().AddSegment(_segment(name, label_id, labels, colors_from))
    return node


def write_segmentation(segmentation_node, reference_volume, table: LabelTable, path: Path) -> None:
    """Write a ``.seg.nrrd`` whose label values are ``table``'s ids, on ``reference_volume``'s voxel grid.

    All segments go into one layer (the core reads one label map); where segments overlap, the one
    listed later in the segmentation wins, as in Slicer's own label-map export. Names and colours are
    kept, so the core reports segments by name.
    """
    source = _with_binary_labelmap(segmentation_node)
    geometry = _oriented_image(reference_volume)
    merged = slicer.vtkOrientedImageData()
    segment_ids, values = _label_values(source, table)
    if not source.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, segment_ids, values
    ):
        raise ValueError(f"Could not export segmentation {segmentation_node.GetName()!r} to a label map.")
    names = table.restricted_to(segment_names(segmentation_node))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetUseCompression(False)
    _write(storage, _segmentation_from_labels(merged, names, segmentation_node), path)


def write_landmarks(markups_node, path: Path) -> None:
    """Control points of a markups node as a CSV of LPS mm (``x,y,z``), in the node's own coordinates."""
    points = slicer.util.arrayFromMarkupsControlPoints(markups_node, world=False) * LPS_TO_RAS
    rows = ["x,y,z", *(",".join(repr(float(v)) for v in point) for point in points)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Import (into nodes that are not in a scene yet)
# --------------------------------------------------------------------------------------------------


def _read(storage_node, node, path: Path) -> None:
    storage_node.SetFileName(str(path))
    if not storage_node.ReadData(node):
        raise OSError(f"Could not read {path}.")


def read_transform(path: Path):
    """A grid transform node holding the displacement field of ``path`` as its FromParent transform.

    The file holds a resampling transform fixed -> moving (ITK convention), which Slicer's storage node
    stores as FromParent. Interpolation is set to linear: Slicer's default for grid transforms is
    cubic, while the core, ITK and ANTs interpolate displacement fields linearly, so only linear
    makes Slicer show exactly the transform the metrics were computed with.
    """
    node = slicer.vtkMRMLGridTransformNode()
    _read(slicer.vtkMRMLTransformStorageNode(), node, path)
    node.GetTransformFromParent().SetInterpolationModeToLinear()
    return node


def read_volume(path: Path, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A volume node of ``node_class`` read from ``path``."""
    node = getattr(slicer, node_class)()
    _read(slicer.vtkMRMLVolumeArchetypeStorageNode(), node, path)
    return node


def read_segmentation(path: Path, names: dict[int, str], colors_from=None):
    """A segmentation node (not in a scene) with one segment per ``names`` entry (label id -> name),
    from the single-layer label map at ``path`` (a plain label file or the core's ``.seg.nrrd``).

    Segments share the label map (Slicer's shared-labelmap layout); segments absent from the file stay,
    empty. Colours are copied from ``colors_from`` (the moving segmentation) by name. The file is read as
    a label volume, which, unlike reading a segmentation, needs no scene.
    """
    labels = _oriented_image(read_volume(path, "vtkMRMLLabelMapVolumeNode"))
    return _segmentation_from_labels(labels, names, colors_from)
