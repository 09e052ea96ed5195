"""Teacher-forced scoring of ``prompt + ' ' + target`` continuations, shared by CounterFact and zsRE metrics.

Target tokens are found as the difference between the tokenisation of ``prompt`` and of
``prompt + ' ' + target`` (both with the tokenizer's special tokens), so a tokenizer that prepends BOS
counts it once, in the prompt, and never as a target token. Sequences are padded on the right by this
module (the tokenizer's ``padding_side`` is not used and is left untouched), with an attention mask; a
tokenizer configured for left padding therefore gives the same scores.

One forward pass per chunk gives, for every target token ``y_j`` at position ``t_j``, the log-probability
``log p(y_j | x_<t_j)`` and whether ``argmax p(. | x_<t_j) == y_j`` (the logits at position ``t_j - 1``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Called before a forward with the 0-based position at which all of its rows' prompts end, and with None once
#: the scoring is over (see :func:`score_continuations`).
PromptEndHook = Callable[[Optional[int]], None]


class EvaluationError(ValueError):
    """Evaluation cannot proceed with the given records, model or tokenizer."""


@dataclass
class ContinuationScore:
    """Scores of one teacher-forced continuation."""

    target_ids: list[int]
    token_logprobs: list[float]
    predicted_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.target_ids)

    @property
    def nll(self) -> float:
        """Mean per-token negative log-likelihood of the target tokens."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def token_correct(self) -> list[bool]:
        return [int(p) == int(t) for p, t in zip(self.predicted_ids, self.target_ids)]

    @property
    def token_accuracy(self) -> float:
        """Fraction of target tokens that are the top-1 prediction (teacher forced)."""
        correct = self.token_correct
        return sum(correct) / len(correct)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def pad_token_id(tok: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked and never scored)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            return value
    return 0


def _input_ids(tok: Any, text: str) -> list[int]:
    ids = tok(text)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def encode_continuation(tok: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + ' ' + target`` and the number of leading prompt tokens.

    The prompt tokens are those of ``tok(prompt)``; if the tokenizer merges characters across the
    prompt/target boundary, the prompt part is the longest common prefix (the merged token becomes a target
    token). Raises :class:`EvaluationError` when no target token remains.
    """
    if not target.strip():
        raise EvaluationError(f"empty target for prompt {prompt!r}")
    prompt_ids = _input_ids(tok, prompt)
    full_ids = _input_ids(tok, f"{prompt} {target}")
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] != prompt_ids:
        common = 0
        for a, b in zip(prompt_ids, full_ids):
            if a != b:
                break
            common += 1
        logger.debug(
            "tokenisation of %r changes at the target boundary; prompt part = %d tokens", prompt, common
        )
        n_prompt = common
    if n_prompt == 0:
        # A tokenizer without BOS and a prompt merged entirely into the target: the first token cannot be scored.
        raise EvaluationError(f"prompt {prompt!r} has no token to condition the target {target!r} on")
    if len(full_ids) <= n_prompt:
        raise EvaluationError(f"target {target!r} adds no token to prompt {prompt!r}")
    return full_ids, n_prompt


def _forward_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise EvaluationError(f"model output of type {type(out).__name__} has no logits")
    return logits


def score_continuations(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[ContinuationScore]:
    """Teacher-forced scores of ``prompts[i] + ' ' + targets[i]`` for every i, in chunks of ``batch_size``.

    ``prompt_end_hook`` is for an edited model whose forward reads one position of every row (GRACE's codebook
    reads the last prompt token): each chunk then holds rows whose prompts end at the same position, the hook is
    called with that position (0-based) right before the chunk's forward, and with None when the scoring ends.
    Without it the chunks are the rows in order."""
    if len(prompts) != len(targets):
        raise EvaluationError(f"{len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_continuation(tok, p, t) for p, t in zip(prompts, targets)]
    device = model_device(model)
    pad = pad_token_id(tok)
    results: list[Optional[ContinuationScore]] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        chunks = _chunks(encoded, batch_size, by_prompt_end=prompt_end_hook is not None)
        for rows in tqdm(chunks, desc=desc, disable=not progress or len(encoded) <= batch_size, leave=False):
            if prompt_end_hook is not None:
                prompt_end_hook(encoded[rows[0]][1] - 1)
            for row, score in zip(rows, _score_chunk(model, [encoded[i] for i in rows], pad, device)):
                results[row] = score
    finally:
        if prompt_end_hook is not None:
            prompt_end_hook(None)
        model.train(was_training)
    return [score for score in results if score is not None]


def _chunks(encoded: Sequence[tuple[list[int], int]], batch_size: int, *, by_prompt_end: bool) -> list[list[int]]:
    """Row indices per forward: in order, or grouped by prompt length so that a forward's prompts end together."""
    if not by_prompt_end:
        return [list(range(s, min(s + batch_size, len(encoded)))) for s in range(0, len(encoded), batch_size)]
    groups: dict[int, list[int]] = {}
    for row, (_, n_prompt) in enumerate(encoded):
        groups.setdefault(n_prompt, []).append(row)
    return [rows[s : s + batch_size] for _, rows in sorted(groups.items()) for s in range(0, len(rows), batch_size)]


def _score_chunk(
    model: torch.nn.Module, chunk: Sequence[tuple[list[int], int]], pad: int, device: torch.device
) -> list[ContinuationScore]:
    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (ids, _) in enumerate(chunk):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    with torch.no_grad():
        logits = _forward_logits(model, input_ids.to(device), attention_mask.to(device))
        scores = []
        for row, (ids, n_prompt) in enumerate(chunk):
            positions = torch.arange(n_prompt - 1, len(ids) - 1, device=logits.device)
            target = torch.tensor(ids[n_prompt:], dtype=torch.long, device=logits.device)
            log_probs = torch.log_softmax(logits[row, positions].float(), dim=-1)
            token_lp = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            predicted = log_probs.argmax(dim=-1)
            scores.append(
                ContinuationScore(
                    target_ids=ids[n_prompt:],
                    token_logprobs=[float(x) for x in token_lp.cpu()],
                    predicted_ids=[int(x) for x in predicted.cpu()],
                )
            )
    return scores


def optional_mean(values: Sequence[float]) -> Optional[float]:
    """Mean of ``values``, None when empty."""
    return sum(values) / len(values) if values else None
