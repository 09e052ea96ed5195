"""MLP keys (the input of W_out) at the subject's last token, context templates, and batched capture.

Keys follow MEMIT's ``compute_ks``: every request is put in every context template, the input of W_out is read
at the fact token (the subject's last token by default), and the rows are averaged within each template type
(``['{}']``, then the generated ones) and then over the types. All edited layers are hooked in one pass, and the
forward stops (an internal exception raised by a hook) as soon as the deepest module needed has run, so layers
above it and the LM head are never computed.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .architecture import StopForward, get_module, hidden_state, input_device
from .requests import EditRequest, RequestError, fill, split_template
from .speed.read_positions import mlp_at_positions
from .speed.replay import LayerReplay, replayed_layers

logger = logging.getLogger(__name__)

ContextTemplates = list[list[str]]  # grouped by type: [["{}"], ["<text>. {}", ...], ...]
PREFIXES = ("The", "Therefore", "Because", "I", "You")
DEFAULT_CHUNK_ROWS = 64



# --------------------------------------------------------------------------------------------- tokenizer
@contextmanager
def editing_tokenizer(tok: Any) -> Iterator[Any]:
    """Right padding and a pad token for the duration of an edit; the original settings are restored after.

    Lookup indices and target positions are counted from the left, so rows must be padded on the right (as
    EasyEdit sets for MEMIT). A tokenizer without a pad token gets its EOS (else UNK, else BOS) as pad.
    """
    old_side = getattr(tok, "padding_side", "right")
    old_pad = getattr(tok, "pad_token", None)
    try:
        tok.padding_side = "right"
        if getattr(tok, "pad_token", None) is None:
            for candidate in ("eos_token", "unk_token", "bos_token"):
                value = getattr(tok, candidate, None)
                if value is not None:
                    tok.pad_token = value
                    break
            else:
                raise ValueError("the tokenizer has no pad, eos, unk or bos token to pad with")
        yield tok
    finally:
        tok.padding_side = old_side
        if old_pad is None and getattr(tok, "pad_token", None) is not None:
            tok.pad_token = None


def token_lengths(tok: Any, texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts`` as ``tok.encode`` (special tokens included) gives them."""
    if not texts:
        return []
    return [len(ids) for ids in tok(list(texts))["input_ids"]]


def lookup_indices(tok: Any, templates: Sequence[str], subjects: Sequence[str], fact_token: str) -> list[int]:
    """Token index (from the left, non-negative) of the fact token of each ``template`` filled with its subject.

    As MEMIT's ``get_words_idxs_in_templates``: lengths of the tokenized prefix, prefix+subject and whole text.
    ``subject_last``: the subject's last token; ``subject_first``: its first (counted after the prefix with
    its trailing space stripped, which MEMIT's code does not do); ``subject_first_after_last``: the
    token after the subject (its last token when nothing follows); ``last``: the last token of the text.
    """
    prefixes, suffixes = zip(*(split_template(t) for t in templates)) if templates else ((), ())
    with_subject = [p + s for p, s in zip(prefixes, subjects)]
    whole = [p + s + x for p, s, x in zip(prefixes, subjects, suffixes)]
    # the prefix without its trailing space: BPE/Metaspace tokenizers make "of " end in a lone space token
    n_prefix = token_lengths(tok, [p.rstrip() for p in prefixes])
    n_with_subject = token_lengths(tok, with_subject)
    n_whole = token_lengths(tok, whole)
    result = []
    for i in range(len(templates)):
        if fact_token == "subject_last":
            idx = n_with_subject[i] - 1
        elif fact_token == "subject_first":
            idx = n_prefix[i]
        elif fact_token == "subject_first_after_last":
            idx = n_with_subject[i] - (1 if n_whole[i] == n_with_subject[i] else 0)
        elif fact_token == "last":
            idx = n_whole[i] - 1
        else:
            raise ValueError(f"fact_token={fact_token!r} not recognised")
        if not 0 <= idx < n_whole[i]:
            raise ValueError(f"fact token index {idx} out of range for {whole[i]!r} ({n_whole[i]} tokens)")
        result.append(idx)
    return result


@dataclass
class EncodedRows:
    """Right-padded token ids of a list of prompts and the fact-token index of each row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # [rows] long

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    def select(self, rows: torch.Tensor) -> EncodedRows:
        """A sub-batch, trimmed to its longest row."""
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        width = int(mask.sum(1).max().item()) if rows.numel() else 0
        return EncodedRows(ids[:, :width], mask[:, :width], self.lookup[rows])


def same_up_to_fact(a: EncodedRows, b: EncodedRows) -> bool:
    """Whether row j of ``a`` and of ``b`` have the same fact token and the same tokens up to it, for every j:
    then, attention being causal, every layer's states at that token are the same in both."""
    if a.n_rows != b.n_rows or not torch.equal(a.lookup.cpu(), b.lookup.cpu()):
        return False
    if a.n_rows == 0:
        return True
    width = int(a.lookup.max()) + 1
    if min(a.input_ids.shape[1], b.input_ids.shape[1]) < width:
        return False
    upto = torch.arange(width).unsqueeze(0) <= a.lookup.cpu().unsqueeze(1)
    ids_a, ids_b = a.input_ids[:, :width].cpu(), b.input_ids[:, :width].cpu()
    real = (a.attention_mask[:, :width].cpu() == 1) & (b.attention_mask[:, :width].cpu() == 1)
    return bool(((ids_a == ids_b) & real | ~upto).all())


def encode_rows(
    tok: Any, templates: Sequence[str], subjects: Sequence[str], fact_token: str, device: torch.device
) -> EncodedRows:
    """Tokenize ``templates`` filled with ``subjects`` (right padding) and find each row's fact token."""
    texts = [fill(t, s) for t, s in zip(templates, subjects)]
    enc = tok(texts, padding=True, return_tensors="pt")
    lookup = torch.tensor(lookup_indices(tok, templates, subjects, fact_token), dtype=torch.long)
    return EncodedRows(enc["input_ids"].to(device), enc["attention_mask"].to(device), lookup.to(device))


# ------------------------------------------------------------------------------------------- capture
@dataclass
class KeptOutputs:
    """The output of the last of ``replay.names`` over every chunk of one capture's rows (same chunking)."""

    replay: LayerReplay
    chunks: list[torch.Tensor]  # [chunk rows, chunk width, d]


def capture(
    model: nn.Module,
    rows: EncodedRows,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    stop_at: Optional[str] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, torch.Tensor]:
    """No-grad forward(s) reading, at each row's fact token, the input of ``inputs_of`` modules and the hidden
    state output by ``outputs_of`` modules. Returns ``name -> [rows, dim]`` float32 on that module's device.

    ``stop_at``: a module whose output ends the forward (the deepest one needed), saving the rest.
    """
    return _capture(model, rows, inputs_of, outputs_of, stop_at, chunk_rows)[0]


def _capture(
    model: nn.Module,
    rows: EncodedRows,
    inputs_of: Sequence[str],
    outputs_of: Sequence[str],
    stop_at: Optional[str],
    chunk_rows: int,
    replay: Optional[KeptOutputs] = None,
    keep: Sequence[str] = (),
    last_mlp: Optional[nn.Module] = None,
) -> tuple[dict[str, torch.Tensor], Optional[KeptOutputs]]:
    """:func:`capture`; with ``replay`` the layers it names hand back its outputs instead of running, and with
    ``keep`` (decoder layers 0..l) the output of layer l over every chunk is kept for a later replay.

    ``last_mlp``: the MLP of the deepest layer the forward reaches, whose output nothing reads but at the fact
    tokens (no later layer runs), so it runs at each row's fact token only (read_positions.py); a module hooked
    inside it sees one token per row."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in (*inputs_of, *outputs_of)}
    current: dict[str, torch.Tensor] = {}
    kept: list[torch.Tensor] = []
    template: list[Any] = []
    inside = {id(m) for m in last_mlp.modules()} if last_mlp is not None else set()

    def gather(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if id(module) in inside:  # [1, rows, d]: the fact tokens, in row order
            return t.reshape(-1, t.shape[-1]).detach().float()
        lookup = current["lookup"].to(t.device)
        return t[torch.arange(t.shape[0], device=t.device), lookup].detach().float()

    def keep_hook(module: nn.Module, args: tuple, output: Any) -> None:
        kept.append(hidden_state(output).detach())
        template[:] = template or [output]

    handles = []
    try:
        for name in inputs_of:

            def pre_hook(module: nn.Module, args: tuple, _name: str = name) -> None:
                got[_name].append(gather(args[0], module))

            handles.append(get_module(model, name).register_forward_pre_hook(pre_hook))
        for name in set(outputs_of) | ({stop_at} if stop_at else set()):

            def hook(module: nn.Module, args: tuple, output: Any, _name: str = name) -> None:
                if _name in outputs_of:
                    got[_name].append(gather(hidden_state(output), module))
                if _name == stop_at:
                    raise StopForward

            handles.append(get_module(model, name).register_forward_hook(hook))
        if keep:
            handles.append(get_module(model, keep[-1]).register_forward_hook(keep_hook))
        with torch.no_grad():
            for c, start in enumerate(range(0, rows.n_rows, chunk_rows)):
                part = rows.select(torch.arange(start, min(start + chunk_rows, rows.n_rows)))
                current["lookup"] = part.lookup
                # causal: the tokens after the chunk's last fact token change nothing that is read
                width = int(part.lookup.max()) + 1
                replayed = replayed_layers(model, replay.replay, replay.chunks[c]) if replay else nullcontext()
                at_facts = (
                    mlp_at_positions(last_mlp, torch.arange(part.n_rows), part.lookup, "key_positions_only")
                    if last_mlp is not None
                    else nullcontext()
                )
                try:
                    with replayed, at_facts:
                        model(
                            input_ids=part.input_ids[:, :width],
                            attention_mask=part.attention_mask[:, :width],
                            use_cache=False,
                        )
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, parts in got.items() if not parts]
    if missing:
        raise RuntimeError(f"modules {missing} did not run in the forward pass (check the module templates)")
    out = KeptOutputs(LayerReplay(list(keep), template[0]), kept) if keep and template else None
    return {name: torch.cat(parts, 0) for name, parts in got.items()}, out


# --------------------------------------------------------------------------------------- key rows
@dataclass
class KeyRows:
    """The templated prompts of a batch: every request in every context template (request-major)."""

    rows: EncodedRows
    n_edits: int
    type_sizes: list[int]  # number of templates of each type, e.g. [1, 5]

    @property
    def per_edit(self) -> int:
        return sum(self.type_sizes)

    @property
    def plain_rows(self) -> torch.Tensor:
        """Row of each request in the plain ``'{}'`` template (the first template)."""
        return torch.arange(self.n_edits) * self.per_edit

    def average(self, raw: torch.Tensor) -> torch.Tensor:
        """``[n_edits * per_edit, d]`` -> ``[n_edits, d]``: mean within each template type, then over types."""
        per_request = raw.reshape(self.n_edits, self.per_edit, -1)
        means, start = [], 0
        for size in self.type_sizes:
            means.append(per_request[:, start : start + size].mean(1))
            start += size
        return torch.stack(means, 0).mean(0)


def build_key_rows(
    tok: Any,
    requests: Sequence[EditRequest],
    templates: ContextTemplates,
    fact_token: str,
    device: torch.device,
) -> KeyRows:
    flat = [t for group in templates for t in group]
    if not flat or flat[0] != "{}":
        raise ValueError("context templates must start with the plain '{}' template")
    row_templates = [ctx.replace("{}", req.template) for req in requests for ctx in flat]
    subjects = [req.subject for req in requests for _ in flat]
    rows = encode_rows(tok, row_templates, subjects, fact_token, device)
    return KeyRows(rows=rows, n_edits=len(requests), type_sizes=[len(g) for g in templates])


def check_row_lengths(
    tok: Any, requests: Sequence[EditRequest], templates: ContextTemplates, max_len: Optional[int]
) -> None:
    """Refuse a request whose longest row (context template + prompt + target, as z runs it) does not fit the
    model's ``max_len`` positions, naming the request."""
    if max_len is None:
        return
    flat = [t for group in templates for t in group]
    texts = [ctx.replace("{}", req.text) + req.target_new for req in requests for ctx in flat]
    lengths = token_lengths(tok, texts)
    for i, req in enumerate(requests):
        longest = max(lengths[i * len(flat) : (i + 1) * len(flat)])
        if longest > max_len:
            raise RequestError(
                f"request {req.index}{'' if req.case_id is None else f' (case_id={req.case_id!r})'} "
                f"{req.describe()}: {longest} tokens with its context template and target, more than the "
                f"model's {max_len} positions; shorten the prompt"
            )


def read_keys(
    model: nn.Module,
    key_rows: KeyRows,
    w_out_names: Sequence[str],
    z_module: Optional[str],
    stop_at: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Template-averaged keys ``name -> [n_edits, d_ff]`` of each W_out and, with ``z_module``, its output at
    the plain-prompt rows ``[n_edits, d_model]`` (MEMIT's ``cur_zs``) from the same forward."""
    outputs_of = [z_module] if z_module else []
    raw = capture(model, key_rows.rows, w_out_names, outputs_of, stop_at, chunk_rows)
    return _keys_and_z(key_rows, raw, w_out_names, z_module)


def _keys_and_z(
    key_rows: KeyRows, raw: dict[str, torch.Tensor], w_out_names: Sequence[str], z_module: Optional[str]
) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Template-averaged keys of ``w_out_names`` and the z module's output at the plain rows, from a capture."""
    keys = {name: key_rows.average(raw[name]) for name in w_out_names}
    if not z_module:
        return keys, None
    z_all = raw[z_module]
    return keys, z_all[key_rows.plain_rows.to(z_all.device)]


class KeyReads:
    """The key reads of one batch in MEMIT's order: read 0 gives every edited layer's keys on the model before
    the batch, and read i (i >= 1) layer i's keys right after the edited layers before i were written; every
    read also gives the z layer's output at the plain rows (MEMIT's ``cur_zs``).

    Only the plain rows (one per edit) run up to the z layer; the context-templated rows, whose z-layer output
    nobody reads, stop at the W_out being read (for read 0 the deepest one). With ``below`` (per edited layer
    i, the decoder layers 0..l_i - 1 under it; replay.py), read i keeps the output of the decoder layer just
    under edited layer i, which the write of layer i that follows cannot change, and read i + 1 replays the
    layers up to it instead of running them. A read whose predecessor was not read i - 1 runs every layer.

    With ``mlps`` (the MLP of each edited layer; the z layer is the last), the deepest layer each part of a read
    reaches runs its MLP at the fact tokens only: the z layer for the plain rows, the read W_out's layer for the
    others."""

    def __init__(
        self,
        model: nn.Module,
        key_rows: KeyRows,
        w_out_names: Sequence[str],
        z_name: str,
        below: Optional[Sequence[Sequence[str]]] = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        mlps: Optional[Sequence[nn.Module]] = None,
    ) -> None:
        self.model, self.key_rows, self.z_name, self.chunk_rows = model, key_rows, z_name, chunk_rows
        self.w_out_names = list(w_out_names)
        if mlps is not None and len(mlps) != len(self.w_out_names):
            raise ValueError(f"{len(mlps)} MLPs for {len(self.w_out_names)} edited layers")
        self.mlps = list(mlps) if mlps is not None else None
        self.below = [list(b) for b in below] if below is not None else None
        plain = key_rows.plain_rows.to(key_rows.rows.input_ids.device)
        is_plain = torch.zeros(key_rows.rows.n_rows, dtype=torch.bool, device=plain.device)
        is_plain[plain] = True
        other = torch.nonzero(~is_plain).flatten()
        # (rows of the full set, their encoded sub-batch): the plain rows, then the others (possibly none)
        self._parts = [(plain, key_rows.rows.select(plain))]
        if len(other):
            self._parts.append((other, key_rows.rows.select(other)))
        self._kept: Optional[tuple[int, list[Optional[KeptOutputs]]]] = None  # (the read that kept it, per part)

    def read(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        names = self.w_out_names if i == 0 else [self.w_out_names[i]]
        kept_before = self._kept[1] if self._kept is not None and self._kept[0] == i - 1 else None
        keep = self.below[i] if self.below is not None else []
        raw: dict[str, torch.Tensor] = {}
        kept: list[Optional[KeptOutputs]] = []
        z_out: Optional[torch.Tensor] = None
        for p, (row_ids, rows) in enumerate(self._parts):
            is_plain = p == 0
            deepest = len(self.w_out_names) - 1 if is_plain or i == 0 else i  # the z layer is the last edited
            got, out = _capture(
                self.model,
                rows,
                names,
                [self.z_name] if is_plain else [],
                self.z_name if is_plain else names[-1],
                self.chunk_rows,
                kept_before[p] if kept_before is not None else None,
                keep,
                self.mlps[deepest] if self.mlps is not None else None,
            )
            kept.append(out)
            for name in names:
                if name not in raw:
                    raw[name] = got[name].new_empty((self.key_rows.rows.n_rows, got[name].shape[1]))
                raw[name][row_ids.to(raw[name].device)] = got[name]
            if is_plain:
                z_out = got[self.z_name]
        self._kept = (i, kept) if keep else None
        keys, _ = _keys_and_z(self.key_rows, raw, names, None)
        assert z_out is not None  # the plain rows were read
        return keys, z_out


# -------------------------------------------------------------------------------- context templates
def _sample_texts(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_len: int,
    generator: torch.Generator,
    top_k: int = 5,
) -> list[str]:
    """Top-k sampled continuations until each text has ``max_len`` tokens (prompt included, as MEMIT's
    ``generate_fast``), seeded by ``generator`` (CPU) so runs are reproducible."""
    device = input_device(model)
    seqs = [list(ids) for ids in tok(list(prompts))["input_ids"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        while True:
            active = [i for i, s in enumerate(seqs) if len(s) < max_len]
            if not active:
                break
            width = max(len(seqs[i]) for i in active)
            ids = torch.full((len(active), width), pad, dtype=torch.long)
            mask = torch.zeros((len(active), width), dtype=torch.long)
            for r, i in enumerate(active):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            last = torch.tensor([len(seqs[i]) - 1 for i in active], device=logits.device)
            probs = torch.softmax(
                logits[torch.arange(len(active), device=logits.device), last].float(), -1
            ).cpu()
            top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
            weights = top.values / top.values.sum(-1, keepdim=True)
            choice = torch.multinomial(weights, 1, generator=generator).squeeze(1)
            new = top.indices[torch.arange(len(active)), choice]
            for r, i in enumerate(active):
                seqs[i].append(int(new[r]))
    texts = [tok.decode(s, skip_special_tokens=True) for s in seqs]
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ") for t in texts]


def generate_context_templates(
    model: nn.Module,
    tok: Any,
    length_params: Sequence[Sequence[int]],
    seed: int,
    prefixes: Sequence[str] = PREFIXES,
) -> ContextTemplates:
    """``[['{}'], [<text>. {}, ...], ...]``: for each ``[length, n]``, n texts sampled by the model (top-k 5,
    seeded) from the prefixes in turn (n // 5 each for n = 5k, as MEMIT), each turned into ``"<text>. {}"``."""
    templates: ContextTemplates = [["{}"]]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    for length, n in length_params:
        if n <= 0:
            continue
        counts = [n // len(prefixes) + (1 if i < n % len(prefixes) else 0) for i in range(len(prefixes))]
        prompts = [p for p, c in zip(prefixes, counts) for _ in range(c)]
        texts = _sample_texts(model, tok, prompts, int(length), generator)
        templates.append([t.replace("{", " ").replace("}", " ") + ". {}" for t in texts])
    logger.info("context templates: %s", templates)
    return templates
