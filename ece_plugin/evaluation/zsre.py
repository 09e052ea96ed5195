"""zsRE metrics: teacher-forced top-1 token accuracy, as MEMIT/AlphaEdit (and the ECE paper) report them.

For a prompt and a target, the target tokens of ``prompt + ' ' + target`` are scored teacher forced (see
:mod:`.scoring`); a token is correct when the argmax of the logits at the previous position is that token.
A prompt's accuracy is the fraction of its target tokens that are correct. Per case:

* efficacy: accuracy of ``target_new`` (zsRE ``alt``) on the edit prompt (``src``);
* generalization: accuracy of ``target_new`` on the paraphrase (``rephrase``), mean over paraphrases;
* specificity: MEMIT's definition: accuracy of the neighbourhood answer (``loc_ans``) tokens on the
  neighbourhood question (``loc``) followed by ``'?'`` (MEMIT builds ``loc + '?' + answer-prefix``). This is an
  absolute score against the true answer: the unedited model does not reach 100%.
* locality_agreement (only when pre-edit cases with details are passed as ``reference``): EasyEdit's
  definition of zsRE locality: the fraction of ``loc_ans`` token positions where the edited model's top-1
  prediction equals the unedited model's (EasyEdit scores ``loc + ' ' + loc_ans`` without the ``'?'``;
  here the same prompt as for ``specificity`` is used for both models).

MEMIT takes the edit target from ``answers[0]``; this project follows EasyEdit and the bundled data
description (``alt`` is the new target, ``answers[0]`` the old one); see :mod:`ece_plugin.evaluation.data`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch

from .data import EditRecord
from .scoring import ContinuationScore, PromptEndHook, score_continuations

logger = logging.getLogger(__name__)

ZSRE_METRICS: tuple[str, ...] = ("efficacy", "generalization", "specificity", "locality_agreement")


def token_accuracy(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[float]:
    """Teacher-forced top-1 accuracy of each ``targets[i]`` after ``prompts[i]`` (EasyEdit's
    ``test_prediction_acc`` / MEMIT's per-token zsRE check, averaged over the target's tokens)."""
    return [
        s.token_accuracy for s in score_continuations(model, tok, prompts, targets, batch_size=batch_size)
    ]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def evaluate_zsre(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[EditRecord],
    *,
    batch_size: int = 16,
    loc_suffix: str = "?",
    reference: Optional[Sequence[dict[str, Any]]] = None,
    details: bool = True,
    progress: bool = False,
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[dict[str, Any]]:
    """Per-case zsRE metrics of ``model`` on ``records`` (see the module docstring).

    ``loc_suffix`` is appended to each neighbourhood question (MEMIT: ``'?'``; use ``''`` for EasyEdit's
    prompt). ``reference``: pre-edit cases of the same records (with ``details``) to compute
    ``locality_agreement``. ``prompt_end_hook``: see :func:`~.scoring.score_continuations`. Returns one JSON-serialisable dict per record.
    """
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[tuple[int, int]] = []
    for record in records:
        prompts.append(record.prompt)
        targets.append(record.target_new)
        prompts += list(record.paraphrase_prompts)
        targets += [record.target_new] * len(record.paraphrase_prompts)
        prompts += [q + loc_suffix for q in record.neighborhood_prompts]
        targets += list(record.neighborhood_answers)
        spans.append((len(record.paraphrase_prompts), len(record.neighborhood_prompts)))
    scores = score_continuations(
        model, tok, prompts, targets, batch_size=batch_size, progress=progress, desc="zsRE accuracy",
        prompt_end_hook=prompt_end_hook,
    )
    ref_by_id = {c["case_id"]: c for c in reference} if reference is not None else {}

    cases: list[dict[str, Any]] = []
    cursor = 0
    for record, (n_para, n_nb) in zip(records, spans):
        rewrite = scores[cursor]
        para = scores[cursor + 1 : cursor + 1 + n_para]
        neigh = scores[cursor + 1 + n_para : cursor + 1 + n_para + n_nb]
        cursor += 1 + n_para + n_nb
        case: dict[str, Any] = {
            "case_id": record.case_id,
            "efficacy": rewrite.token_accuracy,
            "generalization": _mean([s.token_accuracy for s in para]),
            "specificity": _mean([s.token_accuracy for s in neigh]),
            "locality_agreement": _agreement(ref_by_id.get(record.case_id), neigh),
        }
        if details:
            case["details"] = {
                "rewrite_correct": rewrite.token_correct,
                "paraphrase_correct": [s.token_correct for s in para],
                "neighborhood_correct": [s.token_correct for s in neigh],
                "neighborhood_predictions": [s.predicted_ids for s in neigh],
            }
        cases.append(case)
    return cases


def _agreement(
    reference_case: Optional[dict[str, Any]], neigh: Sequence[ContinuationScore]
) -> Optional[float]:
    if reference_case is None or not neigh:
        return None
    ref_preds = reference_case.get("details", {}).get("neighborhood_predictions")
    if ref_preds is None or len(ref_preds) != len(neigh):
        return None
    values = []
    for ref, score in zip(ref_preds, neigh):
        if len(ref) != len(score.predicted_ids):
            return None
        values.append(sum(int(a) == int(b) for a, b in zip(ref, score.predicted_ids)) / len(ref))
    return _mean(values)
