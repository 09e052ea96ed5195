"""What no delta can change, run once per batch (exact speed-ups of the z optimisation).

The z optimisation (values.py) adds ``delta_i`` to the output of layer L at a row's fact token f. With causal
attention no token before f ever sees that addition, so at every layer their keys and values are the unedited
model's. A row is therefore split at f: its prefix ``[0, f)`` runs once, without gradients, into a key/value
cache, and every z step runs only the suffix ``[f, len)`` on top of that cache, with the delta at suffix
position 0. The losses equal those of the full forward up to float rounding; the work of a step falls from the
whole prompt (context template + prompt + target) to its suffix (on the testbed 18 -> 5 tokens per row).

Inside the cache the prefixes are right-padded (padding keys/values zeroed and masked); each row's positions
are passed explicitly, so rows with different split points share one forward. The cache is a plain list of
per-layer ``(key, value)`` tensors ``[rows, heads, prefix, head_dim]``; :func:`cache_factory` turns a
selection of it back into what the model's forward accepts (legacy tuples or a ``DynamicCache``, transformers
4.x and 5).

The same argument holds for depth: the delta enters at the *output* of layer L, so no layer up to L sees it,
for any token. With a :class:`~ece_plugin.method.speed.replay.LayerReplay` the suffix's layer-L outputs are computed once
too, and during the z steps the decoder layers 0..L hand back those outputs (replay.py): a step runs only the
layers after L. On the scale testbed (z at layer 3 of 6) that is two thirds of the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..architecture import ArchitectureError, StopForward, get_module, hidden_state
from ..keys import EncodedRows
from .read_positions import mlp_at_positions
from .replay import LayerReplay, replayed_layers

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]



@dataclass
class RowBatch:
    """Forward inputs for some prompt rows, and where their tokens sit."""

    inputs: dict[str, Any]  # keyword arguments of the model's forward, without the cache
    fact_pos: torch.Tensor  # [R] index of each row's fact token along the inputs' sequence axis
    offset: torch.Tensor  # [R] position in the whole prompt of the inputs' first token
    kv: Optional[KeyValues] = None  # cached prefix keys/values of these rows
    make_cache: Optional[Callable[[KeyValues], Any]] = None
    replay: Optional[LayerReplay] = None  # layers that hand back ``replay_hidden`` instead of running
    replay_hidden: Optional[torch.Tensor] = field(default=None, repr=False)  # [R, T, d] z-layer outputs

    @classmethod
    def full(cls, rows: EncodedRows) -> RowBatch:
        """Whole prompts, no cache."""
        inputs = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "use_cache": False}
        return cls(inputs, rows.lookup, torch.zeros_like(rows.lookup))

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one forward: a fresh cache object each time (a forward appends to its cache)."""
        if self.kv is None or self.make_cache is None:
            return dict(self.inputs)
        return {**self.inputs, "past_key_values": self.make_cache(self.kv)}

    def replayed(self, model: nn.Module) -> Any:
        """A context in which the replayed layers of ``model`` do not run (a no-op without a replay)."""
        if self.replay is None or self.replay_hidden is None:
            return nullcontext()
        return replayed_layers(model, self.replay, self.replay_hidden)


class FullRows:
    """Every forward re-runs whole prompts (the reference path; ``z_prefix_cache: false``)."""

    def __init__(self, rows: EncodedRows) -> None:
        self.rows = rows

    def step_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Tokens each of ``rows`` runs per step: the whole prompt."""
        return self.rows.lengths[rows]

    def batch(self, rows: torch.Tensor) -> RowBatch:
        return RowBatch.full(self.rows.select(rows))


def key_value_bytes_per_token(model: nn.Module) -> int:
    """Bytes of cached keys and values per token over all layers (from the config; an estimate for blocks)."""
    cfg: Any = getattr(model, "config")  # noqa: B009 - a transformers model's config (typed Any)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
    layers = int(cfg.num_hidden_layers)
    elem = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * elem


def _key_values(past: Any) -> KeyValues:
    """Per-layer (key, value) tensors of a model's returned cache (legacy tuples or a Cache object)."""
    if past is None:
        raise ArchitectureError("the model returned no key/value cache (use_cache=True)")
    out: KeyValues = []
    for item in past:
        k, v = item[0], item[1]
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise ArchitectureError(f"unsupported key/value cache entry {type(k).__name__}")
        out.append((k, v))
    if not out:
        raise ArchitectureError("the model returned an empty key/value cache")
    return out


def cache_factory(model: nn.Module, past: Any) -> Callable[[KeyValues], Any]:
    """A function turning per-layer (key, value) tensors into the cache type ``model`` returned as ``past``."""
    if isinstance(past, tuple):
        if getattr(model, "_supports_cache_class", False):
            from transformers import DynamicCache

            # transformers 4.x: hand back a DynamicCache, not tuples (their deprecated path)
            if hasattr(DynamicCache, "from_legacy_cache"):
                return lambda kv: DynamicCache.from_legacy_cache(tuple(kv))
        return lambda kv: tuple(kv)
    cls = type(past)
    legacy = getattr(cls, "from_legacy_cache", None)
    if legacy is not None:
        return lambda kv: legacy(tuple(kv))
    return lambda kv: cls(kv)  # transformers 5: DynamicCache(ddp_cache_data)


def _body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (the prefix pass needs only keys and values)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


class PrefixCache:
    """Keys and values of the tokens before each row's fact token, for the rows ``row_ids`` of ``rows``; with a
    ``replay``, also the z layer's outputs over each row's suffix. ``unread_mlp``: the loss layer's MLP, whose
    output over the prefixes no step reads (only that layer's keys and values are), so it does not run on them
    (read_positions.py).

    ``inputs_at_fact``: modules at or below the z layer whose input at each row's fact token (the suffix's first
    token) the suffix pass keeps, :attr:`at_fact` (``name -> [rows, dim]`` float32, rows in ``row_ids`` order):
    the MLP keys of the unedited model, which the editor then need not read in a pass of its own."""

    def __init__(
        self,
        model: nn.Module,
        rows: EncodedRows,
        row_ids: torch.Tensor,
        chunk_rows: int,
        replay: Optional[LayerReplay] = None,
        unread_mlp: Optional[nn.Module] = None,
        inputs_at_fact: Sequence[str] = (),
    ) -> None:
        dev = rows.input_ids.device
        row_ids = row_ids.to(dev)
        self._local = torch.full((rows.n_rows,), -1, dtype=torch.long, device=dev)
        self._local[row_ids] = torch.arange(len(row_ids), device=dev)
        self.split = rows.lookup[row_ids]  # prefix length = index of the fact token
        self.suffix_len = rows.lengths[row_ids] - self.split
        self._ids = rows.input_ids[row_ids]
        self.width = int(self.split.max()) if len(self.split) else 0
        self.kv: Optional[KeyValues] = None
        self._make: Optional[Callable[[KeyValues], Any]] = None
        if self.width > 0:
            self.kv, self._make = self._run_prefixes(model, chunk_rows, unread_mlp)
        self.replay: Optional[LayerReplay] = None
        self.hidden: Optional[torch.Tensor] = None  # [rows, longest suffix, d] z-layer outputs
        self.at_fact: dict[str, torch.Tensor] = {}
        if inputs_at_fact and replay is None:
            raise ValueError("inputs at the fact token are read in the suffix pass, which needs a replay")
        if replay is not None:
            self.replay, self.hidden = self._run_suffixes(model, chunk_rows, replay, inputs_at_fact)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (and replayed hidden states)."""
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv or [])
        return kv + (self.hidden.numel() * self.hidden.element_size() if self.hidden is not None else 0)

    # ------------------------------------------------------------------ building
    def _run_prefixes(
        self, model: nn.Module, chunk_rows: int, unread_mlp: Optional[nn.Module] = None
    ) -> tuple[KeyValues, Callable[[KeyValues], Any]]:
        """One no-grad pass over the prefixes, rows sorted by prefix length so that a chunk is padded only to
        its own longest prefix; the result is right-padded to ``self.width``."""
        order = torch.argsort(self.split, stable=True)
        body = _body(model)
        kv: KeyValues = []
        make: Optional[Callable[[KeyValues], Any]] = None
        none = torch.zeros(0, dtype=torch.long)  # the unread MLP runs at no position
        with torch.no_grad():
            for start in range(0, len(order), chunk_rows):
                idx = order[start : start + chunk_rows]
                width = int(self.split[idx].max())
                if width == 0:  # no prefix: these rows' cache stays zero (and masked)
                    continue
                steps = torch.arange(width, device=idx.device)
                mask = (steps.unsqueeze(0) < self.split[idx].unsqueeze(1)).long()
                with mlp_at_positions(unread_mlp, none, none) if unread_mlp is not None else nullcontext():
                    out = body(
                        input_ids=self._ids[idx, :width],  # beyond a row's split: later tokens or padding, masked
                        attention_mask=mask,
                        position_ids=steps.expand(len(idx), -1),
                        use_cache=True,
                    )
                past = out.past_key_values
                make = make or cache_factory(model, past)
                for i, (k, v) in enumerate(_key_values(past)):
                    k, v = self._zero_padding(k, v, mask)
                    if len(kv) <= i:
                        shape = (len(order), k.shape[1], self.width, k.shape[3])
                        kv.append((k.new_zeros(shape), v.new_zeros(shape[:3] + (v.shape[3],))))
                    kv[i][0][idx.to(k.device), :, :width] = k
                    kv[i][1][idx.to(v.device), :, :width] = v
        assert make is not None  # self.width > 0: some chunk ran
        return kv, make

    def _zero_padding(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if k.dim() != 4 or k.shape[0] != mask.shape[0] or k.shape[-2] != mask.shape[1]:
            raise ArchitectureError(
                f"unsupported key/value layout {tuple(k.shape)} (expected [rows, heads, {mask.shape[1]}, head_dim])"
            )
        keep = mask.to(k.dtype)[:, None, :, None].to(k.device)
        return k * keep, v * keep

    def _run_suffixes(
        self, model: nn.Module, chunk_rows: int, replay: LayerReplay, inputs_at_fact: Sequence[str] = ()
    ) -> tuple[LayerReplay, torch.Tensor]:
        """One no-grad pass of the suffixes up to the z layer, keeping its outputs (right-padded) and the inputs
        of ``inputs_at_fact`` at the suffixes' first token (:attr:`at_fact`)."""
        found: dict[str, Any] = {}
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in inputs_at_fact}

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            found["out"] = output
            raise StopForward

        def at_fact(name: str) -> Callable[[nn.Module, tuple], None]:
            def pre_hook(module: nn.Module, args: tuple) -> None:
                parts[name].append(args[0][:, 0].detach().float())

            return pre_hook

        n, width = len(self.split), int(self.suffix_len.max()) if len(self.split) else 0
        hidden: Optional[torch.Tensor] = None
        template: Any = None
        handles = [get_module(model, name).register_forward_pre_hook(at_fact(name)) for name in inputs_at_fact]
        handle = get_module(model, replay.last).register_forward_hook(hook)
        handles.append(handle)
        try:
            with torch.no_grad():
                for start in range(0, n, chunk_rows):
                    local = torch.arange(start, min(start + chunk_rows, n), device=self.split.device)
                    batch = self._local_batch(local)
                    try:
                        model(**batch.forward_kwargs())
                    except StopForward:
                        pass
                    if "out" not in found:
                        raise ArchitectureError(f"layer {replay.last!r} did not run in the forward pass")
                    out = found.pop("out")
                    template = out if template is None else template
                    hs = hidden_state(out)
                    if hidden is None:
                        hidden = hs.new_zeros((n, width, hs.shape[-1]))
                    hidden[local.to(hs.device), : hs.shape[1]] = hs
        finally:
            for h in handles:
                h.remove()
        assert hidden is not None  # n > 0: some chunk ran
        for name, got in parts.items():
            if sum(len(t) for t in got) != n:
                raise ArchitectureError(f"{name!r} did not run below {replay.last!r} in the forward pass")
            self.at_fact[name] = torch.cat(got, 0)
        return LayerReplay(list(replay.names), template), hidden

    # ------------------------------------------------------------------ use
    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions in this cache (``row_ids`` order) of the global rows ``rows``; every one must be cached."""
        local = self._local[rows.to(self._local.device)]
        if bool((local < 0).any()):
            raise ValueError("rows outside this prefix cache")
        return local

    def step_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Tokens each of ``rows`` runs per step: its suffix, from the fact token on."""
        return self.suffix_len[self._local[rows.to(self._local.device)]]

    def batch(self, rows: torch.Tensor) -> RowBatch:
        """Inputs running only the suffixes of the global rows ``rows`` on top of their cached prefixes."""
        return self._local_batch(self.local(rows))

    def _local_batch(self, local: torch.Tensor) -> RowBatch:
        split, slen = self.split[local], self.suffix_len[local]
        p_width, s_width = int(split.max()), int(slen.max())
        steps = torch.arange(s_width, device=split.device)
        suffix_mask = steps.unsqueeze(0) < slen.unsqueeze(1)
        gather = (split.unsqueeze(1) + steps).clamp_max(self._ids.shape[1] - 1)
        ids = self._ids[local].gather(1, gather)  # beyond a row's end: whatever id sits there, masked
        prefix_mask = torch.arange(p_width, device=split.device).unsqueeze(0) < split.unsqueeze(1)
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.cat([prefix_mask, suffix_mask], 1).long(),
            "position_ids": split.unsqueeze(1) + steps,
            "use_cache": True,
        }
        kv = (
            [(k[local.to(k.device), :, :p_width], v[local.to(v.device), :, :p_width]) for k, v in self.kv]
            if p_width and self.kv
            else None
        )
        batch = RowBatch(inputs, torch.zeros_like(split), split.clone(), kv, self._make)
        if self.hidden is not None:
            batch.replay = self.replay
            batch.replay_hidden = self.hidden[local.to(self.hidden.device), :s_width]
        return batch


def edit_blocks(
    edits: Sequence[int], rows_per_edit: int, prefix_tokens: float, bytes_per_token: int, budget_mb: float
) -> list[list[int]]:
    """Split ``edits`` into blocks whose cached prefixes fit ``budget_mb`` (at least one edit per block)."""
    per_edit = max(rows_per_edit * prefix_tokens * bytes_per_token, 1.0)
    size = max(1, int(budget_mb * 2**20 // per_edit))
    return [list(edits[i : i + size]) for i in range(0, len(edits), size)]
