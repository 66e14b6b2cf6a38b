"""The compare layout: fixed / deep / SyN slice views side by side, linked, with segmentation outlines.

Everything is set through MRML (layout node, slice nodes, slice composite nodes, segmentation display
nodes), so it works the same with or without the GUI; the widget only asks the views to fit the
volumes afterwards. The views get their own view group: linking them (same slice position, zoom and
orientation) then leaves the user's standard Red/Yellow/Green views alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import slicer

from .results import referenced

#: Layout ids (one per number of views); chosen far from Slicer's built-in ids (< 1000).
COMPARE_LAYOUT_IDS = {2: 48202, 3: 48203}
COMPARE_VIEW_GROUP = 48200


@dataclass(frozen=True)
class CompareView:
    """One slice view of the compare layout: its layout name, label, colour and what it shows."""

    name: str
    label: str
    color: str
    volume_role: str
    segmentation_role: str


VIEWS = (
    CompareView("DeepAbdominalRegistrationFixed", "Fixed", "#7f7f7f", "fixedVolume", "fixedSegmentation"),
    CompareView("DeepAbdominalRegistrationDeep", "Deep", "#3a7bd5", "deepVolume", "deepSegmentation"),
    CompareView("DeepAbdominalRegistrationSyN", "SyN", "#d5843a", "synVolume", "synSegmentation"),
)


def layout_xml(views: list[CompareView]) -> str:
    """A horizontal row of axial slice views."""
    items = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{v.name}">'
        '<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{v.label}</property>'
        f'<property name="viewcolor" action="default">{v.color}</property>'
        f'<property name="viewgroup" action="default">{COMPARE_VIEW_GROUP}</property>'
        "</view></item>"
        for v in views
    )
    return f'<layout type="horizontal">{items}</layout>'


def _slice_node(scene, view: CompareView):
    """The view's slice node: created by the layout manager in the application, here if it did not."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        if node.GetLayoutName() == view.name:
            return node
    node = slicer.vtkMRMLSliceNode()
    node.SetName(view.name)
    node.SetLayoutName(view.name)
    node.SetSingletonTag(view.name)
    return scene.AddNode(node)


def _composite_node(scene, slice_node):
    node = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(slice_node)
    if node is None:
        node = slicer.vtkMRMLSliceCompositeNode()
        node.SetLayoutName(slice_node.GetLayoutName())
        node = scene.AddNode(node)
    return node


def _configure_view(scene, view: CompareView, volume) -> str:
    """Point one view at its volume, link it to the other compare views; returns its slice node ID."""
    slice_node = _slice_node(scene, view)
    slice_node.SetLayoutLabel(view.label)
    slice_node.SetViewGroup(COMPARE_VIEW_GROUP)
    if slice_node.HasSliceOrientationPreset("Axial"):
        slice_node.SetOrientation("Axial")
    composite = _composite_node(scene, slice_node)
    composite.SetBackgroundVolumeID(volume.GetID())
    composite.SetForegroundVolumeID(None)
    composite.SetLabelVolumeID(None)
    composite.SetLinkedControl(True)
    return slice_node.GetID()


def _show_outlines(segmentation, view_ids: list[str], restrict: bool) -> None:
    """Draw ``segmentation`` as outlines in ``view_ids``; ``restrict`` limits it to those views.

    Only segmentations created by the module are restricted; an input segmentation that was already
    limited to some views is extended to the compare views, otherwise shown everywhere as before.
    """
    segmentation.CreateDefaultDisplayNodes()
    display = segmentation.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DOutline(True)
    if restrict:
        display.SetVisibility2DFill(False)
        display.SetViewNodeIDs(view_ids)
    elif display.GetNumberOfViewNodeIDs() > 0:
        for view_id in view_ids:
            display.AddViewNodeID(view_id)


def show_compare_layout(scene, layout_node, table_node) -> list[str]:
    """Switch to the compare layout for the results referenced by ``table_node``.

    Fixed, deep and (when the SyN comparison ran) SyN volumes each get one linked axial view. The fixed
    segmentation's outlines appear in every compare view, as the common reference; each warped
    segmentation appears only in its own view, so the two outlines there show the overlap.

    Returns
    -------
    list[str]
        Layout names of the views shown, left to right.
    """
    nodes = referenced(table_node)
    views = [v for v in VIEWS if v.volume_role in nodes]
    if "fixedVolume" not in nodes or "deepVolume" not in nodes:
        raise ValueError(
            f"Table {table_node.GetName()!r} does not reference a registration result to compare."
        )
    layout_id = COMPARE_LAYOUT_IDS[len(views)]
    description = layout_xml(views)
    if layout_node.IsLayoutDescription(layout_id):
        layout_node.SetLayoutDescription(layout_id, description)
    else:
        layout_node.AddLayoutDescription(layout_id, description)
    layout_node.SetViewArrangement(layout_id)
    view_ids = {v.name: _configure_view(scene, v, nodes[v.volume_role]) for v in views}
    for view in views:
        segmentation = nodes.get(view.segmentation_role)
        if segmentation is None:
            continue
        if view.segmentation_role == "fixedSegmentation":
            _show_outlines(segmentation, list(view_ids.values()), restrict=False)
        else:
            _show_outlines(segmentation, [view_ids[view.name]], restrict=True)
    return [v.name for v in views]
