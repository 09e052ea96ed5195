"""Shared plumbing of the study commands: output folders, JSON/CSV writing, model loading, weight snapshots,
peak-memory measurement."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ...method import atomic

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class StudyError(ValueError):
    """A study/benchmark option or input is wrong; the message names it."""


# ----------------------------------------------------------------------------- output
def pct(value: Optional[float], scale: float = 100.0) -> str:
    """A table cell: ``value x scale`` with one decimal (fractions as %, fluency as the papers' entropy x 100),
    ``n/a`` when it could not be computed."""
    return "n/a" if value is None else f"{value * scale:.1f}"


def make_out_dir(out: Optional[PathLike], command: str) -> Path:
    """``out`` (created) or ``runs/<command>-<timestamp>/``."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{command}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{command}-{stamp}-{n}"
    else:
        path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def _clean_floats(obj: Any) -> Any:
    """NaN / inf -> None so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def write_json(path: PathLike, obj: Any) -> Path:
    """JSON (indented; NaN written as null), atomically."""
    data = json.loads(json.dumps(obj, default=_json_default))
    return atomic.write_text(path, json.dumps(_clean_floats(data), indent=2) + "\n")


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> Path:
    """CSV with a header (columns: given, else the union of row keys in first-seen order), atomically."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return atomic.write_text(path, buf.getvalue())


def savefig(fig: Any, path: PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


Panel = tuple[str, str, float]  # (key, title, scale)


def series_color(index: int) -> str:
    """The colour of the ``index``-th series of a figure (matplotlib's default cycle), fixed per series so that a
    method keeps its colour in every panel, also in panels where an earlier series has no values."""
    return f"C{index % 10}"


def legend_entries(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Handles and labels of every panel's lines, each label once, in order of first appearance."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def save_curve_grid(
    panels: Sequence[Panel], draw: Any, title: str, path: PathLike, cols: int = 3
) -> Path:
    """One figure of ``panels`` (``draw(ax, key, scale)`` plots each one's lines against the number of edits),
    with a shared legend and ``title``, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, label, scale) in zip(axes.flat, panels):
        draw(ax, key, scale)
        style_curve_axis(ax, label)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = legend_entries(list(axes.flat)[: len(panels)])
    ncol = max(1, min(len(labels), 2 * cols))  # a long legend wraps under the panels instead of widening the figure
    legend_rows = math.ceil(len(labels) / ncol) if labels else 0
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, min(0.3, 0.02 + 0.022 * legend_rows * 4 / nrows), 1, 0.97))
    return savefig(fig, path)


def style_curve_axis(ax: Any, label: str) -> None:
    ax.set_xlabel("number of edits")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------- model
def resolve_device(device: Optional[str]) -> torch.device:
    """'auto' / None -> cuda when available, else cpu; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise StudyError(f"--device: unknown device {device!r}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StudyError(f"device {device!r}: CUDA is not available here (torch.cuda.is_available() is False); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise StudyError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def load_model_and_tokenizer(
    model_dir: PathLike, device: Optional[str] = "auto", dtype: Optional[str] = None
) -> tuple[torch.nn.Module, Any]:
    """A Hugging Face causal LM and its tokenizer from a local folder (no downloads), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise StudyError(f"--model: {path} is not a model folder (no config.json)")
    torch_dtype = None
    if dtype is not None:
        if not hasattr(torch, dtype):
            raise StudyError(f"--dtype: unknown dtype {dtype!r}")
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(resolve_device(device))
    model.eval()
    return model, tok


def snapshot_weights(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Clones of the named parameters (to restore them exactly later)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise StudyError(f"the model has no parameter(s) {missing}")
    return {n: params[n].detach().clone() for n in names}


def restore_weights(model: torch.nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Copy the snapshot back into the model, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def weight_names(templates: Iterable[str], layers: Iterable[int]) -> list[str]:
    """``<template.format(layer)>.weight`` for every template and layer (duplicates removed, order kept)."""
    names: dict[str, None] = {}
    for tmpl in templates:
        for layer in layers:
            names.setdefault(f"{tmpl.format(layer)}.weight", None)
    return list(names)


def n_layers_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise StudyError("cannot tell the number of layers of this model (no num_hidden_layers / n_layer)")


# ----------------------------------------------------------------------------- memory
@dataclass
class PeakMemory:
    """Peak memory during a ``measure_peak_memory`` block (MiB; None when not measurable)."""

    python_heap_mib: Optional[float] = None  # tracemalloc peak (Python allocations, not torch's C++ heap)
    process_rss_mib: Optional[float] = None  # ru_maxrss of the process at the end (high-water mark, whole run)
    cuda_mib: Optional[float] = None  # torch.cuda.max_memory_allocated during the block

    def to_dict(self) -> dict[str, Optional[float]]:
        return {
            "python_heap_peak_mib": self.python_heap_mib,
            "process_max_rss_mib": self.process_rss_mib,
            "cuda_max_allocated_mib": self.cuda_mib,
        }


def _max_rss_mib() -> Optional[float]:
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover - platform specific
        return None
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@contextmanager
def measure_peak_memory(device: Optional[torch.device] = None, trace_python: bool = False) -> Iterator[PeakMemory]:
    """Measure peak memory of a block; ``trace_python`` adds tracemalloc (slows Python code down)."""
    result = PeakMemory()
    use_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = False
    if trace_python and not tracemalloc.is_tracing():
        tracemalloc.start()
        started = True
    try:
        yield result
    finally:
        if trace_python and tracemalloc.is_tracing():
            result.python_heap_mib = tracemalloc.get_traced_memory()[1] / 2**20
            if started:
                tracemalloc.stop()
        if use_cuda:
            torch.cuda.synchronize(device)
            result.cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
        result.process_rss_mib = _max_rss_mib()


def set_threads(n: Optional[int]) -> None:
    """Limit torch's CPU threads (None: leave as is)."""
    if n is not None:
        if n < 1:
            raise StudyError(f"--threads: must be >= 1, got {n}")
        torch.set_num_threads(n)
