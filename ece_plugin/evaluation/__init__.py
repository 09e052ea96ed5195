"""Evaluation faithful to ROME/MEMIT/AlphaEdit (the protocol the ECE paper follows).

* :func:`evaluate_counterfact`: efficacy / generalization / specificity from NLL comparisons of the new and
  true targets (plus MEMIT's magnitude variants), fluency (n-gram entropy), consistency (TF-IDF, optional).
* :func:`evaluate_zsre`: teacher-forced top-1 token accuracy (efficacy, generalization, specificity).
* :func:`evaluate_records`: dispatch by record kind.
* :func:`run_protocol`: sequential batched editing with evaluation after all batches or after each batch.
* :func:`summarize`, :func:`format_table`: mean ± standard error and the ECE paper's Table-1 layout.
"""

from __future__ import annotations

from .counterfact import COUNTERFACT_METRICS, evaluate_counterfact
from .dispatch import evaluate_records, metric_kind
from .fluency import (
    CONSISTENCY_UNAVAILABLE,
    ConsistencyResources,
    GenerationConfig,
    compute_n_gram_entropy,
    generate_texts,
    n_gram_entropy,
)
from .protocol import PROTOCOLS, RunResult, run_protocol
from .report import format_table, mean_sem, results_csv, summarize, write_csv, write_json
from .scoring import ContinuationScore, EvaluationError, score_continuations
from .zsre import ZSRE_METRICS, evaluate_zsre, token_accuracy

__all__ = [
    "CONSISTENCY_UNAVAILABLE",
    "COUNTERFACT_METRICS",
    "PROTOCOLS",
    "ZSRE_METRICS",
    "ConsistencyResources",
    "ContinuationScore",
    "EvaluationError",
    "GenerationConfig",
    "RunResult",
    "compute_n_gram_entropy",
    "evaluate_counterfact",
    "evaluate_records",
    "evaluate_zsre",
    "format_table",
    "generate_texts",
    "mean_sem",
    "metric_kind",
    "n_gram_entropy",
    "results_csv",
    "run_protocol",
    "score_continuations",
    "summarize",
    "token_accuracy",
    "write_csv",
    "write_json",
]
