"""What a registration needs (:class:`RegistrationRequest`) and checking it before anything starts.

:func:`validate` raises ``ValueError`` with what to do; the widget shows the same message as the
Register button's tooltip, so a request that cannot run is explained before the user clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import exchange

DEVICES = ("auto", "cpu", "gpu")
#: Attribute marking nodes this module created or filled (its transforms may stay on the moving volume).
CREATED_BY_ATTRIBUTE = "DeepAbdominalRegistration.CreatedBy"


@dataclass(frozen=True)
class RegistrationRequest:
    """Everything a run needs; nodes are MRML nodes, the rest plain values (see the Logic's docstring)."""

    fixed_volume: object
    moving_volume: object
    fixed_segmentation: object = None
    moving_segmentation: object = None
    liver_segment_name: str = "liver"
    vessel_segment_names: tuple[str, ...] = ()
    model: str = "default"
    device: str = "auto"
    optimize_steps: int = 50
    roi_margin_mm: float = 40.0
    run_ants_comparison: bool = False
    output_transform: object = None
    output_volume: object = None
    output_segmentation: object = None
    fixed_landmarks: object = None
    moving_landmarks: object = None
    grid_size: int = 128


def _name(node) -> str:
    return repr(node.GetName())


def _check_parent_transform(node, role: str) -> None:
    """Inputs are exported in their own coordinates: a transform above them would be silently lost."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None or (role == "moving volume" and parent.GetAttribute(CREATED_BY_ATTRIBUTE)):
        return
    raise ValueError(
        f"The {role} {_name(node)} is under the transform {_name(parent)}. Harden the transform "
        "(Data module: right-click the node > Harden transform) or remove it, then register again."
    )


def _check_liver(segmentation, name: str, role: str) -> None:
    if segmentation is not None and exchange.find_segment_id(segmentation, name) is None:
        names = ", ".join(map(repr, exchange.segment_names(segmentation))) or "none"
        raise ValueError(
            f"The {role} segmentation {_name(segmentation)} has no segment called {name!r} (names are "
            f"compared ignoring case). Its segments: {names}. Set the liver segment name to one of them."
        )


def _check_vessels(request: RegistrationRequest) -> None:
    segmentations = [("fixed", request.fixed_segmentation), ("moving", request.moving_segmentation)]
    if request.vessel_segment_names and any(s is None for _, s in segmentations):
        raise ValueError("Vessel segment names need both a fixed and a moving segmentation.")
    for name in request.vessel_segment_names:
        for role, segmentation in segmentations:
            if exchange.find_segment_id(segmentation, name) is None:
                raise ValueError(
                    f"The {role} segmentation {_name(segmentation)} has no segment called {name!r}; "
                    f"its segments: {', '.join(map(repr, exchange.segment_names(segmentation)))}. "
                    "List vessel segments present in both (comma-separated), or leave it empty."
                )


def _check_outputs(request: RegistrationRequest) -> None:
    inputs = (
        request.fixed_volume,
        request.moving_volume,
        request.fixed_segmentation,
        request.moving_segmentation,
    )
    input_ids = {n.GetID() for n in inputs if n is not None}
    for node, role in (
        (request.output_transform, "output transform"),
        (request.output_volume, "output volume"),
        (request.output_segmentation, "output segmentation"),
    ):
        if node is not None and node.GetID() in input_ids:
            raise ValueError(
                f"The {role} {_name(node)} is one of the inputs; choose another node or a new one."
            )
    transform = request.output_transform
    if transform is not None and transform.IsA("vtkMRMLLinearTransformNode"):
        raise ValueError(
            f"The output transform {_name(transform)} is a linear transform and cannot hold a deformation; "
            "choose a grid transform or 'Create new transform'."
        )


def validate(request: RegistrationRequest) -> None:
    """Raise ``ValueError`` with what to do if the request cannot run; nothing is started or changed."""
    if request.fixed_volume is None or request.moving_volume is None:
        raise ValueError("Select a fixed and a moving volume.")
    if request.fixed_volume is request.moving_volume:
        raise ValueError("The fixed and the moving volume must be different volumes.")
    if request.fixed_segmentation is not None and request.fixed_segmentation is request.moving_segmentation:
        raise ValueError("The fixed and the moving segmentation must be different segmentations.")
    if not 0 <= request.optimize_steps <= 500:
        raise ValueError(f"Optimisation steps must be between 0 and 500, got {request.optimize_steps}.")
    if not 0 <= request.roi_margin_mm <= 100:
        raise ValueError(f"The ROI margin must be between 0 and 100 mm, got {request.roi_margin_mm}.")
    if request.device not in DEVICES:
        raise ValueError(f"Device must be one of {', '.join(DEVICES)}, got {request.device!r}.")
    if request.grid_size < 16 or request.grid_size % 16:
        raise ValueError(f"The grid size must be a multiple of 16 (e.g. 64, 128), got {request.grid_size}.")
    if (request.fixed_landmarks is None) != (request.moving_landmarks is None):
        raise ValueError("Give both fixed and moving landmarks (corresponding points), or neither.")
    if not request.model.strip():
        raise ValueError("Choose a model ('default', 'none', a bundled model name or a model folder).")
    for node, role in (
        (request.fixed_volume, "fixed volume"),
        (request.moving_volume, "moving volume"),
        (request.fixed_segmentation, "fixed segmentation"),
        (request.moving_segmentation, "moving segmentation"),
    ):
        _check_parent_transform(node, role)
    _check_liver(request.fixed_segmentation, request.liver_segment_name, "fixed")
    _check_liver(request.moving_segmentation, request.liver_segment_name, "moving")
    _check_vessels(request)
    _check_outputs(request)
