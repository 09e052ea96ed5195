"""Summary statistics, the ECE paper's Table-1 layout, and atomic JSON/CSV writing.

Summary: for each metric, the mean over the cases where it is defined, the standard error of the mean
(sample standard deviation with ``ddof=1`` divided by sqrt(n); None for a single case) and n. For CounterFact
the summary also has ``score``: the harmonic mean of the efficacy, generalization and specificity means
(MEMIT's ``summarize.py``).

Table: rows are methods (the pre-edit row first), columns Eff., Gen., Spe., Flu., Consis. for CounterFact
and Eff., Gen., Spe. for zsRE, as ``mean ± sem`` in percent (every metric times 100, as MEMIT's summary
and the papers' tables print them, so fluency 6.22 bits shows as 622.00), plus the mean edit time per
batch in seconds. A method that could not run gets one row carrying its reason.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from .protocol import RunResult

from ..method import atomic
from .fluency import CONSISTENCY_UNAVAILABLE

MetricSummary = dict[str, Any]  # {"mean": float, "sem": float | None, "n": int}

TABLE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "counterfact": [
        ("Eff.", "efficacy"),
        ("Gen.", "generalization"),
        ("Spe.", "specificity"),
        ("Flu.", "fluency"),
        ("Consis.", "consistency"),
    ],
    "zsre": [("Eff.", "efficacy"), ("Gen.", "generalization"), ("Spe.", "specificity")],
}
DATASET_NAMES = {"counterfact": "CounterFact", "zsre": "zsRE"}
PRE_EDIT_NAME = "Pre-edited"
_NON_METRIC_KEYS = frozenset({"case_id", "details"})


# ---------------------------------------------------------------------------------------------- statistics
def mean_sem(values: Sequence[float]) -> MetricSummary:
    """Mean, standard error (sample std / sqrt(n), None when n < 2) and n of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_sem needs at least one value")
    mean = sum(values) / n
    sem: Optional[float] = None
    if n > 1:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        sem = math.sqrt(variance) / math.sqrt(n)
    return {"mean": mean, "sem": sem, "n": n}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarize(cases: Sequence[Mapping[str, Any]], kind: Optional[str] = None) -> dict[str, MetricSummary]:
    """Per-metric :func:`mean_sem` over ``cases`` (None values are skipped; a metric with no value at all is
    absent). ``kind='counterfact'`` (inferred when the cases have ``efficacy_magnitude``) adds ``score``."""
    keys: list[str] = []
    for case in cases:
        for key, value in case.items():
            if key in _NON_METRIC_KEYS or key in keys:
                continue
            if value is None or _is_number(value):
                keys.append(key)
    summary: dict[str, MetricSummary] = {}
    for key in keys:
        values = [float(c[key]) for c in cases if _is_number(c.get(key))]
        if values:
            summary[key] = mean_sem(values)
    if kind is None and any("efficacy_magnitude" in c for c in cases):
        kind = "counterfact"
    if kind == "counterfact":
        parts = [summary.get(k) for k in ("efficacy", "generalization", "specificity")]
        if all(p is not None for p in parts):
            means = [float(p["mean"]) for p in parts if p is not None]
            score = 0.0 if min(means) <= 0 else len(means) / sum(1.0 / m for m in means)
            summary["score"] = {
                "mean": score,
                "sem": None,
                "n": min(int(p["n"]) for p in parts if p is not None),
            }
    return summary


# ---------------------------------------------------------------------------------------------- table
def format_cell(summary: Optional[Mapping[str, Any]], scale: float = 100.0, digits: int = 2) -> str:
    """``'mean ± sem'`` scaled (``'n/a'`` when missing; no ``±`` when the sem is unknown)."""
    if summary is None or summary.get("mean") is None:
        return "n/a"
    text = f"{float(summary['mean']) * scale:.{digits}f}"
    if summary.get("sem") is not None:
        text += f" ± {float(summary['sem']) * scale:.{digits}f}"
    return text


def _table_kind(results: Sequence[RunResult], kind: Optional[str]) -> str:
    kinds = {r.kind for r in results if r.kind}
    if kind is None:
        if len(kinds) != 1:
            raise ValueError(f"results mix or lack dataset kinds {sorted(kinds)}; pass kind=")
        kind = kinds.pop()
    if kind not in TABLE_COLUMNS:
        raise ValueError(f"no table layout for kind {kind!r} (known: {sorted(TABLE_COLUMNS)})")
    return kind


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def format_table(
    results: Sequence[RunResult], kind: Optional[str] = None, title: Optional[str] = None
) -> str:
    """The ECE paper's Table-1 layout as a Markdown table (pre-edit row first, then one row per result)."""
    if not results:
        raise ValueError("format_table needs at least one result")
    kind = _table_kind(results, kind)
    columns = TABLE_COLUMNS[kind]
    header = ["Method"] + [name for name, _ in columns] + ["Time/batch (s)"]
    rows: list[list[str]] = []
    pre = next((r for r in results if r.pre_summary), None)
    if pre is not None and pre.pre_summary is not None:
        pre_summary = pre.pre_summary
        rows.append([PRE_EDIT_NAME] + [format_cell(pre_summary.get(key)) for _, key in columns] + ["-"])
    for result in results:
        if result.error:
            reason = f"n/a: {_one_line(result.error)}"
            rows.append([result.method, reason] + [""] * (len(columns) - 1) + [""])
            continue
        time_cell = "n/a" if result.mean_seconds_per_batch is None else f"{result.mean_seconds_per_batch:.2f}"
        rows.append(
            [result.method] + [format_cell(result.summary.get(key)) for _, key in columns] + [time_cell]
        )

    widths = [
        max([len(h)] + [len(r[i]) for r in rows if not r[i].startswith("n/a:")]) for i, h in enumerate(header)
    ]
    lines = []
    lines.append(title if title is not None else _default_title(results, kind))
    lines.append("")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    notes = _notes(results, kind, columns, pre is not None)
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def _default_title(results: Sequence[RunResult], kind: str) -> str:
    def joined(values: Sequence[Any]) -> str:
        unique = list(dict.fromkeys(str(v) for v in values))
        return "/".join(unique)

    ran = [r for r in results if not r.error] or list(results)
    return (
        f"{DATASET_NAMES[kind]}: {joined([r.n_edits for r in ran])} edits, batch size "
        f"{joined([r.batch_size for r in ran])}, evaluated {joined([r.protocol for r in ran])}; "
        "metrics in %, mean ± standard error"
    )


def _notes(
    results: Sequence[RunResult], kind: str, columns: list[tuple[str, str]], has_pre: bool
) -> list[str]:
    notes = []
    if kind == "counterfact":
        summaries = [r.summary for r in results if not r.error]
        if has_pre:
            summaries += [r.pre_summary for r in results if r.pre_summary]
        if any("consistency" not in s for s in summaries):
            notes.append(f"Consis.: {CONSISTENCY_UNAVAILABLE}")
        if any("fluency" not in s for s in summaries):
            notes.append("Flu.: n/a where generation was disabled")
        notes.append("Flu. and Consis. are ROME's n-gram entropy and TF-IDF reference score, times 100.")
    notes.append("Time/batch: seconds of editing per batch (evaluation excluded).")
    return notes


# ---------------------------------------------------------------------------------------------- files
def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _csv_metrics(results: Sequence[RunResult]) -> list[str]:
    keys: list[str] = []
    for r in results:
        for summary in (r.pre_summary or {}, r.summary):
            for key in summary:
                if key not in keys:
                    keys.append(key)
    return keys


def results_csv(results: Sequence[RunResult]) -> str:
    """One CSV row per method (pre-edit row first) with mean and sem of every metric."""
    metrics = _csv_metrics(results)
    fields = ["method", "kind", "protocol", "n_edits", "batch_size", "mean_seconds_per_batch", "error"]
    fields += [f"{m}_{stat}" for m in metrics for stat in ("mean", "sem", "n")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()

    def row(method: str, result: RunResult, summary: Mapping[str, Any], seconds: Any, error: Any) -> None:
        values: dict[str, Any] = {
            "method": method,
            "kind": result.kind,
            "protocol": result.protocol,
            "n_edits": result.n_edits,
            "batch_size": result.batch_size,
            "mean_seconds_per_batch": "" if seconds is None else seconds,
            "error": error or "",
        }
        for m in metrics:
            for stat in ("mean", "sem", "n"):
                v = summary.get(m, {}).get(stat)
                values[f"{m}_{stat}"] = "" if v is None else v
        writer.writerow(values)

    pre = next((r for r in results if r.pre_summary), None)
    if pre is not None and pre.pre_summary is not None:
        row(PRE_EDIT_NAME, pre, pre.pre_summary, None, None)
    for r in results:
        row(r.method, r, r.summary, r.mean_seconds_per_batch, r.error)
    return buffer.getvalue()


def write_csv(path: Union[str, Path], results: Sequence[RunResult]) -> Path:
    """Write :func:`results_csv` to ``path`` atomically."""
    return atomic.write_text(path, results_csv(results))
