"""Measuring a testbed: pre-edit CounterFact figures and the subject-recall probe.

* :func:`counterfact_preedit` -- before any edit, on the records trained on: efficacy (P(new) > P(true) on
  the prompt), paraphrase success (same on the rephrase) and neighbourhood success (the locality answer still
  preferred over the new target), each comparing mean per-token NLLs of ``' ' + answer`` as the
  ROME/MEMIT/EasyEdit CounterFact metrics do. A model that knows its facts scores low / low / high.
* :func:`subject_recall_probe` -- can a single vector added to the residual stream at the subject's last
  token, output of one layer, make the model produce the new object? This is the free version of the value
  optimisation of ROME/MEMIT/ECE; with ``clamp_factor`` and ``prefixes`` it mimics EasyEdit's constraints
  (delta norm at most ``clamp_factor`` times the hidden state's norm; loss averaged over context prefixes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreEditFigures:
    """Percentages over ``n`` CounterFact records."""

    efficacy: float
    paraphrase: float
    neighborhood: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"efficacy": self.efficacy, "paraphrase": self.paraphrase, "neighborhood": self.neighborhood,
                "n": self.n}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def _right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with ``pad_id`` and the attention mask (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def answer_nll(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64
) -> list[float]:
    """Mean per-token NLL of ``' ' + answer`` after each prompt (the tokenizer adds BOS itself)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = _device_of(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    results: list[float] = []
    for start in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prompt_ids = _encode(tok, prompt)
            full = _encode(tok, f"{prompt} {answer.strip()}")
            if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                raise ValueError(f"answer {answer!r} does not tokenize separately after prompt {prompt!r}")
            seqs.append(full)
            spans.append((len(prompt_ids), len(full)))
        ids, mask = _right_padded(seqs, pad_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, (lo, hi) in enumerate(spans):
            targets = ids[i, lo:hi].to(device)
            token_lp = logprobs[i, lo - 1 : hi - 1].gather(1, targets[:, None]).squeeze(1)
            results.append(float(-token_lp.mean()))
    return results


def counterfact_preedit(
    model: torch.nn.Module, tok: Any, records: Sequence[dict[str, Any]], batch_size: int = 64
) -> PreEditFigures:
    """Pre-edit efficacy / paraphrase / neighbourhood success (%) on EasyEdit-format CounterFact records."""
    if not records:
        raise ValueError("no CounterFact records to evaluate")
    prompts, answers = [], []
    for r in records:
        prompts += [r["prompt"], r["prompt"], r["rephrase_prompt"], r["rephrase_prompt"], r["locality_prompt"],
                    r["locality_prompt"]]
        answers += [r["target_new"], r["ground_truth"], r["target_new"], r["ground_truth"], r["target_new"],
                    r["locality_ground_truth"]]
    nll = answer_nll(model, tok, prompts, answers, batch_size)
    es = ps = ns = 0
    for i in range(len(records)):
        new_p, true_p, new_r, true_r, new_l, true_l = nll[6 * i : 6 * i + 6]
        es += new_p < true_p
        ps += new_r < true_r
        ns += true_l < new_l
    n = len(records)
    return PreEditFigures(100.0 * es / n, 100.0 * ps / n, 100.0 * ns / n, n)


def layer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Llama-like (``model.layers``) or GPT-2 (``transformer.h``) model."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return list(inner.layers)
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "h"):
        return list(transformer.h)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def subject_last_index(tok: Any, text_before_subject: str, subject: str) -> int:
    """Index (BOS included) of the subject's last token in ``text_before_subject + subject + ...``."""
    return len(_encode(tok, text_before_subject + subject)) - 1


@dataclass(frozen=True)
class ProbeResult:
    """Share (%) of facts whose new object the probe vector makes likely (mean token prob > threshold)."""

    layer: int
    moved: float
    n: int
    mean_target_prob: float


@dataclass
class _ProbeRows:
    """The probe's padded rows: one per (record, prefix), each the prompt followed by ``' ' + target_new``."""

    ids: torch.Tensor  # [rows, width], right-padded
    mask: torch.Tensor  # 1 on real tokens
    target_mask: torch.Tensor  # True at the positions that predict the new object's tokens
    positions: torch.Tensor  # where each row's vector is added
    record: torch.Tensor  # the record each row belongs to
    plain: torch.Tensor  # the rows without a prefix, one per record

    def next_ids(self) -> torch.Tensor:
        return torch.roll(self.ids, -1, dims=1)

    def mean_target(self, values: torch.Tensor) -> torch.Tensor:
        """Per row, the mean of ``values`` over the new object's tokens."""
        return (values * self.target_mask).sum(1) / self.target_mask.sum(1)


def _probe_rows(
    tok: Any, records: Sequence[dict[str, Any]], prefixes: Sequence[str], position: str, pad_id: int,
    device: torch.device,
) -> _ProbeRows:
    seqs: list[list[int]] = []
    rec_index: list[int] = []
    positions: list[int] = []
    spans: list[tuple[int, int]] = []
    plain_rows: list[int] = []
    for r_i, r in enumerate(records):
        prompt, subject = r["prompt"], r["subject"]
        cut = prompt.find(subject)
        if cut < 0:
            raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
        for p_i, prefix in enumerate(prefixes):
            text = prefix + prompt
            prompt_ids = _encode(tok, text)
            full = _encode(tok, f"{text} {r['target_new'].strip()}")
            if p_i == 0:
                plain_rows.append(len(seqs))
            seqs.append(full)
            rec_index.append(r_i)
            positions.append(subject_last_index(tok, prefix + prompt[:cut], subject) if position == "subject_last"
                             else len(prompt_ids) - 1)
            spans.append((len(prompt_ids), len(full)))
    ids, mask = _right_padded(seqs, pad_id)
    target_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (lo, hi) in enumerate(spans):
        target_mask[i, lo - 1 : hi - 1] = True
    return _ProbeRows(ids.to(device), mask.to(device), target_mask.to(device), torch.tensor(positions, device=device),
                      torch.tensor(rec_index, device=device), torch.tensor(plain_rows, device=device))


class _ProbeVectors:
    """One free vector per record, added by a forward hook to a block's output at each row's position."""

    def __init__(self, rows: _ProbeRows, n_records: int, hidden: int, device: torch.device) -> None:
        self.rows = rows
        self.delta = torch.zeros((n_records, hidden), device=device, dtype=torch.float32, requires_grad=True)
        self._all = torch.arange(rows.ids.shape[0], device=device)
        self.init_norm: Optional[torch.Tensor] = None  # the unedited output's norm at each row's position

    def hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden_states = output[0] if isinstance(output, tuple) else output
        if self.init_norm is None:
            self.init_norm = hidden_states[self._all, self.rows.positions].detach().float().norm(dim=-1)
        add = torch.zeros_like(hidden_states)
        add[self._all, self.rows.positions] = self.delta[self.rows.record].to(hidden_states.dtype)
        hidden_states = hidden_states + add
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

    def clamp(self, factor: float) -> None:
        """``||delta|| <= factor * ||h||`` of the plain prompt's unedited output."""
        assert self.init_norm is not None
        with torch.no_grad():
            max_norm = factor * self.init_norm[self.rows.plain]
            self.delta.mul_(torch.clamp(max_norm / self.delta.norm(dim=-1).clamp_min(1e-12), max=1.0)[:, None])


def _optimise_vectors(
    model: torch.nn.Module, rows: _ProbeRows, vectors: _ProbeVectors, steps: int, lr: float,
    clamp_factor: Optional[float], n_prefix: int,
) -> torch.Tensor:
    """Adam on the vectors (the NLL of the new object, averaged over its tokens, summed over rows and averaged
    over prefixes); returns each row's mean probability of the new object's tokens afterwards."""
    optimizer = torch.optim.Adam([vectors.delta], lr=lr)
    next_ids = rows.next_ids()[..., None]
    for _ in range(steps):
        logits = model(input_ids=rows.ids, attention_mask=rows.mask).logits.float()
        token_nll = -torch.log_softmax(logits, -1).gather(2, next_ids).squeeze(-1)
        loss = rows.mean_target(token_nll).sum() / n_prefix
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if clamp_factor is not None:
            vectors.clamp(clamp_factor)
    with torch.no_grad():
        logits = model(input_ids=rows.ids, attention_mask=rows.mask).logits.float()
        return rows.mean_target(torch.softmax(logits, -1).gather(2, next_ids).squeeze(-1))


def subject_recall_probe(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict[str, Any]],
    layer: int,
    steps: int = 100,
    lr: float = 1.0,
    clamp_factor: Optional[float] = None,
    prefixes: Sequence[str] = ("",),
    position: str = "subject_last",
    threshold: float = 0.5,
) -> ProbeResult:
    """Optimise one vector per record, added to the output of block ``layer`` at the subject's last token
    (``position="subject_last"``) or at the prompt's last token (``"last"``), so that the model produces
    ``' ' + target_new`` after the prompt (loss averaged over ``prefixes`` put in front of the prompt).

    A fact counts as moved when the mean probability of the new object's tokens, after the plain prompt,
    exceeds ``threshold``. All records are optimised together (independent vectors, summed losses).
    """
    if position not in ("subject_last", "last"):
        raise ValueError(f"position must be 'subject_last' or 'last', got {position!r}")
    blocks = layer_modules(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range for a model with {len(blocks)} layers")
    if not records:
        raise ValueError("no records to probe")
    device = _device_of(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = _probe_rows(tok, records, prefixes, position, pad_id, device)
    config: Any = model.config
    hidden = int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd)
    vectors = _ProbeVectors(rows, len(records), hidden, device)

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = blocks[layer].register_forward_hook(vectors.hook)
    try:
        mean_prob = _optimise_vectors(model, rows, vectors, steps, lr, clamp_factor, len(prefixes))
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    plain = mean_prob[rows.plain]
    moved = float((plain > threshold).float().mean()) * 100.0
    return ProbeResult(layer=layer, moved=moved, n=len(records), mean_target_prob=float(plain.mean()))
