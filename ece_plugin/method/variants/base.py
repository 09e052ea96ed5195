"""The hooks of a variant (a departure from the paper); see :mod:`ece_plugin.method.variants` for when each runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..keys import KeyRows


@dataclass
class CarriedKeys:
    """Keys ``[d_ff, m]`` a variant adds to what the sequential state carries for one layer. With ``decay`` 1 they
    join the edits' own keys (Cprev); below 1 they go to the state's fading moment, which each later commit
    multiplies by ``decay``."""

    keys: torch.Tensor
    decay: float = 1.0


class EditVariant:
    """One departure from the paper, built for one batch from the hparams; every hook is a no-op here.

    Subclasses set ``name`` (the registry key) and ``fields`` (the hparams fields only this variant reads; the
    core never reads them, ``tests/test_variants.py``), implement :meth:`is_active` and override the hooks they
    need. A variant holds what it computed during its batch (one instance per batch, so nothing leaks between
    calls).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hparams: Any) -> None:
        self.hparams = hparams

    @classmethod
    def is_active(cls, hparams: Any) -> bool:
        """Whether ``hparams`` switch this variant on (the paper's form: False)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- the hooks
    def start(self, model: nn.Module, n_edits_before: int) -> None:
        """Before step 1, once the batch's inputs were checked and the statistics loaded: ``model`` as the earlier
        batches left it, ``n_edits_before`` the edits its sequential state holds (0: the sequence starts here)."""

    def begin(self, model: nn.Module, key_rows: KeyRows) -> None:
        """After step 1: the batch's templated rows are encoded and the keys of the unedited model were read."""

    def before_write(self, model: nn.Module, w_out_name: str) -> None:
        """Step 5, just before layer ``w_out_name`` is written: ``model`` holds the writes of the layers before it."""

    def mom2_update_weight(self, lam: float) -> float:
        """After :meth:`start`: lambda, the weight of C0 in this batch's update, given the value the hparams and the
        variants before this one set; returned unchanged here."""
        return lam

    def gram_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """A term ``[|S|, |S|]`` (float64, on ``device``) added to the update's Gram matrix at the batch's neurons
        ``idx`` (S) of that layer, beside ``Cprev_SS``; None adds nothing."""
        return None

    def rhs_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """A term ``[d_model, |S|]`` (float64, on ``device``) added to the right-hand side ``R K_S^T`` of the update at
        that layer's neurons S, so ``Delta_S = (R K_S^T + term) A^{-1}``; None adds nothing."""
        return None

    def carried_keys(self, w_out_name: str) -> Optional[CarriedKeys]:
        """After step 5: keys the sequential state stages with the batch's own for that layer; None: none."""
        return None
