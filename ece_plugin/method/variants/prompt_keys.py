"""The keys at the other tokens of the edit prompts (a departure, ``prompt_keys_weight``; off in the paper's form).

An edit is written at one token of its prompt, the fact token (the subject's last). The update also changes what
W_out gives at every other token whose key overlaps the written neurons, and the tokens after the subject (the
relation, e.g. ", a citizen of") are where the prediction is read: for this edit, for later paraphrases and
neighbours of the same relation, and for every earlier edit of that relation. ``benchmarks/edit_decay.py``
measured that this is where earlier edits are lost on the scale testbeds (putting the subject's z-layer output
back does not restore them).

With ``prompt_keys_weight`` mu > 0 the update keeps W_out's output at those keys: ``mu K_P K_P^T`` joins the
covariance of the least squares (``K_P``: W_out's input at every token of each plain rewrite prompt but the fact
token, read on the model as it is when that layer is written), and (``carry_prompt_keys``, default) the keys are carried
with the batch's own, so later batches keep them too.

Carried at full weight, the prompt keys of every earlier batch fill the covariance (some 600 keys a batch on the
scale testbed against d_ff = 2,560), and later edits are written less and less. ``prompt_keys_decay`` gamma < 1 keeps
them in a moment of their own that fades, ``P <- gamma P + mu K_P K_P^T`` at each commit (``state.py``), so their
total weight stays below ``mu / (1 - gamma)`` batches while the edits' own keys never fade.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..architecture import StopForward, get_module
from ..keys import EncodedRows, KeyRows
from .base import CarriedKeys, EditVariant


class PromptKeys(EditVariant):
    """``prompt_keys_weight`` mu > 0: ``mu K_P K_P^T`` joins the Gram matrix of each layer's update and (with
    ``carry_prompt_keys``) the carried keys, fading by ``prompt_keys_decay`` when that is below 1."""

    name = "prompt_keys"
    fields = ("prompt_keys_weight", "carry_prompt_keys", "prompt_keys_decay")

    def __init__(self, hparams: Any) -> None:
        super().__init__(hparams)
        self.rows: Optional[EncodedRows] = None
        self.scaled: dict[str, torch.Tensor] = {}  # sqrt(mu) K_P per layer, [m, d_ff]

    @classmethod
    def is_active(cls, hparams: Any) -> bool:
        return bool(hparams.prompt_keys_weight)

    def begin(self, model: nn.Module, key_rows: KeyRows) -> None:
        rows = key_rows.rows
        self.rows = rows.select(key_rows.plain_rows.to(rows.input_ids.device))

    def before_write(self, model: nn.Module, w_out_name: str) -> None:
        assert self.rows is not None, "begin() runs first"
        self.scaled[w_out_name] = prompt_keys(model, self.rows, w_out_name) * self.hparams.prompt_keys_weight**0.5

    def gram_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        kp = self.scaled[w_out_name].to(device).index_select(1, idx.to(device)).double()
        return kp.t() @ kp

    def carried_keys(self, w_out_name: str) -> Optional[CarriedKeys]:
        if not self.hparams.carry_prompt_keys:
            return None
        return CarriedKeys(self.scaled[w_out_name].t(), float(self.hparams.prompt_keys_decay))


@torch.no_grad()
def prompt_keys(model: nn.Module, rows: EncodedRows, w_out_name: str, chunk_rows: int = 64) -> torch.Tensor:
    """W_out's input ``[m, d_ff]`` (float32) at every real token of ``rows`` except each row's fact token."""
    parts: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}

    def pre_hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        keep = current["mask"].to(x.device)
        parts.append(x[keep].detach().float())
        raise StopForward

    handle = get_module(model, w_out_name).register_forward_pre_hook(pre_hook)
    try:
        for start in range(0, rows.n_rows, chunk_rows):
            part = rows.select(torch.arange(start, min(start + chunk_rows, rows.n_rows)))
            mask = part.attention_mask.bool().clone()
            mask[torch.arange(part.n_rows, device=mask.device), part.lookup] = False
            current["mask"] = mask
            try:
                model(input_ids=part.input_ids, attention_mask=part.attention_mask, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if not parts:
        raise RuntimeError(f"{w_out_name} did not run in the forward pass (check the module templates)")
    return torch.cat(parts, 0)
