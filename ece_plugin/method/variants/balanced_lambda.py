"""lambda that keeps pace with the carried keys (a departure, ``mom2_update_weight_growth``; off in the paper's form).

The update's Gram matrix at a layer's neurons S is ``lambda C0_SS + Cprev_SS + K_S K_S^T``: ``C0`` (the second
moment of the keys of ordinary text, a mean over tokens) protects what the model knew, ``Cprev`` (a sum over the
keys of every earlier edit) protects the earlier edits. ``lambda C0`` weighs like ``lambda`` average keys, while
``Cprev`` gains one key per edit: over a sequence the protection of the model's own knowledge falls behind the
protection of the edits, and later batches are written into directions that ordinary text, and the facts never
edited, use. On the scale testbed the neighbourhood score of a batch scored right after its own edit falls from
about 96 over the first 500 edits to about 77 over the last 500 of 2,000 (docs/sequential.md).

With ``mom2_update_weight_growth`` beta > 0 the batch that follows n carried edits is written with

    lambda_n = lambda + beta * n

so that, at beta 1, C0 keeps the weight of ``lambda`` average keys beyond the keys carried. The first batch of a
sequence is the paper's (n = 0). Nothing else changes: the same C0, carried keys and targets.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import EditVariant


class BalancedLambda(EditVariant):
    """``mom2_update_weight_growth`` beta > 0: lambda grows by beta for every edit the sequential state carries."""

    name = "balanced_lambda"
    fields = ("mom2_update_weight_growth",)

    def __init__(self, hparams: Any) -> None:
        super().__init__(hparams)
        self.n_edits_before = 0

    @classmethod
    def is_active(cls, hparams: Any) -> bool:
        return bool(hparams.mom2_update_weight_growth)

    def start(self, model: nn.Module, n_edits_before: int) -> None:
        self.n_edits_before = n_edits_before

    def mom2_update_weight(self, lam: float) -> float:
        return lam + float(self.hparams.mom2_update_weight_growth) * self.n_edits_before
