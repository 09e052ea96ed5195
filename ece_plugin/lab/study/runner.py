"""Run editing methods over records with the evaluation protocol, restoring the model between methods.

:func:`run_methods` is what ``ece-plugin demo`` and ``ece-plugin bench`` use: for each method it checks
that the method can run (else records a one-line reason), restores the edited weights to the snapshot,
resets sequential state, makes sure statistics exist (outside the timed edits), then hands the method's
batch edit to :func:`ece_plugin.evaluation.run_protocol` (sequential batches, evaluated after all batches
or after each batch), and restores the model again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .baselines import BatchOutcome, EditMethod, prompt_end_hook
from .common import PeakMemory, measure_peak_memory, restore_weights, snapshot_weights

logger = logging.getLogger(__name__)

PROTOCOLS = ("after_all", "after_batch")


@dataclass
class MethodRun:
    """One method's run: the protocol's result (None when it could not run) plus timing and traces."""

    name: str
    available: bool
    reason: str = ""
    result: Any = None  # ece_plugin.evaluation RunResult
    batch_seconds: list[float] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    peak_memory: Optional[PeakMemory] = None
    via: Optional[str] = None  # BatchOutcome.via of its batches; None before any batch

    @property
    def mean_batch_seconds(self) -> Optional[float]:
        return sum(self.batch_seconds) / len(self.batch_seconds) if self.batch_seconds else None

    def to_dict(self) -> dict[str, Any]:
        result = self.result.to_dict() if hasattr(self.result, "to_dict") else self.result
        return {
            "method": self.name,
            "available": self.available,
            "reason": self.reason,
            "via": self.via,
            "edit_seconds_per_batch": self.batch_seconds,
            "mean_edit_seconds_per_batch": self.mean_batch_seconds,
            "peak_memory": self.peak_memory.to_dict() if self.peak_memory else None,
            "result": result,
        }


def stage_seconds(trace: Optional[dict[str, Any]]) -> dict[str, float]:
    """Seconds per ECE stage from a trace dict (empty when the trace has none)."""
    if not trace:
        return {}
    for key in ("stage_seconds", "timings", "wall_time", "seconds"):
        value = trace.get(key)
        if isinstance(value, dict):
            return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float))}
    return {}


def as_requests(records: Sequence[Any]) -> list[dict[str, Any]]:
    """EasyEdit request dicts of records (EditRecord or already a dict)."""
    return [r.to_request() if hasattr(r, "to_request") else dict(r) for r in records]


def batch_edit_fn(method: EditMethod, run: MethodRun) -> Any:
    """The callable ``run_protocol`` calls once per batch: edits in place, records time and trace."""

    def edit(model: torch.nn.Module, tok: Any, records: Sequence[Any]) -> dict[str, Any]:
        requests = as_requests(records)
        outcome: BatchOutcome = method.edit_batch(model, tok, requests)
        run.batch_seconds.append(outcome.seconds)
        run.via = outcome.via
        if outcome.trace is not None:
            run.traces.append(outcome.trace)
        return {"edit_seconds": outcome.seconds, "stage_seconds": stage_seconds(outcome.trace)}

    return edit


@contextmanager
def _fresh_method(
    method: EditMethod, model: torch.nn.Module, tok: Any, snapshot: Optional[dict[str, torch.Tensor]] = None
) -> Iterator[None]:
    """``method`` reset and prepared on ``model`` (set to ``snapshot`` first when given). On exit, even on an
    error, the method is reset and the weights it edits are restored: to ``snapshot`` when given, else to what
    they were on entry."""
    on_entry = snapshot_weights(model, method.edited_weight_names(model))
    if snapshot is not None:
        restore_weights(model, snapshot)
    try:
        method.reset(model)
        method.prepare(model, tok)
        yield
    finally:
        restore_weights(model, on_entry)
        if snapshot is not None:
            restore_weights(model, snapshot)
        method.reset(model)


def run_method(
    method: EditMethod,
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    *,
    batch_size: int,
    protocol: str = "after_all",
    snapshot: Optional[dict[str, torch.Tensor]] = None,
    eval_kwargs: Optional[dict[str, Any]] = None,
    pre: bool = True,
    trace_python_memory: bool = False,
    progress: bool = True,
) -> MethodRun:
    """Run one method sequentially over ``records`` in batches; the model is restored afterwards."""
    from ... import evaluation

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ok, reason = method.availability(model)
    run = MethodRun(name=method.name, available=ok, reason=reason)
    kind = (eval_kwargs or {}).get("kind") or evaluation.metric_kind(list(records))
    if not ok:
        logger.warning("%s cannot run: %s", method.name, reason)
        run.result = evaluation.RunResult.unavailable(
            method.name, reason, kind=kind, n_edits=len(records), batch_size=batch_size, protocol=protocol
        )
        return run
    try:
        with _fresh_method(method, model, tok, snapshot):
            device = next(model.parameters()).device
            with measure_peak_memory(device, trace_python=trace_python_memory) as peak:
                run.result = evaluation.run_protocol(
                    model,
                    tok,
                    list(records),
                    batch_edit_fn(method, run),
                    method=method.name,
                    batch_size=batch_size,
                    protocol=protocol,
                    pre=pre,
                    eval_kwargs=_with_prompt_end_hook(method, eval_kwargs),
                    progress=progress,
                )
            run.peak_memory = peak
    except Exception as exc:  # noqa: BLE001 - one failing method must not end a comparison
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        run.available = False
        run.reason = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:240]
        logger.error("%s %s", method.name, run.reason)
        logger.debug("%s: traceback", method.name, exc_info=True)
        run.result = evaluation.RunResult.unavailable(
            method.name, run.reason, kind=kind, n_edits=len(records), batch_size=batch_size, protocol=protocol
        )
    return run


def _with_prompt_end_hook(method: EditMethod, eval_kwargs: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``eval_kwargs`` with the method's ``prompt_end_hook`` (an editor that reads where a prompt ends: GRACE)."""
    hook = prompt_end_hook(method)
    return eval_kwargs if hook is None else {**(eval_kwargs or {}), "prompt_end_hook": hook}


def time_method(
    method: EditMethod, model: torch.nn.Module, tok: Any, records: Sequence[Any], *, batch_size: int
) -> list[float]:
    """Seconds per batch of one more edit-only run (no evaluation) over ``records`` in sequential batches of
    ``batch_size``, from a reset method; the model is restored afterwards."""
    seconds: list[float] = []
    with _fresh_method(method, model, tok):
        for start in range(0, len(records), batch_size):
            seconds.append(
                method.edit_batch(model, tok, as_requests(records[start : start + batch_size])).seconds
            )
    return seconds


def run_methods(
    methods: Sequence[EditMethod],
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    *,
    batch_size: int,
    protocol: str = "after_all",
    eval_kwargs: Optional[dict[str, Any]] = None,
    record_limits: Optional[dict[str, int]] = None,
) -> list[MethodRun]:
    """:func:`run_method` for each method on the same records and batches; a method named in ``record_limits``
    edits only the first that many records (the same batches, cut short)."""
    from ... import evaluation

    runs: list[MethodRun] = []
    kind = (eval_kwargs or {}).get("kind") or evaluation.metric_kind(list(records))
    for method in methods:
        limit = (record_limits or {}).get(method.name)
        mine = records[:limit] if limit is not None else records
        logger.info(
            "running %s (%d records, batches of %d, %s)", method.name, len(mine), batch_size, protocol
        )
        have_pre = any(r.available and r.result is not None and r.result.pre_summary for r in runs)
        runs.append(
            run_method(
                method,
                model,
                tok,
                mine,
                batch_size=batch_size,
                protocol=protocol,
                eval_kwargs=eval_kwargs,
                # The pre-edit evaluation is the same for every method: once, except for zsRE where each
                # run's locality is measured against its own pre-edit answers.
                pre=(not have_pre) or kind == "zsre",
            )
        )
    return runs
