"""WISE (Wang et al., NeurIPS 2024) from EasyEdit main, as the studies run it.

EasyEdit's WISE wraps the module its ``inner_params`` names in a ``WISEAdapter``: the original weights (main
memory) and a side copy that each edit trains on a random share of its entries (``mask_ratio``). Every
``save_freq`` edits the side copy is filed as a side memory and a new one starts; every ``merge_freq`` edits the
last side memories are merged (``merge_alg``). A forward goes to the memory whose output differs most from the
main memory's, past a threshold learnt during the edits (``act_ratio``), or to the main memory. Edits go through
EasyEdit's own ``BaseEditor.edit``, one request per call, as EasyEdit runs WISE. WISE's computation is untouched.

What the studies add around it:

* **One adapter for the whole sequence.** EasyEdit's text WISE builds a new adapter on the original module at
  every call unless its hparams say ``sequential_edit`` (only the multimodal hparams class declares it), so each
  edit would forget the ones before. :meth:`WiseMethod.load` sets it.
* **One decision per prompt.** The adapter routes a whole forward by one distance, averaged over the batch and
  over every position, padding included; with more than one side memory a batch of several rows fails
  (``dist > min_dist`` on a vector). EasyEdit scores WISE one unpadded prompt at a time. In the studies' batched
  scoring each row goes through the adapter alone, at its own positions (the attention mask of the forward),
  which gives each prompt the decision it gets alone: :meth:`WiseMethod._rowwise_forward`.
* **loc_prompts.** Each edit needs one unrelated prompt that its side memory must leave to the main memory. They
  are sentences of the model's statistics corpus (the text ECE's C0 is computed from), in a fixed shuffled order,
  skipping any that holds the edit's subject; never a prompt that is scored.
* **WISE-Retrieve only.** With ``retrieve: false`` WISE merges its side memories inside its wrapper's ``__call__``,
  which the studies' scoring (through the model, as for every method) bypasses, so that form is refused.
* **Undo.** :meth:`WiseMethod.reset` puts the wrapped module back and empties WISE's module-global edit history.
* **Checkpoints.** :meth:`WiseMethod.side_state` and :meth:`WiseMethod.load_side_state`: the side copy, the side
  memories and the gradient mask as tensors; the edit count, merge count, activation thresholds, the position in
  the loc prompts as JSON (``lifelong`` seeds numpy's draws, which WISE's masks come from, per batch). WISE's
  edit history (the inputs of earlier edits) is read only by its replay (``replay: false`` here) and is not saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from .adapters import AdapterMethod
from .baselines import BatchOutcome
from .common import StudyError

logger = logging.getLogger(__name__)

#: Sentences of the corpus that may serve as loc prompts: this many words.
LOC_WORDS = (4, 24)
LOC_SEED = 0
_MEAN_ACT_FIELDS = ("avg", "count", "sum", "min_a")


def corpus_sentences(paths: Sequence[Path], seed: int = LOC_SEED) -> list[str]:
    """The sentences of the text files ``paths`` with :data:`LOC_WORDS` words, each once, in a shuffled order
    fixed by ``seed``."""
    seen: dict[str, None] = {}
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            sentence = " ".join(sentence.split())
            if LOC_WORDS[0] <= len(sentence.split()) <= LOC_WORDS[1]:
                seen.setdefault(sentence, None)
    pool = list(seen)
    random.Random(seed).shuffle(pool)
    return pool


def _mean_act_state(act: Any) -> dict[str, float]:
    return {name: float(getattr(act, name)) for name in _MEAN_ACT_FIELDS}


@dataclass
class WiseMethod(AdapterMethod):
    """EasyEdit's WISE through ``BaseEditor.edit``: one adapter for the sequence, one routing decision per
    scored prompt, loc prompts from the statistics corpus."""

    ALG: ClassVar[str] = "WISE"
    ADAPTER: ClassVar[str] = "WISEAdapter"
    side_state_name: ClassVar[str] = "side_memory"

    loc_prompts: Optional[list[str]] = None  # None: sentences of loc_corpus
    loc_corpus: Any = None  # a StatsSpec (the ECE hparams' statistics corpus), resolved against the model
    _loc_next: int = 0
    _mask: Optional[torch.Tensor] = None
    _adapter: Any = None
    _handle: Any = None
    _pool_cache: Optional[list[str]] = field(default=None, repr=False)

    # -- hparams and loc prompts
    def load(self, model: Optional[torch.nn.Module] = None) -> Any:
        hparams = super().load(model)
        hparams.sequential_edit = True  # one adapter for the whole sequence (see the module docstring)
        return hparams

    def _pool(self, model: torch.nn.Module) -> list[str]:
        if self._pool_cache is None:
            if self.loc_prompts is not None:
                self._pool_cache = list(self.loc_prompts)
            else:
                from ...method import statistics

                corpus = statistics.local_corpus(self.loc_corpus, model) if self.loc_corpus is not None else None
                files = [Path(f) for f in corpus.files] if corpus is not None else []
                files = [f for f in files if f.is_file()]
                self._pool_cache = corpus_sentences(files) if files else []
        return self._pool_cache

    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        ok, reason = super().availability(model)
        if ok and not bool(getattr(self.load(model), "retrieve", False)):
            return False, ("WISE with retrieve: false merges its side memories when its wrapper is called, which the "
                           "studies' scoring (through the model) bypasses; use retrieve: true (WISE-Retrieve)")
        if ok and not self._pool(model):
            return False, ("WISE needs loc_prompts (unrelated prompts its side memory must leave alone): give them, "
                           "or a statistics corpus that can be read here (mom2_dataset / mom2_corpus of the ECE hparams)")
        return ok, reason

    def next_loc_prompts(self, model: torch.nn.Module, requests: Sequence[dict[str, Any]]) -> list[str]:
        """One loc prompt per request, the next in the pool that does not hold the request's subject."""
        pool = self._pool(model)
        chosen = []
        for request in requests:
            subject = str(request.get("subject") or "")
            for _ in range(len(pool)):
                sentence = pool[self._loc_next % len(pool)]
                self._loc_next += 1
                if not subject or subject not in sentence:
                    break
            chosen.append(sentence)
        return chosen

    def base_editor_extra(self, model: torch.nn.Module, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"loc_prompts": self.next_loc_prompts(model, requests)}

    # -- the adapter and where its forwards route
    def _capture_mask(self, module: Any, args: Any, kwargs: Any) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _rowwise_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's forward, one row at a time at the row's own positions, outside edits."""
        adapter = self._adapter
        forward = type(adapter).forward
        if adapter.editing or x.dim() != 3:
            return forward(adapter, x)
        mask = self._mask
        same = mask is not None and tuple(mask.shape) == tuple(x.shape[:2])
        if x.shape[0] == 1 and (not same or bool(mask.all())):  # type: ignore[union-attr]
            return forward(adapter, x)
        rows = []
        for i in range(x.shape[0]):
            if same and not bool(mask[i].all()):  # type: ignore[index]
                keep = mask[i].bool()  # type: ignore[index]
                out = torch.zeros(x.shape[1], adapter.value_shape, dtype=x.dtype, device=x.device)
                out[keep] = forward(adapter, x[i:i + 1, keep])[0].to(out.dtype)
                rows.append(out)
            else:
                rows.append(forward(adapter, x[i:i + 1])[0])
        return torch.stack(rows)

    def _hook(self, model: torch.nn.Module) -> None:
        adapter = self.adapter(model)
        if adapter is None or adapter is self._adapter:
            return
        self._unhook()
        self._adapter = adapter
        adapter.forward = self._rowwise_forward
        self._handle = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    def _unhook(self) -> None:
        if self._adapter is not None and "forward" in self._adapter.__dict__:
            del self._adapter.forward
        if self._handle is not None:
            self._handle.remove()
        self._adapter, self._handle, self._mask = None, None, None

    # -- EditMethod
    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # WISE prints every step's loss
            outcome = super().edit_batch(model, tok, requests)
        lines = printed.getvalue().strip().splitlines()
        if lines:
            logger.debug("WISE, last line printed: %s", lines[-1])
        self._hook(model)
        return outcome

    def reset(self, model: torch.nn.Module) -> None:
        """Forget every edit: the wrapped module goes back in the adapter's place, WISE's history is emptied and
        the loc prompts start from the first again."""
        from ... import easyedit

        self._unhook()
        self.unwrap(model)
        if easyedit.easyedit_version() == easyedit.EASYEDIT_MAIN:
            easyedit.wise_history_reset()
        self._loc_next = 0
        super().reset(model)

    # -- checkpoints
    def side_state(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the side copy, side memories and gradient mask; the counts, thresholds, loc
        position (JSON-safe). Empty before the first edit."""
        adapter = self.adapter(model)
        if adapter is None:
            return {}, {}
        tensors = {"new_weight": adapter.new_weight.detach()}
        for i, memory in enumerate(adapter.memory_weight):
            tensors[f"memory_weight.{i}"] = memory.detach()
        if isinstance(getattr(adapter, "weight_mask", None), torch.Tensor):
            tensors["weight_mask"] = adapter.weight_mask
        tensors = {k: v.cpu().contiguous().clone() for k, v in tensors.items()}
        meta = {"editing_total_cnt": int(adapter.editing_total_cnt), "merge_cnt": int(adapter.merge_cnt),
                "n_memories": len(adapter.memory_weight),
                "editing_mean_act": _mean_act_state(adapter.editing_mean_act),
                "memory_mean_act": [_mean_act_state(a) for a in adapter.memory_mean_act],
                "loc_next": int(self._loc_next)}
        return tensors, meta

    def side_state_nbytes(self, model: torch.nn.Module) -> int:
        """Bytes of the side copy and side memories (the mask left out)."""
        adapter = self.adapter(model)
        if adapter is None:
            return 0
        weights = [adapter.new_weight, *adapter.memory_weight]
        return int(sum(w.numel() * w.element_size() for w in weights))

    def load_side_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Wrap the module as WISE's first edit does and give the adapter this state (nothing when empty)."""
        if not tensors:
            return
        n = meta.get("n_memories")
        needed = ["new_weight"] + [f"memory_weight.{i}" for i in range(n if isinstance(n, int) else 0)]
        missing = [name for name in needed if name not in tensors]
        if not isinstance(n, int) or missing or len(meta.get("memory_mean_act", [])) != n:
            raise StudyError(f"WISE side memory lacks {missing or 'its counts or thresholds'}")
        adapter = self.ensure_adapter(model)
        device = adapter.weight.device
        adapter.new_weight = torch.nn.Parameter(tensors["new_weight"].to(device), requires_grad=False)
        adapter.memory_weight = [tensors[f"memory_weight.{i}"].to(device) for i in range(n)]
        if "weight_mask" in tensors:
            adapter.weight_mask = tensors["weight_mask"].to(device)
        act_class = type(adapter.editing_mean_act)
        adapter.editing_mean_act = self._mean_act(act_class, meta["editing_mean_act"])
        adapter.memory_mean_act = [self._mean_act(act_class, state) for state in meta["memory_mean_act"]]
        adapter.editing_total_cnt = int(meta["editing_total_cnt"])
        adapter.merge_cnt = int(meta["merge_cnt"])
        self._loc_next = int(meta.get("loc_next", 0))
        self._hook(model)

    @staticmethod
    def _mean_act(act_class: Any, state: dict[str, float]) -> Any:
        act = act_class()
        for name in _MEAN_ACT_FIELDS:
            setattr(act, name, int(state[name]) if name == "count" else float(state[name]))
        return act
