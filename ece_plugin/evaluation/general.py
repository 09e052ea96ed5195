"""What an edit does to the rest of the model: perplexity on plain text, retention of facts never edited,
fluency of free generation.

* :func:`perplexity`: exp of the mean next-token NLL over a text cut into windows of ``window`` tokens (each
  window encoded on its own, so a tokenizer that adds BOS adds it to every window; BOS is never a target), the
  first ``max_tokens`` tokens of the text. AlphaEdit and NSE report the same kind of figure along their
  sequential-editing curves.
* :func:`retention`: facts that are known and never edited, scored as before any edit: the teacher-forced
  top-1 token accuracy of the true answer after the prompt (CounterFact ``ground_truth``, zsRE ``answers[0]``)
  and, where the record has a counterfactual target, whether the true answer still beats it in mean per-token
  NLL (CounterFact's efficacy comparison, the other way round).
* :func:`generation_fluency`: ROME's n-gram entropy of greedy continuations of fixed prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .data import EditRecord
from .fluency import GenerationConfig, generate_texts, n_gram_entropy
from .scoring import EvaluationError, PromptEndHook, _input_ids, model_device, score_continuations


def read_text(path: Path) -> str:
    """A UTF-8 text file for :func:`perplexity` (an error names the file when it is missing or empty)."""
    if not Path(path).is_file():
        raise EvaluationError(f"perplexity text file not found: {path}")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvaluationError(f"perplexity text file is empty: {path}")
    return text


def text_windows(tok: Any, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """The text (lines joined by spaces) encoded once without special tokens, its first ``max_tokens`` tokens
    cut into windows of ``window`` tokens, each preceded by BOS when the tokenizer adds one itself."""
    if window < 2:
        raise EvaluationError(f"perplexity window must be >= 2 tokens, got {window}")
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    joined = joined[: 16 * max_tokens]  # far more characters than max_tokens tokens need
    ids = [int(i) for i in tok(joined, add_special_tokens=False, verbose=False)["input_ids"]][:max_tokens]
    probe = _input_ids(tok, "a")
    bos = getattr(tok, "bos_token_id", None)
    prefix = [int(bos)] if bos is not None and probe and probe[0] == bos else []
    windows = [prefix + ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, windows: Sequence[Sequence[int]], *, pad: int = 0, batch_size: int = 16
) -> dict[str, float]:
    """``{'perplexity', 'nll', 'n_tokens'}`` of ``model`` over pre-encoded ``windows`` (see
    :func:`text_windows`)."""
    if not windows:
        raise EvaluationError("no text windows to compute perplexity on")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, n_tokens = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, w in enumerate(chunk):
                ids[i, : len(w)] = torch.tensor(list(w), dtype=torch.long)
                mask[i, : len(w)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:].to(device)
            valid = mask[:, 1:].to(device).bool()
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            total_nll -= float(picked[valid].double().sum())
            n_tokens += int(valid.sum())
    finally:
        model.train(was_training)
    nll = total_nll / n_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "n_tokens": float(n_tokens)}


def retention_pairs(records: Sequence[EditRecord]) -> list[tuple[str, str, Optional[str]]]:
    """(prompt, true answer, counterfactual target or None) of every record that knows its true answer."""
    pairs = [(r.prompt, r.target_true, r.target_new) for r in records if r.target_true]
    if not pairs:
        raise EvaluationError("no retention record has a true answer (CounterFact ground_truth / zsRE answers)")
    return [(p, str(t), n) for p, t, n in pairs]


def retention(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str, Optional[str]]],
    *,
    batch_size: int = 16,
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> dict[str, Optional[float]]:
    """``{'retention_accuracy', 'retention_preference', 'n'}``: the mean top-1 token accuracy of the true
    answers, and the share of pairs whose true answer has a lower mean NLL than the counterfactual one (None
    when no pair has one)."""
    prompts = [p for p, _, _ in pairs]
    true_scores = score_continuations(model, tok, prompts, [t for _, t, _ in pairs], batch_size=batch_size,
                                      prompt_end_hook=prompt_end_hook)
    accuracy = sum(s.token_accuracy for s in true_scores) / len(true_scores)
    with_new = [(i, n) for i, (_, _, n) in enumerate(pairs) if n]
    preference: Optional[float] = None
    if with_new:
        new_scores = score_continuations(
            model, tok, [prompts[i] for i, _ in with_new], [n for _, n in with_new], batch_size=batch_size,
            prompt_end_hook=prompt_end_hook,
        )
        wins = [true_scores[i].nll < s.nll for (i, _), s in zip(with_new, new_scores)]
        preference = sum(wins) / len(wins)
    return {"retention_accuracy": accuracy, "retention_preference": preference, "n": float(len(pairs))}


def generation_fluency(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], config: Optional[GenerationConfig] = None
) -> float:
    """ROME's n-gram entropy (bits) of greedy continuations of ``prompts``."""
    if not prompts:
        raise EvaluationError("no prompts to measure fluency on")
    return n_gram_entropy(generate_texts(model, tok, list(prompts), config or GenerationConfig()))

