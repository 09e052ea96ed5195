"""A budget on how far each edited weight may drift from the unedited one (a departure, ``norm_anchor_budget``;
off in the paper's form).

Over a long sequence the edited ``W_out`` drift away from the unedited ``W0`` without bound: on the second scale
testbed ``||W - W0|| / ||W0||`` reaches 2-3 after 2,000 edits and 5.4 after 10,000 in the last edited layer, and
it does not level off. The literature ties the collapse of long sequences to that growth: ENCORE (Gupta et al.,
2025) penalises the norm of each update, NAS (Liu et al., 2026) rescales the solved value vectors to a norm taken
from the original model, since a grown layer makes the next targets larger and so the next update too.

Here the anchor is the unedited weight itself and the budget is relative to its norm. Before a batch reads
anything (keys, targets, residuals), every edited layer whose accumulated drift ``D = W - W0`` exceeds
``rho ||W0||_F`` (``rho = norm_anchor_budget``) is pulled back onto that ball, ``W <- W0 + D * rho ||W0|| /
||D||``: every earlier edit of the layer is scaled by the same factor, so the layer keeps the direction of all it
was taught. The batch then runs on that model, so its own edits are written in full against it (its targets and
residuals see the pull-back) and the carried keys keep the earlier edits as the pulled-back layer gives them.
After every batch ``||W - W0|| / ||W0|| <= rho`` plus that batch's one update: the growth is bounded by
construction, whatever the sequence's length.

``norm_anchor_ridge`` alpha > 0 is the soft form: each layer's update also minimises ``alpha ||W_new - W0||_F^2``
over the batch's neurons S, a ridge anchored at the unedited weight (ENCORE's norm constraint penalises the
update, ``alpha ||W_new - W||^2``, and lets the drift accumulate). With the drift ``D_S = (W - W0)_S`` before the
write and the update's Gram matrix ``A = lambda C0_SS + Cprev_SS + K_S K_S^T``, the update becomes

    Delta_S = (R K_S^T - alpha D_S) (A + alpha I)^{-1}

(``gram_term`` adds alpha I, ``rhs_term`` adds ``-alpha D_S``). Each batch thus also pulls back the part of the
drift that nothing protects: directions of the neuron space where the carried keys, the statistics C0 and the
batch's own keys have little energy, compared with alpha, give way; the earlier edits, held by Cprev, and the
model's general behaviour, held by C0, are kept. The drift then settles where the carried edits need it
instead of growing batch after batch.

The unedited weights are taken when the variant first sees the model with an empty sequential state (the first
batch of a sequence, or the first after a reset) and kept beside the model for the process (float32 copies of
the edited weights: 7.9 MB on the scale testbed). A sequence resumed in another process, with earlier edits
already in the model, has no ``W0`` to anchor to: the batch fails before anything changes, naming the cause.
The pull-back is not part of a batch's undo journal: a batch that fails after it leaves the layers pulled back
(a model nearer ``W0``, its carried state unchanged).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional

import torch
from torch import nn

from ..architecture import get_module, neuron_axis
from .base import EditVariant

logger = logging.getLogger(__name__)

#: model -> {W_out module name: its unedited weight (float32, on the weight's device)}
_UNEDITED: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


class NormAnchorError(RuntimeError):
    """The norm anchor cannot run: the model's unedited weights are unknown."""


def drift_ratio(weight: torch.Tensor, unedited: torch.Tensor) -> float:
    """``||W - W0||_F / ||W0||_F`` in float32."""
    w0 = unedited.to(device=weight.device, dtype=torch.float32)
    return float((weight.detach().float() - w0).norm() / w0.norm().clamp_min(1e-30))


@torch.no_grad()
def pull_back(weight: torch.Tensor, unedited: torch.Tensor, budget: float) -> float:
    """Scale ``weight``'s drift from ``unedited`` onto ``||W - W0|| <= budget ||W0||`` in place; returns the factor
    applied (1.0: within the budget, unchanged)."""
    w0 = unedited.to(device=weight.device, dtype=torch.float32)
    drift = weight.detach().float() - w0
    limit = budget * float(w0.norm())
    norm = float(drift.norm())
    if norm <= limit:
        return 1.0
    factor = limit / norm
    weight.copy_((w0 + drift * factor).to(weight.dtype))
    return factor


class NormAnchor(EditVariant):
    """``norm_anchor_budget`` rho > 0: before each batch, every edited layer's drift from its unedited weight is
    pulled back onto ``||W - W0||_F <= rho ||W0||_F`` (see the module docstring)."""

    name = "norm_anchor"
    fields = ("norm_anchor_budget", "norm_anchor_ridge")

    def __init__(self, hparams: Any) -> None:
        super().__init__(hparams)
        self.factors: dict[str, float] = {}  # the pull-back factor of each layer this batch (1.0: none)
        self.model: Optional[nn.Module] = None

    @classmethod
    def is_active(cls, hparams: Any) -> bool:
        return bool(hparams.norm_anchor_budget) or bool(hparams.norm_anchor_ridge)

    def start(self, model: nn.Module, n_edits_before: int) -> None:
        names = [self.hparams.rewrite_module_tmp.format(layer) for layer in self.hparams.layers]
        weights = {name: _weight(get_module(model, name)) for name in names}
        self.model = model
        if n_edits_before == 0:  # the sequence starts here: this model is the anchor
            _UNEDITED[model] = {name: w.detach().float().clone() for name, w in weights.items()}
            return
        unedited = _UNEDITED.get(model)
        if unedited is None or set(unedited) != set(names):
            raise NormAnchorError(
                f"norm_anchor_budget: the model already holds {n_edits_before} edits but its unedited weights "
                "were never seen in this process (a sequence resumed elsewhere, or other layers); start the "
                "sequence from the unedited model, or set norm_anchor_budget: 0"
            )
        self.model = model
        budget = float(self.hparams.norm_anchor_budget)
        if not budget:
            return
        for name, w in weights.items():
            self.factors[name] = pull_back(w, unedited[name], budget)
        pulled = {n: f for n, f in self.factors.items() if f < 1.0}
        if pulled:
            logger.info("norm anchor: drift pulled back onto %.2f ||W0|| in %s", budget,
                        ", ".join(f"{n} (x{f:.3f})" for n, f in pulled.items()))

    def gram_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        alpha = float(self.hparams.norm_anchor_ridge)
        if not alpha:
            return None
        return alpha * torch.eye(idx.numel(), dtype=torch.float64, device=device)

    def rhs_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        alpha = float(self.hparams.norm_anchor_ridge)
        if not alpha:
            return None
        assert self.model is not None, "start() runs first"
        module = get_module(self.model, w_out_name)
        weight = _weight(module)
        unedited = _UNEDITED[self.model][w_out_name].to(weight.device)
        axis = neuron_axis(module)  # W_out's input dimension: 1 for nn.Linear, 0 for GPT-2's Conv1D
        ids = idx.to(weight.device)
        drift = weight.detach().index_select(axis, ids).double() - unedited.index_select(axis, ids).double()
        drift = drift if axis == 1 else drift.t()  # [d_model, |S|]
        return (-alpha * drift).to(device)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight
