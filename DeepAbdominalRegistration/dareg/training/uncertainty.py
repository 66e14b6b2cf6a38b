"""Uncertainty weighting: learn the weights that combine the data loss terms during training.

The DDMR "UW" designs (reference 3.7) combine n data terms (similarity: NCC, SSIM; segmentation: Dice,
Hausdorff) with learnable weights instead of hand-tuned ones, plus the flow regulariser:

    total = sum_i w_i L_i + w_R R

``form="softmax"`` (default, the original): ``w = softmax(s)``, so the weights are positive and sum to 1
by construction, initialised equal (s = 0, w_i = 1/n). The gradient ``dtotal/ds_j = w_j (L_j - total_data)``
moves weight toward the terms that are currently smallest.

``form="kendall"``: the log-variance form of Kendall, Gal and Cipolla (CVPR 2018),
``sum_i exp(-s_i) L_i + s_i``: each weight settles at ``1 / L_i`` (homoscedastic uncertainty), the
``+ s_i`` penalty stopping the weights from collapsing to 0. Initialised at ``s_i = log n`` so that
both forms start from the same weights 1/n.

The regulariser weight ``w_R = exp(r)`` lives in log space (always positive), initial value 5e-3.

What the original did wrong, and what this layer does instead (reference 3.7 and 8.7):

- Regulariser decay. The original trains ``r`` with no penalty: ``dtotal/dr = exp(r) R > 0`` at every
  step, so Adam lowers ``r`` by about one learning rate per step and the regularisation fades away
  (after 1e5 steps at lr 1e-4 it is e^-10 times weaker). Any weight minimised jointly with the very term
  it scales can only shrink. Here the weight is held at its initial value by default
  (``regularizer="fixed"``: a non-trainable variable, still reported); ``regularizer="learned"``
  reproduces the original's decaying behaviour.
- Wiring bug. The original layer took the network outputs and computed the losses itself, and
  replicated the predicted segmentations ``len(similarity)`` times instead of ``len(segmentation)``
  (working only while there are at least as many similarity as segmentation terms). This layer takes
  the already computed loss values, one per named term, so there is nothing to replicate: the
  caller pairs each loss with its own inputs.

The current weights are exposed for logging by :meth:`UncertaintyWeighting.current_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from dareg.training.losses import check_option

FORMS = ("softmax", "kendall")
REGULARIZER_MODES = ("fixed", "learned")


class UncertaintyWeighting(keras.layers.Layer):
    """Combine named data loss terms and a regulariser with learnable weights.

    Parameters
    ----------
    term_names : names of the n data terms, in the order their values are passed (e.g.
        ``("ncc", "ssim", "dice")``); used as logging keys.
    form : "softmax" (the original: weights sum to 1) or "kendall" (log-variance form).
    regularizer : "fixed" (default: the regulariser weight keeps its initial value) or "learned"
        (the original: trainable with no penalty, hence decaying; see the module docstring).
    regularizer_weight : initial regulariser weight (the original's 5e-3).

    Call as ``layer(data_losses, regularization)``: a sequence of n scalar (or per-sample) loss
    values and the regulariser value; each is averaged to a scalar. Returns the weighted total.
    """

    def __init__(
        self,
        term_names: Sequence[str],
        *,
        form: str = "softmax",
        regularizer: str = "fixed",
        regularizer_weight: float = 5e-3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_option("form", form, FORMS)
        check_option("regularizer", regularizer, REGULARIZER_MODES)
        if not term_names or len(set(term_names)) != len(term_names):
            raise ValueError(f"term_names must be non-empty and unique, got {term_names!r}")
        if not regularizer_weight > 0:
            raise ValueError(f"regularizer_weight must be positive, got {regularizer_weight!r}")
        self.term_names = tuple(term_names)
        self.form = form
        self.regularizer = regularizer
        self.regularizer_weight = float(regularizer_weight)
        count = len(self.term_names)
        self.log_weights = self.add_weight(
            name="data_log_weights",
            shape=(count,),
            initializer=keras.initializers.Constant(0.0 if form == "softmax" else math.log(count)),
        )
        self.regularizer_log_weight = self.add_weight(
            name="regularizer_log_weight",
            shape=(),
            initializer=keras.initializers.Constant(math.log(self.regularizer_weight)),
            trainable=regularizer == "learned",
        )

    def data_weights(self):
        """Current weights of the data terms, shape (n,)."""
        if self.form == "softmax":
            return ops.softmax(self.log_weights)
        return ops.exp(-self.log_weights)

    def current_weights(self) -> dict:
        """``{"weight_<term>": w_i, ..., "weight_regularizer": w_R}`` as scalar tensors, for logging."""
        weights = self.data_weights()
        named = {f"weight_{name}": weights[i] for i, name in enumerate(self.term_names)}
        return {**named, "weight_regularizer": ops.exp(self.regularizer_log_weight)}

    def call(self, data_losses, regularization):
        if len(data_losses) != len(self.term_names):
            raise ValueError(
                f"expected {len(self.term_names)} data losses {self.term_names}, got {len(data_losses)}"
            )
        losses = ops.stack([ops.mean(ops.convert_to_tensor(loss, "float32")) for loss in data_losses])
        total = ops.sum(self.data_weights() * losses)
        if self.form == "kendall":
            total = total + ops.sum(self.log_weights)
        regularization = ops.mean(ops.convert_to_tensor(regularization, "float32"))
        return total + ops.exp(self.regularizer_log_weight) * regularization

    def compute_output_shape(self, *args):
        return ()

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "term_names": list(self.term_names),
            "form": self.form,
            "regularizer": self.regularizer,
            "regularizer_weight": self.regularizer_weight,
        }
