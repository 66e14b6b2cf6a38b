"""The results table: deep registration and (optionally) ANTs SyN side by side, from metrics.json.

Every number shown comes from the core's ``metrics.json`` files (nothing is recomputed in Slicer), so
the table, the command-line summary and reports agree. The table node also keeps references to the
nodes a comparison needs (:data:`REFERENCE_ROLES`), so the compare layout can be rebuilt from the
table alone, e.g. after the scene was saved and loaded again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import vtk

MEASURE_COLUMN = "Measure"
UNREGISTERED_COLUMN = "Unregistered"
DEEP_COLUMN = "Deep"
SYN_COLUMN = "SyN"

#: Node reference roles on the table node (values: node IDs).
REFERENCE_ROLES = (
    "fixedVolume",
    "fixedSegmentation",
    "deepVolume",
    "deepSegmentation",
    "synVolume",
    "synSegmentation",
)

Row = tuple[str, list[float]]
_NAN = float("nan")


def read_metrics(path: Path) -> dict:
    """The parsed ``metrics.json`` of a run."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _get(document: dict | None, *keys: str) -> float:
    """``document[k1][k2]...`` as a float; NaN where anything is missing (e.g. no landmarks given)."""
    value = document
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return _NAN
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NAN


def _stage(document: dict | None, stage: str) -> dict | None:
    return document["metrics"].get(stage) if document else None


def _label_keys(documents: list[dict]) -> list[str]:
    keys: list[str] = []
    for document in documents:
        for key in _stage(document, "registered").get("labels", {}):
            if key not in keys:
                keys.append(key)
    return keys


def metric_rows(deep: dict, syn: dict | None) -> list[Row]:
    """Rows ``(measure, [unregistered, deep(, syn)])``: per-segment DSC / HD95 / centroid TRE, landmark
    TRE, NCC, folding and runtime. Values that a run does not have are NaN."""
    blocks = [_stage(deep, "unregistered"), _stage(deep, "registered")]
    documents = [deep]
    if syn is not None:
        blocks.append(_stage(syn, "registered"))
        documents.append(syn)

    def row(title: str, *keys: str, scale: float = 1.0) -> Row:
        return title, [_get(block, *keys) * scale for block in blocks]

    rows: list[Row] = []
    for name in _label_keys(documents):
        rows.append(row(f"{name} DSC", "labels", name, "dice"))
        rows.append(row(f"{name} HD95 (mm)", "labels", name, "hd95"))
        rows.append(row(f"{name} centroid TRE (mm)", "labels", name, "centroid_tre"))
    if not math.isnan(_get(blocks[0], "landmark_tre", "mean")):
        rows.append(row("Landmark TRE mean (mm)", "landmark_tre", "mean"))
        rows.append(row("Landmark TRE max (mm)", "landmark_tre", "max"))
    rows.append(row("NCC", "ncc"))
    rows.append(row("Folding voxels (%)", "jacobian", "fraction_nonpositive", scale=100.0))
    rows.append(("Runtime (s)", [_NAN] + [_get(d, "timings_s", "total") for d in documents]))
    return rows


def column_names(with_syn: bool) -> list[str]:
    return [MEASURE_COLUMN, UNREGISTERED_COLUMN, DEEP_COLUMN] + ([SYN_COLUMN] if with_syn else [])


def fill_table(table_node, rows: list[Row], with_syn: bool) -> None:
    """Replace the table's content: a text column of measures, one number column per method."""
    names = column_names(with_syn)
    columns: list[vtk.vtkAbstractArray] = [vtk.vtkStringArray()] + [vtk.vtkDoubleArray() for _ in names[1:]]
    for column, name in zip(columns, names, strict=True):
        column.SetName(name)
    for measure, values in rows:
        columns[0].InsertNextValue(measure)
        for column, value in zip(columns[1:], values, strict=True):
            column.InsertNextValue(value)
    table_node.RemoveAllColumns()
    for column in columns:
        table_node.AddColumn(column)
        table_node.SetColumnTitle(column.GetName(), column.GetName())
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)  # results, not for editing
    table_node.Modified()


def set_references(table_node, nodes: dict[str, object]) -> None:
    """Store ``{role: node}`` (roles of :data:`REFERENCE_ROLES`; None values are skipped)."""
    for role, node in nodes.items():
        if role not in REFERENCE_ROLES:
            raise ValueError(f"Unknown table reference role {role!r}; use one of {REFERENCE_ROLES}.")
        table_node.SetNodeReferenceID(role, node.GetID() if node is not None else None)


def referenced(table_node) -> dict[str, object]:
    """``{role: node}`` for the roles set on ``table_node``."""
    nodes = {role: table_node.GetNodeReference(role) for role in REFERENCE_ROLES}
    return {role: node for role, node in nodes.items() if node is not None}
