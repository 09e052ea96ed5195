"""Departures from the paper, kept out of the method's core behind one mechanism (as PEFT keeps DoRA out of LoRA).

The editor (``editor.py``) runs the paper's steps and calls the active variants' hooks at fixed points only; with
no variant active (every hparams at its paper value) a batch is exactly the paper's. A variant is an
:class:`EditVariant` subclass built for one batch from the hparams. The hook points, in the order they run:

* ``start(model, n_edits_before)``: before step 1 (the batch's inputs checked, the statistics loaded), on the
  model as the earlier batches left it;
* ``mom2_update_weight(lam)``: right after ``start``: lambda, the weight of C0 in the batch's update, each variant
  given the value the ones before it returned;
* ``begin(model, key_rows)``: after the keys of the unedited model were read (step 1);
* ``before_write(model, w_out_name)``: in the update (step 5), just before a layer is written, the model holding
  the writes of the layers before it;
* ``gram_term(w_out_name, idx, device)``: the update's Gram matrix at the batch's neurons S becomes
  ``lambda C0_SS + Cprev_SS + sum_variants term + K_S K_S^T``;
* ``rhs_term(w_out_name, idx, device)``: the update's right-hand side becomes ``R K_S^T + sum_variants term``;
* ``carried_keys(w_out_name)``: after the batch is written, keys staged into the sequential state beside the
  batch's own (:class:`CarriedKeys`: at full weight, or fading by a decay; the state holds one fading moment, so
  the active variants must agree on its decay).

Adding a variant: one module here with an :class:`EditVariant` subclass, its hparams fields (default: the
paper's form) and their checks in ``hparams.py``, and one entry in :data:`VARIANTS`. A new kind of departure that
needs another point of the batch adds one no-op hook to :class:`EditVariant` and one call in the editor.
"""

from __future__ import annotations

from typing import Any

from .balanced_lambda import BalancedLambda
from .base import CarriedKeys, EditVariant
from .norm_anchor import NormAnchor
from .prompt_keys import PromptKeys

__all__ = ["VARIANTS", "CarriedKeys", "EditVariant", "active_variants"]

#: Every variant the editor knows, by name, in the order their hooks run.
VARIANTS: dict[str, type[EditVariant]] = {
    NormAnchor.name: NormAnchor,  # first: the batch runs on the pulled-back model
    PromptKeys.name: PromptKeys,
    BalancedLambda.name: BalancedLambda,
}


def active_variants(hparams: Any) -> list[EditVariant]:
    """The variants ``hparams`` switch on, built for one batch (none in the paper's form)."""
    return [cls(hparams) for cls in VARIANTS.values() if cls.is_active(hparams)]
