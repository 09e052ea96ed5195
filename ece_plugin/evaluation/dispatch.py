"""Choosing the metric family for a list of records and evaluating them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from .counterfact import evaluate_counterfact
from .data import EditRecord
from .fluency import ConsistencyResources, GenerationConfig
from .scoring import EvaluationError, PromptEndHook
from .zsre import evaluate_zsre

METRIC_KINDS = ("counterfact", "zsre")


def metric_kind(records: Sequence[EditRecord]) -> str:
    """'counterfact' or 'zsre': the metric family of ``records``.

    CounterFact and zsRE records use their own metrics; plain records use the CounterFact metrics (NLL of the
    new vs the true target) when every record knows its true target, else zsRE's token accuracy. Records of
    different kinds cannot be evaluated together.
    """
    if not records:
        raise EvaluationError("no records to evaluate")
    kinds = {r.kind for r in records}
    if len(kinds) > 1:
        raise EvaluationError(f"records of different kinds {sorted(kinds)} cannot be evaluated together")
    kind = kinds.pop()
    if kind == "plain":
        return "counterfact" if all(r.target_true is not None for r in records) else "zsre"
    if kind not in METRIC_KINDS:
        raise EvaluationError(f"unknown record kind {kind!r}")
    return kind


def evaluate_records(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[EditRecord],
    *,
    kind: Optional[str] = None,
    batch_size: int = 16,
    generation: Union[GenerationConfig, bool, None] = True,
    consistency: Optional[ConsistencyResources] = None,
    loc_suffix: str = "?",
    reference: Optional[Sequence[dict[str, Any]]] = None,
    details: bool = True,
    progress: bool = False,
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[dict[str, Any]]:
    """Evaluate ``records`` with the metrics of ``kind`` (default: :func:`metric_kind`).

    CounterFact uses ``generation``/``consistency`` (see :func:`evaluate_counterfact`); zsRE uses
    ``loc_suffix``/``reference`` (see :func:`evaluate_zsre`); the other family's options are ignored.
    ``prompt_end_hook``: see :func:`~.scoring.score_continuations`.
    """
    kind = kind or metric_kind(records)
    if kind == "counterfact":
        return evaluate_counterfact(
            model,
            tok,
            records,
            batch_size=batch_size,
            generation=generation,
            consistency=consistency,
            details=details,
            progress=progress,
            prompt_end_hook=prompt_end_hook,
        )
    if kind == "zsre":
        return evaluate_zsre(
            model,
            tok,
            records,
            batch_size=batch_size,
            loc_suffix=loc_suffix,
            reference=reference,
            details=details,
            progress=progress,
            prompt_end_hook=prompt_end_hook,
        )
    raise EvaluationError(f"kind must be one of {METRIC_KINDS}, got {kind!r}")
