"""Sequential batched editing with evaluation, independent of the editing method.

The records are split into consecutive batches of ``batch_size``; ``edit_fn(model, tok, batch)`` edits the
model in place, batch after batch (sequential editing: each batch edits the already edited model). Two
evaluation protocols:

* ``'after_all'`` (default): every record is evaluated once, after the last batch. This measures
  forgetting of early edits, as AlphaEdit and NSE report sequential editing.
* ``'after_batch'``: each batch's records are evaluated right after that batch is written, as the ECE
  authors' and the Llama-3 editing study's scripts do.

With ``pre=True`` all records are first evaluated on the unedited model (the table's pre-edit row; for
zsRE these cases also serve as the reference for ``locality_agreement``). Only the ``edit_fn`` calls are
timed (with CUDA synchronisation when the model is on a GPU).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from .data import EditRecord
from .dispatch import evaluate_records, metric_kind
from .report import MetricSummary, summarize, write_json
from .scoring import EvaluationError, model_device

logger = logging.getLogger(__name__)

PROTOCOLS = ("after_all", "after_batch")

EditFn = Callable[[torch.nn.Module, Any, list[EditRecord]], Optional[dict[str, Any]]]
#: ``evaluate(model, tok, records, reference=pre_cases_or_None) -> per-case dicts``
Evaluator = Callable[..., list[dict[str, Any]]]


@dataclass
class RunResult:
    """The outcome of one method under one protocol; JSON-serialisable through :meth:`to_dict`."""

    method: str
    protocol: str
    kind: str
    n_edits: int
    batch_size: int
    cases: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, MetricSummary] = field(default_factory=dict)
    pre_cases: Optional[list[dict[str, Any]]] = None
    pre_summary: Optional[dict[str, MetricSummary]] = None
    seconds_per_batch: list[float] = field(default_factory=list)
    mean_seconds_per_batch: Optional[float] = None
    edit_info: list[Any] = field(default_factory=list)
    error: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def unavailable(
        cls,
        method: str,
        reason: str,
        *,
        kind: str,
        n_edits: int = 0,
        batch_size: int = 0,
        protocol: str = "after_all",
        meta: Optional[dict[str, Any]] = None,
    ) -> RunResult:
        """A result for a method that could not run; ``reason`` is shown in its table row."""
        return cls(
            method=method,
            protocol=protocol,
            kind=kind,
            n_edits=n_edits,
            batch_size=batch_size,
            error=reason,
            meta=dict(meta or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RunResult.from_dict: unknown keys {unknown}")
        return cls(**data)

    def save_json(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_dict` atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: Union[str, Path]) -> RunResult:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: tensors/arrays become lists (large ones a shape description), unknowns repr()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return value.detach().cpu().tolist()
        return f"<tensor shape={tuple(value.shape)} dtype={value.dtype}>"
    if hasattr(value, "tolist") and hasattr(value, "size"):  # numpy arrays and scalars
        return _jsonable(value.tolist()) if value.size <= 64 else f"<array shape={value.shape}>"
    return repr(value)


def _batches(records: Sequence[EditRecord], batch_size: int) -> list[list[EditRecord]]:
    return [list(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_protocol(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[EditRecord],
    edit_fn: EditFn,
    *,
    method: str,
    batch_size: int = 1,
    protocol: str = "after_all",
    pre: bool = True,
    evaluate: Optional[Evaluator] = None,
    eval_kwargs: Optional[dict[str, Any]] = None,
    progress: bool = True,
    meta: Optional[dict[str, Any]] = None,
) -> RunResult:
    """Edit ``records`` in consecutive batches with ``edit_fn`` and evaluate them under ``protocol``.

    ``evaluate`` defaults to :func:`~.dispatch.evaluate_records` with ``eval_kwargs``; a custom evaluator is
    called as ``evaluate(model, tok, records, reference=...)`` (``reference``: the pre-edit cases of those
    records, or None) and returns one dict per record with ``case_id`` and metric values. ``edit_fn`` may
    return a dict of information per batch, kept (JSON-safe) in ``RunResult.edit_info``.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise EvaluationError("run_protocol needs at least one record")
    ids = [r.case_id for r in records]
    if len(set(ids)) != len(ids):
        raise EvaluationError("records must have unique case_id values")
    kind = (eval_kwargs or {}).get("kind") or metric_kind(records)
    evaluator: Evaluator
    if evaluate is None:
        kwargs = dict(eval_kwargs or {})
        kwargs["kind"] = kind

        def evaluator(m: torch.nn.Module, t: Any, recs: Sequence[EditRecord], reference: Any = None) -> Any:
            return evaluate_records(m, t, recs, reference=reference, **kwargs)

    else:
        evaluator = evaluate

    device = model_device(model)
    pre_cases: Optional[list[dict[str, Any]]] = None
    if pre:
        logger.info("%s: evaluating %d records before editing", method, len(records))
        pre_cases = evaluator(model, tok, list(records), reference=None)
    pre_by_id = {c["case_id"]: c for c in pre_cases} if pre_cases is not None else None

    def reference_for(batch: Sequence[EditRecord]) -> Optional[list[dict[str, Any]]]:
        if pre_by_id is None:
            return None
        return [pre_by_id[r.case_id] for r in batch if r.case_id in pre_by_id]

    batches = _batches(records, batch_size)
    seconds: list[float] = []
    edit_info: list[Any] = []
    post_cases: list[dict[str, Any]] = []
    for batch in tqdm(batches, desc=f"{method} ({protocol})", unit="batch", disable=not progress):
        _synchronize(device)
        start = time.perf_counter()
        info = edit_fn(model, tok, batch)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        edit_info.append(_jsonable(info))
        if protocol == "after_batch":
            post_cases.extend(evaluator(model, tok, batch, reference=reference_for(batch)))
    if protocol == "after_all":
        logger.info("%s: evaluating %d records after %d batches", method, len(records), len(batches))
        post_cases = evaluator(model, tok, list(records), reference=reference_for(records))

    return RunResult(
        method=method,
        protocol=protocol,
        kind=kind,
        n_edits=len(records),
        batch_size=batch_size,
        cases=_jsonable(post_cases),
        summary=summarize(post_cases, kind=kind),
        pre_cases=None if pre_cases is None else _jsonable(pre_cases),
        pre_summary=None if pre_cases is None else summarize(pre_cases, kind=kind),
        seconds_per_batch=seconds,
        mean_seconds_per_batch=sum(seconds) / len(seconds),
        edit_info=edit_info,
        meta=_jsonable(dict(meta or {})),
    )
