"""Benchmarks: method comparison tables (``ece-plugin demo`` / ``bench``) and the speed comparison
(``ece-plugin bench --timing``, ``benchmarks/speed.py``).

Comparison: every method edits the same records in the same sequential batches (weights restored between
methods), evaluated under the named protocol; the result is the ECE paper's Table-1 layout (pre-edit row
first, mean +- standard error, edit time per batch), written as JSON, CSV, Markdown and PNG.

Timing: in one process, ECE and EasyEdit's MEMIT and AlphaEdit (same layers, same number of z steps per
edit) edit the same records in the same batches; reported are seconds per batch, each baseline's ratio to
ECE, the split of ECE's time over its stages (from the trace), the z steps each method's edits took (mean, max,
share converged; from the trace, so ECE's methods only), peak memory and edit quality. Where EasyEdit
cannot run a baseline on the device, ECE with clustering off and p = 1 stands in for MEMIT, labelled
'MEMIT-equivalent (project code)'.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...method.hparams import ECEHyperParams
from .baselines import MEMIT_EQUIVALENT_LABEL, EasyEditMethod, ECEMethod, ece_variant_hparams, variant_label
from .common import StudyError, write_csv, write_json
from .diagnostics import z_steps as z_step_summary
from .plots import plot_method_bars
from .runner import MethodRun, as_requests, run_methods, stage_seconds

logger = logging.getLogger(__name__)

QUALITY_METRICS = ("efficacy", "generalization", "specificity")
ECE_STAGES = ("context_templates", "keys", "attribution", "clustering", "z", "statistics", "solve")


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every result."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        from ... import easyedit

        info["easyedit"] = easyedit.easyedit_version()
    except Exception as exc:  # noqa: BLE001 - the version is informative only
        info["easyedit"] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


# ----------------------------------------------------------------------------- comparison tables
@dataclass
class Comparison:
    """Runs of several methods on the same records and batches."""

    n_edits: int
    batch_size: int
    protocol: str
    runs: list[MethodRun]
    table: str = ""

    @property
    def results(self) -> list[Any]:
        return [r.result for r in self.runs if r.result is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_edits": self.n_edits,
            "batch_size": self.batch_size,
            "protocol": self.protocol,
            "table": self.table,
            "runs": [r.to_dict() for r in self.runs],
        }


def compare_methods(
    methods: Sequence[Any],
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    *,
    batch_size: int,
    protocol: str = "after_all",
    eval_kwargs: Optional[dict[str, Any]] = None,
    title: Optional[str] = None,
    record_limits: Optional[dict[str, int]] = None,
) -> Comparison:
    """Run every method (sequential batches) and format the Table-1 layout. A method named in
    ``record_limits`` edits only the first that many records, and the table says so."""
    from ... import evaluation

    if not records:
        raise StudyError("no records to edit")
    limits = {name: n for name, n in (record_limits or {}).items() if n < len(records)}
    if any(n < 1 for n in limits.values()):
        raise StudyError(f"record limits must be >= 1, got {limits}")
    runs = run_methods(
        methods, model, tok, records, batch_size=batch_size, protocol=protocol, eval_kwargs=eval_kwargs,
        record_limits=limits,
    )
    comparison = Comparison(n_edits=len(records), batch_size=batch_size, protocol=protocol, runs=runs)
    comparison.table = (
        evaluation.format_table(comparison.results, title=title)
        + _fewer_records_note(runs, limits, len(records))
        + _via_note(runs)
        + _z_steps_note(runs)
    )
    return comparison


def _z_traces(run: MethodRun) -> list[dict[str, Any]]:
    """The z dicts of every batch a run's traces hold (none for a method without a trace, e.g. EasyEdit's)."""
    return [t["z"] for t in run.traces if isinstance(t, dict) and isinstance(t.get("z"), dict)]


def run_z_steps(run: MethodRun) -> dict[str, Optional[float]]:
    """:func:`~ece_plugin.lab.study.diagnostics.z_steps` over every batch a run's traces hold (all None for a
    method without a trace, e.g. EasyEdit's)."""
    return z_step_summary(_z_traces(run))


def run_z_steps_each(run: MethodRun) -> list[int]:
    """The z steps (forwards) each edit of ``run`` took, in edit order over its batches (round 1); empty for a
    method without a trace (EasyEdit's)."""
    return [int(s) for z in _z_traces(run) for s in (z.get("steps") or [])]


def _z_steps_note(runs: Sequence[MethodRun]) -> str:
    """One line with the z steps each traced method's edits took (empty when none has a trace)."""
    parts = []
    for run in runs:
        steps = run_z_steps(run)
        if run.available and steps["z_steps_mean"] is not None:
            parts.append(f"{run.name} mean {steps['z_steps_mean']:.1f}, max {steps['z_steps_max']:.0f} of "
                         f"{_fmt(steps['z_step_budget'], 0)}, {_fmt(steps['z_converged'], 1, 100)} % converged")
    return ("\nz steps per edit: " + "; ".join(parts) + ".") if parts else ""


def _fewer_records_note(runs: Sequence[MethodRun], limits: dict[str, int], n_records: int) -> str:
    """One line naming the methods that edited only the first records (empty when none did)."""
    parts = [f"{r.name} on the first {limits[r.name]} of the {n_records} records" for r in runs
             if r.available and r.name in limits]
    if not parts:
        return ""
    return "\nFewer records: " + "; ".join(parts) + " (same batches and evaluation), to keep the run short."


def _via_note(runs: Sequence[MethodRun]) -> str:
    """One line naming how EasyEdit's baselines were called (empty when none ran)."""
    routes = {
        "BaseEditor.batch_edit": "BaseEditor.batch_edit(sequential_edit=True)",
        "BaseEditor.edit": "BaseEditor.edit(sequential_edit=True)",
        "apply function": "EasyEdit's registered apply function (this BaseEditor cannot keep edits across batches)",
    }
    parts = [f"{r.name} via {routes[r.via]}" for r in runs if r.available and r.via in routes]
    return ("\nEasyEdit baselines: " + "; ".join(parts) + ".") if parts else ""


def comparison_rows(comparison: Comparison) -> list[tuple[str, Optional[dict[str, Any]], Optional[float]]]:
    """(method, summary, seconds per batch) rows for plots, pre-edit row first."""
    rows: list[tuple[str, Optional[dict[str, Any]], Optional[float]]] = []
    pre = next((r for r in comparison.results if r.pre_summary), None)
    if pre is not None:
        rows.append(("Pre-edited", pre.pre_summary, None))
    for result in comparison.results:
        rows.append((result.method, None if result.error else result.summary, result.mean_seconds_per_batch))
    return rows


def write_comparisons(
    comparisons: Sequence[Comparison], out_dir: Path, stem: str, config: dict[str, Any]
) -> dict[str, Path]:
    """``<stem>.json`` (config, environment, every run), ``<stem>.csv`` (one row per method and setting),
    ``<stem>.md`` (the tables) and ``<stem>.png`` / ``<stem>-n<N>-b<B>.png`` (bars per setting)."""
    from ... import evaluation

    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    files["json"] = write_json(
        out_dir / f"{stem}.json",
        {"config": config, "environment": environment(), "comparisons": [c.to_dict() for c in comparisons]},
    )
    csv_rows: list[dict[str, Any]] = []
    for c in comparisons:
        text = evaluation.results_csv(c.results)
        import csv
        import io

        for row in csv.DictReader(io.StringIO(text)):
            csv_rows.append({"setting_n_edits": c.n_edits, "setting_batch_size": c.batch_size, **row})
    files["csv"] = write_csv(out_dir / f"{stem}.csv", csv_rows)
    from ...method.atomic import write_text as atomic_write_text

    files["md"] = atomic_write_text(out_dir / f"{stem}.md", "\n\n".join(c.table for c in comparisons) + "\n")
    for i, c in enumerate(comparisons):
        name = f"{stem}.png" if len(comparisons) == 1 else f"{stem}-n{c.n_edits}-b{c.batch_size}.png"
        kind = next((r.kind for r in c.results if r.kind), "counterfact")
        metrics = list(QUALITY_METRICS) + (["score"] if kind == "counterfact" else [])
        files[f"png{i}"] = plot_method_bars(
            comparison_rows(c),
            metrics,
            out_dir / name,
            title=f"{c.n_edits} edits, batches of {c.batch_size}, {c.protocol}",
        )
    return files


# ----------------------------------------------------------------------------- timing (issue 5)
@dataclass
class TimingReport:
    """Seconds per batch, ratios to ECE, ECE's stage split, peak memory and quality of each method."""

    n_edits: int
    batch_size: int
    layers: list[int]
    z_steps: int
    repeats: int = 1
    methods: list[dict[str, Any]] = field(default_factory=list)
    ece_stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_edits": self.n_edits,
            "batch_size": self.batch_size,
            "layers": self.layers,
            "z_steps_per_edit": self.z_steps,
            "repeats": self.repeats,
            "methods": self.methods,
            "ece_stage_seconds": self.ece_stage_seconds,
            "notes": self.notes,
            "table": self.table,
        }


def z_steps_per_edit(hparams: ECEHyperParams) -> int:
    """Gradient steps each edit's z gets: shared + per-edit with clustering, else ``v_num_grad_steps``."""
    return hparams.shared_grad_steps + hparams.per_edit_grad_steps if hparams.clustering else hparams.v_num_grad_steps


def timing_methods(
    ece_hparams: ECEHyperParams, baseline_hparams: dict[str, Path], model: torch.nn.Module
) -> tuple[list[Any], list[str]]:
    """ECE, EasyEdit's MEMIT and AlphaEdit on ECE's layers with ECE's z steps per edit; where a baseline
    cannot run, the project's MEMIT-equivalent stands in. Returns (methods, notes)."""
    z_steps = z_steps_per_edit(ece_hparams)
    overrides = {"layers": list(ece_hparams.layers), "v_num_grad_steps": z_steps}
    methods: list[Any] = [ECEMethod(ece_hparams, name=f"ECE-{ece_hparams.attribution}")]
    notes: list[str] = []
    if ece_hparams.clustering:  # the same ECE without the shared phase: attribution + masked update only
        flat = ece_variant_hparams(ece_hparams, "ECE-unclustered", v_num_grad_steps=z_steps)
        methods.append(ECEMethod(flat, name=variant_label("ECE-unclustered", flat)))
    if ece_hparams.z_prefix_cache and ece_hparams.layer_replay:  # what the (exact) layer replay buys
        full_depth = ece_variant_hparams(ece_hparams, "ECE", layer_replay=False)
        methods.append(ECEMethod(full_depth, name=f"ECE-{ece_hparams.attribution} (layer replay off)"))
    need_stand_in = False
    for alg in ("MEMIT", "AlphaEdit"):
        path = baseline_hparams.get(alg)
        if path is None:
            notes.append(f"{alg}: no hparams file given")
            need_stand_in = True
            continue
        method = EasyEditMethod(alg, path, overrides=overrides)
        ok, reason = method.availability(model)
        if ok:
            methods.append(method)
        else:
            notes.append(f"EasyEdit {alg} cannot run here: {reason}")
            need_stand_in = True
    if need_stand_in:
        stand_in = ece_variant_hparams(ece_hparams, "MEMIT-equivalent", v_num_grad_steps=z_steps)
        methods.append(ECEMethod(stand_in, name=MEMIT_EQUIVALENT_LABEL))
        notes.append(f"compared against {MEMIT_EQUIVALENT_LABEL}: ECE with clustering off and p = 1")
    return methods, notes


DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 3


def _median_round(rounds: Sequence[Sequence[float]]) -> Optional[float]:
    """Median over rounds of the mean seconds per batch (None when no round has a batch)."""
    means = [sum(r) / len(r) for r in rounds if r]
    return statistics.median(means) if means else None


def warm_up(model: torch.nn.Module, tok: Any, records: Sequence[Any], hparams: ECEHyperParams) -> float:
    """One untimed ECE batch on a copy of ``model``: the first method of a process otherwise pays one-off costs
    (thread pools, kernel selection, allocator growth: 8.7 s instead of 6.4 s for 100 testbed edits on CPU).
    The copy has its own session (statistics, templates), so nothing carries over to the timed runs."""
    import copy

    from ...easyedit import apply_ece_to_model

    start = time.perf_counter()
    apply_ece_to_model(copy.deepcopy(model), tok, as_requests(records), hparams)
    return time.perf_counter() - start


def _quality(summary: Optional[dict[str, Any]]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for key in (*QUALITY_METRICS, "score"):
        cell = (summary or {}).get(key)
        out[key] = cell.get("mean") if isinstance(cell, dict) else None
    return out


def _sum_stages(traces: Sequence[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for trace in traces:
        for stage, seconds in stage_seconds(trace).items():
            total[stage] = total.get(stage, 0.0) + seconds
    return total


def run_timing(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    ece_hparams: ECEHyperParams,
    baseline_hparams: dict[str, Path],
    *,
    batch_size: int = 100,
    eval_kwargs: Optional[dict[str, Any]] = None,
    trace_python_memory: bool = False,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
) -> tuple[TimingReport, list[MethodRun]]:
    """The speed comparison of issue 5 (see the module docstring). Seconds per batch: the median over
    ``repeats`` rounds of each method's mean per batch (round 1 is the evaluated run, later rounds only edit)."""
    from .runner import run_method, time_method

    if not records:
        raise StudyError("no records to edit")
    if warmup < 0:
        raise StudyError(f"warmup must be >= 0 records, got {warmup}")
    if repeats < 1:
        raise StudyError(f"repeats must be >= 1, got {repeats}")
    methods, notes = timing_methods(ece_hparams, baseline_hparams, model)
    if warmup:
        warm = records[:warmup]
        seconds = warm_up(model, tok, warm, ece_hparams)
        notes.append(f"warm-up, not timed: ECE on a copy of the model, {len(warm)} records ({seconds:.1f} s)")
    runs: list[MethodRun] = []
    for i, method in enumerate(methods):
        runs.append(
            run_method(
                method,
                model,
                tok,
                records,
                batch_size=batch_size,
                protocol="after_all",
                eval_kwargs=eval_kwargs,
                pre=(i == 0),
                trace_python_memory=trace_python_memory,
            )
        )
    rounds = [[run.batch_seconds] for run in runs]  # round 1: the evaluated run
    for _ in range(repeats - 1):  # more rounds, methods interleaved, edit-only
        for method, run, times in zip(methods, runs, rounds):
            if run.available:
                times.append(time_method(method, model, tok, records, batch_size=batch_size))
    medians = [_median_round(times) for times in rounds]
    report = TimingReport(
        n_edits=len(records),
        batch_size=batch_size,
        layers=list(ece_hparams.layers),
        z_steps=z_steps_per_edit(ece_hparams),
        repeats=repeats,
        notes=notes,
    )
    ece_mean = medians[0]
    flat_name = variant_label("ECE-unclustered", ece_hparams)
    flat_mean = next((m for r, m in zip(runs, medians) if r.name == flat_name), None)
    stages = _sum_stages(runs[0].traces)
    total = stages.pop("total", None)
    if total is not None and stages:
        rest = total - sum(stages.values())
        if rest > 0:
            stages["other"] = rest
    report.ece_stage_seconds = stages
    for run, times, mean in zip(runs, rounds, medians):
        result = run.result
        report.methods.append(
            {
                "method": run.name,
                "available": run.available,
                "reason": run.reason,
                "seconds_per_batch": run.batch_seconds,
                "seconds_per_batch_by_round": times if run.available else [],
                "median_seconds_per_batch": mean,
                "ratio_to_ece": (mean / ece_mean) if (mean is not None and ece_mean) else None,
                "ratio_to_ece_clustering_off": (mean / flat_mean) if (mean is not None and flat_mean) else None,
                "peak_memory": run.peak_memory.to_dict() if run.peak_memory else None,
                "quality": _quality(None if result is None or result.error else result.summary),
                "stage_seconds": _sum_stages(run.traces) or None,
                "z_steps": run_z_steps(run),
                "z_steps_each": run_z_steps_each(run),
            }
        )
    report.table = format_timing(report)
    return report, runs


def _fmt(value: Optional[float], digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def format_timing(report: TimingReport) -> str:
    """A plain-text report: seconds per batch, ratio to ECE, memory and quality; then ECE's stage split."""
    flat = any(m.get("ratio_to_ece_clustering_off") is not None for m in report.methods)
    header = ["Method", "s/batch", "x ECE", *(["x ECE (clust. off)"] if flat else []), "Eff.", "Gen.", "Spe.",
              "z steps mean / max", "z conv. %", "peak RSS MiB", "peak CUDA MiB"]
    rows = []
    for m in report.methods:
        if not m["available"]:
            rows.append([m["method"], f"n/a: {m['reason']}", *([""] * (len(header) - 2))])
            continue
        mem = m["peak_memory"] or {}
        q = m["quality"]
        zs = m.get("z_steps") or {}
        steps = ("n/a" if zs.get("z_steps_mean") is None
                 else f"{zs['z_steps_mean']:.1f} / {zs['z_steps_max']:.0f}")
        rows.append(
            [
                m["method"],
                _fmt(m["median_seconds_per_batch"]),
                _fmt(m["ratio_to_ece"]),
                *([_fmt(m.get("ratio_to_ece_clustering_off"))] if flat else []),
                _fmt(q["efficacy"], scale=100),
                _fmt(q["generalization"], scale=100),
                _fmt(q["specificity"], scale=100),
                steps,
                _fmt(zs.get("z_converged"), 1, 100),
                _fmt(mem.get("process_max_rss_mib"), 0),
                _fmt(mem.get("cuda_max_allocated_mib"), 0),
            ]
        )
    widths = [max([len(h)] + [len(r[i]) for r in rows if not r[i].startswith("n/a:")]) for i, h in enumerate(header)]
    lines = [
        f"Speed: {report.n_edits} edits in sequential batches of {report.batch_size}, layers {report.layers}, "
        f"{report.z_steps} z steps per edit; s/batch: median of {report.repeats} rounds; quality in % "
        "(evaluated after all batches)",
        "",
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    total = sum(report.ece_stage_seconds.values())
    if report.ece_stage_seconds:
        lines.append("")
        lines.append("ECE time by stage (all batches of the first round):")
        for stage, seconds in sorted(report.ece_stage_seconds.items(), key=lambda kv: -kv[1]):
            share = seconds / total * 100 if total else 0.0
            lines.append(f"  {stage:<20} {seconds:8.2f} s  {share:5.1f} %")
    else:
        lines.append("")
        lines.append("ECE time by stage: unavailable (the trace held no stage timings)")
    if report.notes:
        lines.append("")
        lines.extend(f"Note: {n}" for n in report.notes)
    lines.append("Peak RSS is the process high-water mark after each method (methods run in turn).")
    lines.append("z steps: forwards each edit's z took (round 1; of the budget above); z conv.: edits whose z loss "
                 "fell below 5e-2 and left the optimisation early; n/a: the method leaves no trace.")
    return "\n".join(lines)


def plot_timing(report: TimingReport, path: Path) -> Path:
    """Bars of seconds per batch per method, and ECE's stage split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import savefig

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    avail = [m for m in report.methods if m["available"] and m["median_seconds_per_batch"] is not None]
    ax.bar([m["method"] for m in avail], [m["median_seconds_per_batch"] for m in avail], color="tab:blue")
    ax.set_ylabel(f"edit seconds per batch (median of {report.repeats} rounds)")
    ax.set_title(f"{report.n_edits} edits, batches of {report.batch_size}")
    ax.tick_params(axis="x", rotation=20)
    stages = report.ece_stage_seconds
    if stages:
        names = sorted(stages, key=lambda k: -stages[k])
        ax2.barh(names, [stages[n] for n in names], color="tab:orange")
        ax2.set_xlabel("seconds (all batches)")
        ax2.set_title("ECE time by stage")
    else:
        ax2.text(0.5, 0.5, "no stage timings in the trace", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    return savefig(fig, path)


def write_timing(report: TimingReport, runs: Sequence[MethodRun], out_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
    """``timing.json`` (report, config, environment, full results), ``timing.csv``, ``timing.md``, ``timing.png``."""
    from ...method.atomic import write_text as atomic_write_text

    out_dir = Path(out_dir)
    files = {
        "json": write_json(
            out_dir / "timing.json",
            {
                "config": config,
                "environment": environment(),
                "report": report.to_dict(),
                "runs": [r.to_dict() for r in runs],
            },
        )
    }
    rows = []
    for m in report.methods:
        mem = m["peak_memory"] or {}
        rows.append(
            {
                "method": m["method"],
                "available": m["available"],
                "reason": m["reason"],
                "seconds_per_batch": m["median_seconds_per_batch"],
                "ratio_to_ece": m["ratio_to_ece"],
                **{f"{k}_mean": v for k, v in m["quality"].items()},
                **(m.get("z_steps") or {}),
                **mem,
            }
        )
    for stage, seconds in report.ece_stage_seconds.items():
        per_batch = seconds / max(1, len(runs[0].batch_seconds))  # the evaluated round
        rows.append({"method": f"ECE stage: {stage}", "available": True, "seconds_per_batch": per_batch})
    files["csv"] = write_csv(out_dir / "timing.csv", rows)
    files["md"] = atomic_write_text(out_dir / "timing.md", report.table + "\n")
    files["png"] = plot_timing(report, out_dir / "timing.png")
    return files
