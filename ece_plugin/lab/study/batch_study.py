"""Batch-size study (Yoon et al. 2024, Llama-3 editing study).

Two settings per method and batch size B:

* batch: ONE batch of B edits, evaluated, then the model restored;
* sequential-batched: the same total number T of edits written in consecutive batches of B
  (T / B batches), evaluated after all batches, then restored.

Same metrics as the layer sweep; plots of metric vs batch size with one line per method and setting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...method.hparams import ECEHyperParams
from .baselines import ECE_VARIANTS
from .common import StudyError, pct, write_csv, write_json
from .layer_sweep import SWEEP_METRICS, _mean
from .methods import build_methods
from .plots import plot_metric_lines
from .runner import run_method

logger = logging.getLogger(__name__)

SETTINGS = ("batch", "sequential")


@dataclass
class BatchStudy:
    batch_sizes: list[int]
    total_edits: int
    protocol: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, setting, batch size)
    unavailable: dict[str, str] = field(default_factory=dict)
    pre_summary: Optional[dict[str, Any]] = None

    def series(self) -> dict[str, dict[str, list[Optional[float]]]]:
        out: dict[str, dict[str, list[Optional[float]]]] = {}
        for row in self.rows:
            label = f"{row['method']} ({'batch' if row['setting'] == 'batch' else 'sequential-batched'})"
            per = out.setdefault(label, {m: [None] * len(self.batch_sizes) for m in SWEEP_METRICS})
            i = self.batch_sizes.index(row["batch_size"])
            for m in SWEEP_METRICS:
                per[m][i] = row.get(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [
            f"Batch-size study: batch = one batch of B edits; sequential = {self.total_edits} edits in batches of "
            f"B (evaluated {self.protocol}); metrics in %, fluency = n-gram entropy x 100",
            "",
            "| Method | Setting | B | n edits | Eff. | Gen. | Spe. | Score | Flu. | s/batch |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]

        for r in self.rows:
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['batch_size']} | {r['n_edits']} | {pct(r.get('efficacy'))} | "
                f"{pct(r.get('generalization'))} | {pct(r.get('specificity'))} | {pct(r.get('score'))} | "
                f"{pct(r.get('fluency'))} | {pct(r.get('seconds_per_batch'), 1.0)} |"
            )
        for method, reason in self.unavailable.items():
            lines.append(f"{method}: n/a: {reason}")
        return "\n".join(lines)


def run_batch_study(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    ece_hparams: ECEHyperParams,
    baseline_hparams: dict[str, Path],
    *,
    methods: Sequence[str] = ("MEMIT", "ECE"),
    batch_sizes: Sequence[int] = (4, 16, 64),
    total_edits: Optional[int] = None,
    settings: Sequence[str] = SETTINGS,
    protocol: str = "after_all",
    eval_kwargs: Optional[dict[str, Any]] = None,
) -> BatchStudy:
    """Run the study; ``total_edits`` defaults to the largest batch size."""
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise StudyError(f"--batch-sizes: need positive sizes, got {list(batch_sizes)}")
    total = total_edits or batch_sizes[-1]
    need = max(total, batch_sizes[-1])
    if len(records) < need:
        raise StudyError(f"the study needs {need} records (largest batch / total edits), got {len(records)}")
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise StudyError(f"settings must be among {SETTINGS}, got {bad}")
    study = BatchStudy(batch_sizes=batch_sizes, total_edits=total, protocol=protocol)
    names = ["ECE" if m == "ECE" else m for m in methods]
    built = build_methods(names, ece_hparams, baseline_hparams)
    have_pre = False
    for method in built:
        ok, reason = method.availability(model)
        if not ok:
            study.unavailable[method.name] = reason
            continue
        for setting in settings:
            for b in batch_sizes:
                subset = list(records[:b]) if setting == "batch" else list(records[:total])
                if setting == "sequential" and total % b:
                    logger.warning("sequential: %d edits are not a multiple of batch size %d", total, b)
                run = run_method(
                    method,
                    model,
                    tok,
                    subset,
                    batch_size=b,
                    protocol=protocol,
                    eval_kwargs=eval_kwargs,
                    pre=not have_pre and setting == "sequential",
                )
                result = run.result
                if result is None or result.error:
                    study.unavailable[method.name] = run.reason or "failed"
                    break
                if result.pre_summary and study.pre_summary is None:
                    study.pre_summary, have_pre = result.pre_summary, True
                row: dict[str, Any] = {
                    "method": method.name,
                    "setting": setting,
                    "batch_size": b,
                    "n_edits": len(subset),
                    "n_batches": len(run.batch_seconds),
                    "seconds_per_batch": run.mean_batch_seconds,
                }
                for metric in SWEEP_METRICS:
                    row[metric] = _mean(result.summary, metric)
                    cell = result.summary.get(metric)
                    row[f"{metric}_sem"] = cell.get("sem") if isinstance(cell, dict) else None
                study.rows.append(row)
    return study


def write_batch_study(study: BatchStudy, out_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
    from ...method.atomic import write_text as atomic_write_text
    from .bench import environment

    out_dir = Path(out_dir)
    return {
        "json": write_json(out_dir / "batch_study.json", {"config": config, "environment": environment(), **study.to_dict()}),
        "csv": write_csv(out_dir / "batch_study.csv", study.rows),
        "md": atomic_write_text(out_dir / "batch_study.md", study.format() + "\n"),
        "png": plot_metric_lines(
            study.batch_sizes,
            study.series(),
            SWEEP_METRICS,
            out_dir / "batch_study.png",
            xlabel="batch size",
            title="Batch vs sequential-batched editing",
            log_x=True,
        ),
    }


__all__ = ["ECE_VARIANTS", "BatchStudy", "run_batch_study", "write_batch_study"]
