"""Segments are paired by name, not by label value: Slicer files often number the same anatomy differently."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from dareg import io
from dareg.cli import main

from cli_helpers import write_case


def label_map(values: list[int], names: dict[int, str]) -> io.LabelMap:
    array = np.zeros((len(values), 3, 3), np.uint16)
    for slab, value in enumerate(values):
        array[slab] = value
    return io.LabelMap(sitk.GetImageFromArray(array), names)


def slab_values(labels: io.LabelMap) -> list[int]:
    return [int(v) for v in sitk.GetArrayFromImage(labels.image)[:, 0, 0]]


def test_renumbers_by_name_and_keeps_the_rest():
    fixed = label_map([1, 2, 3], {1: "liver", 2: "vessels", 3: "tumour"})
    moving = label_map([3, 1, 2, 7], {3: "Liver ", 1: "vessels", 2: "spleen", 7: "kidney"})
    matched = moving.with_ids_of(fixed)
    assert slab_values(matched) == [1, 2, 8, 7]  # spleen moves off id 2, which vessels now uses
    assert matched.names == {1: "Liver ", 2: "vessels", 8: "spleen", 7: "kidney"}
    assert slab_values(moving) == [3, 1, 2, 7]  # the input is untouched


def test_unnamed_maps_are_left_alone():
    fixed = label_map([1, 2], {})
    moving = label_map([2, 1], {2: "liver"})
    assert moving.with_ids_of(fixed) is moving


def test_register_pairs_segments_by_name(tmp_path):
    """Moving .seg.nrrd with the label values reversed: the liver must still be compared with the liver."""
    case = write_case(tmp_path / "case", seed=1)
    moving = io.read_label_map(case.moving_seg)
    reversed_ids = {i: 11 - i for i in moving.names}  # phantom ids 1..10 -> 10..1
    lookup = np.arange(12, dtype=np.uint16)
    for old, new in reversed_ids.items():
        lookup[old] = new
    image = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(moving.image)])
    image.CopyInformation(moving.image)
    fixed_named = tmp_path / "fixed.seg.nrrd"
    io.write_label_map(io.LabelMap(io.read_label_map(case.fixed_seg).image, dict(moving.names)), fixed_named)
    renumbered = tmp_path / "moving_renumbered.seg.nrrd"
    io.write_label_map(io.LabelMap(image, {reversed_ids[i]: n for i, n in moving.names.items()}), renumbered)
    for name, seg in (("original", case.moving_seg), ("renumbered", renumbered)):
        args = case.args(tmp_path / name) + ["--liver-label", "liver"]
        args[args.index("--moving-seg") + 1] = str(seg)
        args[args.index("--fixed-seg") + 1] = str(fixed_named)
        assert main(args) == 0
    original = json.loads((tmp_path / "original" / "metrics.json").read_text())["metrics"]
    renumbered_metrics = json.loads((tmp_path / "renumbered" / "metrics.json").read_text())["metrics"]
    for stage in ("unregistered", "registered"):
        assert (
            renumbered_metrics[stage]["labels"]["liver"]["dice"] == original[stage]["labels"]["liver"]["dice"]
        )
    assert renumbered_metrics["unregistered"]["labels"]["liver"]["dice"] > 0.5
