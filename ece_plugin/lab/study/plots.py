"""PNG plots of the studies (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .common import legend_entries, savefig, series_color

logger = logging.getLogger(__name__)

METRIC_LABELS = {
    "efficacy": "Efficacy",
    "generalization": "Paraphrase (generalization)",
    "specificity": "Neighbourhood (specificity)",
    "score": "Score (harmonic mean)",
    "fluency": "Fluency (n-gram entropy)",
    "seconds_per_batch": "Edit time per batch (s)",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(summary: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    if not summary:
        return None
    cell = summary.get(key)
    if isinstance(cell, Mapping):
        value = cell.get("mean")
    else:
        value = cell
    return float(value) if isinstance(value, (int, float)) else None


def _sem(summary: Optional[Mapping[str, Any]], key: str) -> float:
    if not summary:
        return 0.0
    cell = summary.get(key)
    if isinstance(cell, Mapping) and isinstance(cell.get("sem"), (int, float)):
        return float(cell["sem"])
    return 0.0


def plot_method_bars(
    rows: Sequence[tuple[str, Optional[Mapping[str, Any]], Optional[float]]],
    metrics: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Grouped bars (mean +- sem) of ``metrics`` per method, plus a panel with edit time per batch.

    ``rows``: (method, summary {metric: {mean, sem, n}} or None when it could not run, seconds per batch).
    """
    plt = _pyplot()
    ran = [r for r in rows if r[1]]
    missing = [r[0] for r in rows if not r[1]]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(ran))
    for i, (method, summary, _seconds) in enumerate(ran):
        xs = [j + i * width for j in range(len(metrics))]
        means = [_mean(summary, m) for m in metrics]
        heights = [0.0 if v is None else v for v in means]
        errs = [_sem(summary, m) for m in metrics]
        ax.bar(xs, heights, width=width, yerr=errs, capsize=2, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels([METRIC_LABELS.get(m, m) for m in metrics], rotation=15)
    ax.set_ylabel("mean (fraction)")
    if ran:
        ax.legend(fontsize=8)
    ax.set_title(title)
    if missing:  # methods that could not run get no empty slot, only this note
        ax.text(0.0, -0.28, "not run: " + ", ".join(missing), transform=ax.transAxes, fontsize=8, va="top")
    timed = [r for r in rows if r[2] is not None]
    ax_t.bar(range(len(timed)), [float(r[2] or 0.0) for r in timed], color="tab:gray")
    ax_t.set_xticks(range(len(timed)))
    ax_t.set_xticklabels([r[0] for r in timed], rotation=45, ha="right", fontsize=8)
    ax_t.set_ylabel("edit seconds per batch")
    fig.tight_layout()
    return savefig(fig, path)


def plot_metric_lines(
    xs: Sequence[Any],
    series: Mapping[str, Mapping[str, Sequence[Optional[float]]]],
    metrics: Sequence[str],
    path: Path,
    xlabel: str,
    title: str = "",
    log_x: bool = False,
    mark_x: Optional[Any] = None,
) -> Path:
    """One panel per metric; one line per series (method). Missing values (None) leave gaps."""
    plt = _pyplot()
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for k, metric in enumerate(metrics):
        ax = axes[0][k]
        plotted = False
        for i, (name, values) in enumerate(series.items()):
            ys = values.get(metric, [])
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=series_color(i))
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "n/a (not measured)", ha="center", va="center", transform=ax.transAxes)
        if not log_x and all(isinstance(x, int) for x in xs) and len(xs) <= 40:
            ax.set_xticks(list(xs))
        if mark_x is not None:
            ax.axvline(mark_x, color="k", linestyle=":", linewidth=1)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    handles, labels = legend_entries(list(axes[0]))
    axes[0][0].legend(handles, labels, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return savefig(fig, path)
