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
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
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
            if position == "subject_last":
                pos = subject_last_index(tok, prefix + prompt[:cut], subject)
            else:
                pos = len(prompt_ids) - 1
            if p_i == 0:
                plain_rows.append(len(seqs))
            seqs.append(full)
            rec_index.append(r_i)
            positions.append(pos)
            spans.append((len(prompt_ids), len(full)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    target_mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for i, (lo, hi) in enumerate(spans):
        target_mask[i, lo - 1 : hi - 1] = True
    next_ids = torch.roll(ids, -1, dims=1)
    rows = torch.arange(len(seqs), device=device)
    pos_t = torch.tensor(positions, device=device)
    rec_t = torch.tensor(rec_index, device=device)

    config: Any = model.config
    hidden = int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd)
    delta = torch.zeros((len(records), hidden), device=device, dtype=torch.float32, requires_grad=True)
    init_norm: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden_states = output[0] if isinstance(output, tuple) else output
        if "norm" not in init_norm:
            init_norm["norm"] = hidden_states[rows, pos_t].detach().float().norm(dim=-1)
        add = torch.zeros_like(hidden_states)
        add[rows, pos_t] = delta[rec_t].to(hidden_states.dtype)
        hidden_states = hidden_states + add
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = blocks[layer].register_forward_hook(hook)
    try:
        optimizer = torch.optim.Adam([delta], lr=lr)
        n_prefix = len(prefixes)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            token_nll = -torch.log_softmax(logits, -1).gather(2, next_ids[..., None]).squeeze(-1)
            per_row = (token_nll * target_mask).sum(1) / target_mask.sum(1)
            loss = per_row.sum() / n_prefix
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if clamp_factor is not None:
                with torch.no_grad():
                    plain_norm = init_norm["norm"][torch.tensor(plain_rows, device=device)]
                    max_norm = clamp_factor * plain_norm
                    scale = torch.clamp(max_norm / delta.norm(dim=-1).clamp_min(1e-12), max=1.0)
                    delta.mul_(scale[:, None])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            probs = torch.softmax(logits, -1).gather(2, next_ids[..., None]).squeeze(-1)
            mean_prob = (probs * target_mask).sum(1) / target_mask.sum(1)
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    plain = mean_prob[torch.tensor(plain_rows, device=device)]
    moved = float((plain > threshold).float().mean()) * 100.0
    return ProbeResult(layer=layer, moved=moved, n=len(records), mean_target_prob=float(plain.mean()))
