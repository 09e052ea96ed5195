"""GRACE (Hartvigsen et al., NeurIPS 2023) from EasyEdit main, as the studies run it.

EasyEdit's GRACE wraps the module its ``inner_params`` names in a ``GRACEAdapter``: a codebook of keys (the
module's input at the edited prompt's last token), deferral radii and trained values. Where a forward's key falls
within a radius, the value replaces the module's output at that token. Its weights never change: the codebook is
the edit. Edits go through EasyEdit's own ``BaseEditor.edit``, one request per call, as EasyEdit runs GRACE.

What the studies add around it (GRACE's computation is untouched, but for the first point):

* **The value of a widened key trains.** EasyEdit's GRACE freezes every parameter of the model at each call, the
  codebook's values too. An edit whose key falls within the radius of a key with the same label (GRACE then widens
  that radius and trains that key's value) found them frozen and failed with ``element 0 of tensors does not
  require grad``: a 2,000-edit CounterFact run stopped there after 1,600 edits. During an edit the values are
  made trainable again before each forward, as GRACE's design says they are.

* **Where a forward reads.** The adapter reads one position of every row of a forward (``key_id``) and keeps it
  from call to call, so in a padded batch it reads a different token of each prompt. Before every forward outside
  an edit, :meth:`GraceMethod.prompt_end_hook` has set that position: the scorer
  (:func:`ece_plugin.evaluation.scoring.score_continuations`) groups rows whose prompts end together and names the
  position, which is the last prompt token, where GRACE's own edit put the key. Elsewhere the forward's last
  position is read, as GRACE's ``generate`` does (left-padded generation ends every prompt there; in a
  teacher-forced perplexity window it predicts no scored token).
* **Undo.** :meth:`GraceMethod.reset` puts the wrapped module back.
* **Checkpoints.** :meth:`GraceMethod.codebook` and :meth:`GraceMethod.load_codebook`: keys, values and radii as
  tensors; the labels and edit ids that decide GRACE's conflicts as JSON (the edit ids flattened: GRACE nests them
  one level deeper per key).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .adapters import AdapterMethod
from .common import StudyError

logger = logging.getLogger(__name__)

CODEBOOK_TENSORS = ("keys", "values", "epsilons")


def _flat_edit_ids(nested: Any) -> list[Any]:
    """GRACE's ``edit_ids`` as a flat list: each new key nests the list one level deeper (``[ids] + [new]``), too
    deep for JSON after about a thousand keys."""
    flat: list[Any] = []
    while isinstance(nested, list) and len(nested) == 2 and isinstance(nested[0], list):
        flat.append(nested[1])
        nested = nested[0]
    return (list(nested) if isinstance(nested, list) else [nested]) + flat[::-1]


def _nested_edit_ids(flat: list[Any]) -> Any:
    """The inverse of :func:`_flat_edit_ids`: the nesting GRACE builds key by key."""
    if not flat:
        return []
    nested: Any = [flat[0]]
    for edit_id in flat[1:]:
        nested = [nested, edit_id]
    return nested


@dataclass
class GraceMethod(AdapterMethod):
    """EasyEdit's GRACE through ``BaseEditor.edit``, with the position it reads set per forward."""

    ALG: ClassVar[str] = "GRACE"
    ADAPTER: ClassVar[str] = "GRACEAdapter"
    side_state_name: ClassVar[str] = "codebook"

    _prompt_end: Optional[int] = None
    _hooked: Optional[torch.nn.Module] = None
    _handle: Any = None

    # -- where a forward reads
    def prompt_end_hook(self, position: Optional[int]) -> None:
        """The position (0-based) at which the prompts of the next forwards end; None: each forward's last."""
        self._prompt_end = position

    def _set_position(self, module: Any, args: Any) -> None:
        if not module.training:  # during an edit GRACE sets key_id itself
            module.key_id = -1 if self._prompt_end is None else int(self._prompt_end)
        elif isinstance(module.__dict__.get("_parameters", {}).get("values"), torch.nn.Parameter):
            # EasyEdit's GRACE freezes every parameter of the model at each call, its codebook's values too; an
            # edit that adds a key makes new values that train, but one whose key falls within the radius of a
            # key with the same label (GRACE then widens that radius and trains its value) found them frozen and
            # failed (`element 0 of tensors does not require grad`). Its value trains, as GRACE's design says.
            module.values.requires_grad_(True)

    def _hook(self, model: torch.nn.Module) -> None:
        adapter = self.adapter(model)
        if adapter is None or adapter is self._hooked:
            return
        self._unhook()
        self._handle = adapter.register_forward_pre_hook(self._set_position)
        self._hooked = adapter

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._hooked = None, None

    # -- EditMethod
    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Any) -> Any:
        self.ensure_adapter(model)  # wrapped before GRACE's first edit, so the hook is there from its first forward
        self._hook(model)
        return super().edit_batch(model, tok, requests)

    def reset(self, model: torch.nn.Module) -> None:
        """Forget every edit: the wrapped module goes back in the adapter's place."""
        self.unwrap(model)
        self._unhook()
        self._prompt_end = None
        super().reset(model)

    # -- checkpoints
    def codebook(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the adapter's keys, values and radii, and its labels, edit ids and last step
        (JSON-safe); empty before the first edit."""
        adapter = self.adapter(model)
        if adapter is None or "keys" not in adapter.__dict__:
            return {}, {}
        tensors = {name: getattr(adapter, name).detach().cpu().contiguous().clone() for name in CODEBOOK_TENSORS}
        meta = {"key_labels": [label.detach().cpu().tolist() for label in adapter.key_labels],
                "edit_ids": _flat_edit_ids(adapter.edit_ids), "iter": int(adapter.iter)}
        return tensors, meta

    def codebook_nbytes(self, model: torch.nn.Module) -> int:
        tensors, _ = self.codebook(model)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def load_codebook(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Wrap the module as GRACE's first edit does and give the adapter this codebook (nothing when empty)."""
        if not tensors:
            return
        missing = [name for name in CODEBOOK_TENSORS if name not in tensors]
        if missing or not isinstance(meta.get("key_labels"), list) or "edit_ids" not in meta:
            raise StudyError(f"GRACE codebook lacks {missing or 'its labels or edit ids'}")
        adapter = self.ensure_adapter(model)
        device = adapter.weight.device
        adapter.keys = tensors["keys"].to(device)
        adapter.values = torch.nn.Parameter(tensors["values"].to(device), requires_grad=True)
        adapter.epsilons = tensors["epsilons"].to(device)
        adapter.key_labels = [torch.tensor(label, device=device) for label in meta["key_labels"]]
        adapter.edit_ids = _nested_edit_ids(_flat_edit_ids(meta["edit_ids"]))  # flat, or as GRACE nests them
        adapter.iter = int(meta.get("iter", 0))  # its forward reads the last edit's step count, even outside edits
        self._hook(model)

    # the checkpoint's names for them (as WISE's)
    def side_state(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.codebook(model)

    def side_state_nbytes(self, model: torch.nn.Module) -> int:
        return self.codebook_nbytes(model)

    def load_side_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.load_codebook(model, tensors, meta)
