"""The six training designs of the DDMR paper and how each turns network outputs into one loss.

=========  ===================  ==============  =========================================
design     similarity terms     segmentation    combination
=========  ===================  ==============  =========================================
BL-N       NCC                  -               NCC + lambda R
BL-NS      NCC, SSIM            -               NCC + SSIM + lambda R
SG-ND      NCC                  Dice            NCC + Dice + lambda R
SG-NSD     NCC, SSIM            Dice            NCC + SSIM + Dice + lambda R
UW-NSD     NCC, SSIM            Dice            uncertainty weighting of {NCC, SSIM, Dice} + w_R R
UW-NSDH    NCC, SSIM            Dice, HD        uncertainty weighting of {NCC, SSIM, Dice, HD} + w_R R
=========  ===================  ==============  =========================================

(R: the flow regulariser; reference section 3.8.) Similarity terms compare the fixed image with the
warped moving image. Segmentation-guided terms warp the moving one-hot labels with the SAME predicted
flow, trilinearly, so the warped labels are soft and differentiable, and compare them with the fixed
labels; images and labels are never warped by different fields.

The table is data and imports nothing heavy, so a config can name and check a design without loading
TensorFlow; :func:`build_objective` imports the TensorFlow losses when a run actually starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dareg.training.config import LossesSection


@dataclass(frozen=True)
class Design:
    """One design: the names of its data terms and whether uncertainty weighting combines them."""

    name: str
    similarity: tuple[str, ...]
    segmentation: tuple[str, ...] = ()
    uncertainty_weighting: bool = False

    @property
    def terms(self) -> tuple[str, ...]:
        """Data terms in the order they are combined (and logged)."""
        return self.similarity + self.segmentation

    @property
    def needs_labels(self) -> bool:
        """Whether training pairs must carry labels (segmentation-guided designs)."""
        return bool(self.segmentation)


DESIGNS: dict[str, Design] = {
    design.name: design
    for design in (
        Design("BL-N", ("ncc",)),
        Design("BL-NS", ("ncc", "ssim")),
        Design("SG-ND", ("ncc",), ("dice",)),
        Design("SG-NSD", ("ncc", "ssim"), ("dice",)),
        Design("UW-NSD", ("ncc", "ssim"), ("dice",), uncertainty_weighting=True),
        Design("UW-NSDH", ("ncc", "ssim"), ("dice", "hd"), uncertainty_weighting=True),
    )
}


class Objective:
    """A design's loss on one batch: ``objective(fixed, warped, flow, fixed_labels, moving_labels)``.

    Returns ``(total, terms)``: the scalar to minimise and ``{"ncc": ..., "regularizer": ...}``, every
    term unweighted (for logging). Build it with :func:`build_objective`; the uncertainty-weighting
    layer, if any, holds the only trainable variables (``trainable_variables``).
    """

    def __init__(
        self,
        design: Design,
        term_losses: dict[str, Callable],
        regularizer: Callable,
        regularizer_weight: float,
        warp_labels: Callable,
        weighting=None,
    ) -> None:
        self.design = design
        self.term_losses = term_losses
        self.regularizer = regularizer
        self.regularizer_weight = regularizer_weight
        self.warp_labels = warp_labels
        self.weighting = weighting

    @property
    def trainable_variables(self) -> list:
        return list(self.weighting.trainable_variables) if self.weighting is not None else []

    @property
    def variables(self) -> list:
        """All of the objective's state (incl. a fixed regulariser weight), for checkpoints."""
        return list(self.weighting.weights) if self.weighting is not None else []

    def terms(self, fixed, warped, flow, fixed_labels=None, moving_labels=None) -> dict:
        """Every data term and the regulariser, unweighted."""
        values = {name: self.term_losses[name](fixed, warped) for name in self.design.similarity}
        if self.design.needs_labels:
            warped_labels = self.warp_labels(moving_labels, flow)
            for name in self.design.segmentation:
                values[name] = self.term_losses[name](fixed_labels, warped_labels)
        values["regularizer"] = self.regularizer(None, flow)
        return values

    def combine(self, terms: dict):
        """The training loss: plain sum + lambda R, or the uncertainty-weighted sum (weights move)."""
        data = [terms[name] for name in self.design.terms]
        if self.weighting is not None:
            return self.weighting(data, terms["regularizer"])
        return sum(data) + self.regularizer_weight * terms["regularizer"]

    def monitor(self, terms: dict):
        """The validation criterion: the design's terms with FIXED weights.

        BL/SG: the training loss itself. UW: the weights the layer starts from (1/n each and the
        initial regulariser weight), because a sum weighted by the moving learned weights is not
        comparable from one epoch to the next (the original monitored exactly that).
        """
        if self.weighting is None:
            return self.combine(terms)
        data = sum(terms[name] for name in self.design.terms) / len(self.design.terms)
        return data + self.weighting.regularizer_weight * terms["regularizer"]

    def weights(self) -> dict:
        """Current uncertainty weights ``{"weight_ncc": ..., "weight_regularizer": ...}``; {} without UW."""
        return self.weighting.current_weights() if self.weighting is not None else {}

    def __call__(self, fixed, warped, flow, fixed_labels=None, moving_labels=None):
        terms = self.terms(fixed, warped, flow, fixed_labels, moving_labels)
        return self.combine(terms), terms


def build_objective(design_name: str, options: LossesSection) -> Objective:
    """The :class:`Objective` of a design; call inside a ``tf.distribute`` scope to distribute UW weights.

    Parameters
    ----------
    design_name : a key of :data:`DESIGNS`.
    options : the config's ``losses`` section (regulariser, NCC/SSIM/Dice/HD variants, UW form).
    """
    # TensorFlow is imported only here so that the design table (and configs) stay TensorFlow-free.
    import functools

    from dareg.models.transformer import warp
    from dareg.training import losses
    from dareg.training.uncertainty import UncertaintyWeighting

    design = DESIGNS[design_name]
    term_losses = {
        "ncc": losses.GlobalNCC(quirk=options.ncc_quirk),
        "ssim": losses.SSIM3D(patch_size=options.ssim_patch),
        "dice": losses.SoftDice(variant=options.dice_variant),
        "hd": losses.HausdorffErosion(threshold=options.hausdorff_threshold),
    }
    regularizer = {"gradient_l2": losses.GradientL2, "bending_energy": losses.BendingEnergy}[
        options.regularizer
    ]
    weighting = None
    if design.uncertainty_weighting:
        weighting = UncertaintyWeighting(
            design.terms,
            form=options.uncertainty_form,
            regularizer=options.uncertainty_regularizer,
            regularizer_weight=options.regularizer_weight,
            name="uncertainty_weighting",
        )
    return Objective(
        design,
        {name: term_losses[name] for name in design.terms},
        regularizer(),
        options.regularizer_weight,
        functools.partial(warp, interpolation="linear"),
        weighting,
    )
