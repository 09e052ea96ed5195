"""CounterFact metrics as ROME/MEMIT/AlphaEdit compute them (and the ECE paper reports them).

For every prompt the mean per-token negative log-likelihood (NLL) of ``' ' + target_new`` and of
``' ' + target_true`` is computed teacher forced (see :mod:`.scoring`). Per case:

* efficacy (ES): fraction of rewrite prompts with NLL(new) < NLL(true) (one prompt: 0 or 1);
* generalization (PS): the same over the paraphrase prompts;
* specificity (NS): fraction of neighbourhood prompts with NLL(true answer) < NLL(new);
* the magnitude variants (EM, PM, NM): mean of P(new) - P(true) (rewrite, paraphrase) and of
  P(true) - P(new) (neighbourhood), with P = exp(-NLL), as MEMIT's ``summarize.py`` computes them;
* fluency: ROME's weighted 2/3-gram entropy of texts generated from the generation prompts (the rewrite
  prompt when the record has none), see :mod:`.fluency`;
* consistency: ROME's TF-IDF reference score, only with :class:`~.fluency.ConsistencyResources` and records
  that know their relation and new-target ids (ROME format); otherwise None.

Differences from MEMIT's code, all deliberate: target tokens are the difference between the tokenisation of
the prompt and of prompt + target (MEMIT tokenises ``' ' + target`` alone, which adds a second BOS with
Llama tokenizers); the device follows the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from .data import EditRecord
from .fluency import ConsistencyResources, GenerationConfig, generate_texts, n_gram_entropy
from .scoring import EvaluationError, PromptEndHook, score_continuations

logger = logging.getLogger(__name__)

COUNTERFACT_METRICS: tuple[str, ...] = (
    "efficacy",
    "generalization",
    "specificity",
    "efficacy_magnitude",
    "generalization_magnitude",
    "specificity_magnitude",
    "fluency",
    "consistency",
)

NllPair = dict[str, float]  # {"target_new": mean NLL, "target_true": mean NLL}


def success_rate(pairs: Sequence[NllPair], *, new_should_win: bool) -> Optional[float]:
    """Fraction of pairs where the expected side has the strictly lower NLL (None for no pairs)."""
    if not pairs:
        return None
    if new_should_win:
        wins = [p["target_new"] < p["target_true"] for p in pairs]
    else:
        wins = [p["target_true"] < p["target_new"] for p in pairs]
    return sum(wins) / len(wins)


def magnitude(pairs: Sequence[NllPair], *, new_should_win: bool) -> Optional[float]:
    """Mean of P(expected) - P(other) with P = exp(-NLL) (None for no pairs)."""
    if not pairs:
        return None
    sign = 1.0 if new_should_win else -1.0
    diffs = [sign * (math.exp(-p["target_new"]) - math.exp(-p["target_true"])) for p in pairs]
    return sum(diffs) / len(diffs)


def _nll_pairs(
    model: torch.nn.Module,
    tok: Any,
    items: Sequence[tuple[str, str, str]],
    batch_size: int,
    progress: bool,
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[NllPair]:
    """items: (prompt, new target, true target) -> NLL pairs, scored in one flat batched pass."""
    prompts: list[str] = []
    targets: list[str] = []
    for prompt, new, true in items:
        prompts += [prompt, prompt]
        targets += [new, true]
    scores = score_continuations(
        model, tok, prompts, targets, batch_size=batch_size, progress=progress, desc="CounterFact NLL",
        prompt_end_hook=prompt_end_hook,
    )
    return [
        {"target_new": scores[2 * i].nll, "target_true": scores[2 * i + 1].nll} for i in range(len(items))
    ]


def _check_records(records: Sequence[EditRecord]) -> None:
    for record in records:
        if record.target_true is None:
            raise EvaluationError(
                f"record case_id={record.case_id!r} has no target_true: CounterFact metrics compare "
                "NLL(new) with NLL(true); evaluate such records with evaluate_zsre (token accuracy)"
            )


def evaluate_counterfact(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[EditRecord],
    *,
    batch_size: int = 16,
    generation: Union[GenerationConfig, bool, None] = True,
    consistency: Optional[ConsistencyResources] = None,
    details: bool = True,
    progress: bool = False,
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[dict[str, Any]]:
    """Per-case CounterFact metrics of ``model`` on ``records`` (see the module docstring).

    ``generation``: a :class:`GenerationConfig`, True (default config) or False/None (no fluency or
    consistency: both None). ``prompt_end_hook``: see :func:`~.scoring.score_continuations`. ``details`` adds the raw NLL pairs and generated texts under ``'details'``.
    Returns one JSON-serialisable dict per record: ``case_id`` and the :data:`COUNTERFACT_METRICS` (None
    where a metric does not apply or is unavailable).
    """
    _check_records(records)
    items: list[tuple[str, str, str]] = []
    spans: list[tuple[int, int, int]] = []  # per record: n rewrite, n paraphrase, n neighbourhood
    for record in records:
        assert record.target_true is not None
        items.append((record.prompt, record.target_new, record.target_true))
        items += [(p, record.target_new, record.target_true) for p in record.paraphrase_prompts]
        items += [
            (p, record.target_new, a)
            for p, a in zip(record.neighborhood_prompts, record.neighborhood_answers)
        ]
        spans.append((1, len(record.paraphrase_prompts), len(record.neighborhood_prompts)))
    pairs = _nll_pairs(model, tok, items, batch_size, progress, prompt_end_hook)

    texts_per_record = _generate_for_records(model, tok, records, generation, progress)
    if consistency is not None and any(r.relation_id is None or r.target_new_id is None for r in records):
        logger.warning(
            "consistency needs relation_id and target_new id (ROME-format CounterFact); "
            "records without them get consistency=None"
        )

    cases: list[dict[str, Any]] = []
    cursor = 0
    for record, (n_rw, n_para, n_nb), texts in zip(records, spans, texts_per_record):
        rewrite = pairs[cursor : cursor + n_rw]
        para = pairs[cursor + n_rw : cursor + n_rw + n_para]
        neigh = pairs[cursor + n_rw + n_para : cursor + n_rw + n_para + n_nb]
        cursor += n_rw + n_para + n_nb
        case: dict[str, Any] = {
            "case_id": record.case_id,
            "efficacy": success_rate(rewrite, new_should_win=True),
            "generalization": success_rate(para, new_should_win=True),
            "specificity": success_rate(neigh, new_should_win=False),
            "efficacy_magnitude": magnitude(rewrite, new_should_win=True),
            "generalization_magnitude": magnitude(para, new_should_win=True),
            "specificity_magnitude": magnitude(neigh, new_should_win=False),
            "fluency": n_gram_entropy(texts) if texts else None,
            "consistency": _consistency(consistency, record, texts),
        }
        if details:
            case["details"] = {
                "rewrite_prompts_probs": rewrite,
                "paraphrase_prompts_probs": para,
                "neighborhood_prompts_probs": neigh,
                "generated_texts": texts,
            }
        cases.append(case)
    return cases


def _generate_for_records(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[EditRecord],
    generation: Union[GenerationConfig, bool, None],
    progress: bool,
) -> list[list[str]]:
    if generation is None or generation is False:
        return [[] for _ in records]
    config = generation if isinstance(generation, GenerationConfig) else GenerationConfig()
    prompts_per_record = [list(r.generation_prompts) or [r.prompt] for r in records]
    flat = [p for prompts in prompts_per_record for p in prompts]
    texts: list[str] = []
    step = config.batch_size
    for start in tqdm(
        range(0, len(flat), step), desc="generation", disable=not progress or len(flat) <= step, leave=False
    ):
        texts += generate_texts(model, tok, flat[start : start + step], config)
    out: list[list[str]] = []
    cursor = 0
    for prompts in prompts_per_record:
        out.append(texts[cursor : cursor + len(prompts)])
        cursor += len(prompts)
    return out


def _consistency(
    resources: Optional[ConsistencyResources], record: EditRecord, texts: list[str]
) -> Optional[float]:
    if resources is None or not texts or record.relation_id is None or record.target_new_id is None:
        return None
    return resources.consistency(texts, record.relation_id, record.target_new_id)
