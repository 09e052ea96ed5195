"""Layer sweep (Yoon et al. 2024, 'Is bigger edit batch size always better?', Llama-3 study).

For every layer of the model, many NON-sequential single edits (the edited weights restored after each
edit, and the sequential state reset) with ROME and MEMIT (EasyEdit's, when they can run) and ECE, each
editing only that layer. Per layer and method: efficacy, paraphrase (generalization), neighbourhood
(specificity), score (harmonic mean of the three) and fluency; the best layer per method is the one with
the highest score.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...method.hparams import ECEHyperParams
from .baselines import BatchOutcome, EasyEditMethod, ECEMethod, ensure_statistics
from .common import StudyError, n_layers_of, pct, restore_weights, snapshot_weights, write_csv, write_json
from .plots import plot_metric_lines
from .runner import MethodRun, run_method

logger = logging.getLogger(__name__)

SWEEP_METHODS = ("ROME", "MEMIT", "ECE")
SWEEP_METRICS = ("efficacy", "generalization", "specificity", "score", "fluency")


class SingleEdits:
    """Wraps a method so that each batch edits the unedited model: restore, reset, then edit."""

    def __init__(self, inner: Any, model: torch.nn.Module) -> None:
        self.inner = inner
        self.name = inner.name
        self._snapshot: Optional[dict[str, torch.Tensor]] = None

    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        ok, reason = self.inner.availability(model)
        return (ok, reason) if ok is not None else (False, "unknown")

    def edited_weight_names(self, model: torch.nn.Module) -> list[str]:
        return list(self.inner.edited_weight_names(model))

    def prepare(self, model: torch.nn.Module, tok: Any) -> None:
        self.inner.prepare(model, tok)
        self._snapshot = snapshot_weights(model, self.edited_weight_names(model))

    def reset(self, model: torch.nn.Module) -> None:
        self.inner.reset(model)

    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        if self._snapshot is not None:
            restore_weights(model, self._snapshot)
        self.inner.reset(model)
        return self.inner.edit_batch(model, tok, requests)  # type: ignore[no-any-return]


def harmonic_score(summary: dict[str, Any]) -> Optional[float]:
    """The summary's 'score', else the harmonic mean of efficacy, generalization and specificity."""
    cell = summary.get("score")
    if isinstance(cell, dict) and isinstance(cell.get("mean"), (int, float)):
        return float(cell["mean"])
    values = []
    for key in ("efficacy", "generalization", "specificity"):
        c = summary.get(key)
        v = c.get("mean") if isinstance(c, dict) else None
        if not isinstance(v, (int, float)) or v <= 0 or not math.isfinite(v):
            return 0.0 if isinstance(v, (int, float)) else None
        values.append(float(v))
    return len(values) / sum(1.0 / v for v in values)


def _mean(summary: dict[str, Any], key: str) -> Optional[float]:
    if key == "score":
        return harmonic_score(summary)
    cell = summary.get(key)
    v = cell.get("mean") if isinstance(cell, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


@dataclass
class LayerSweep:
    layers: list[int]
    n_edits: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, layer)
    unavailable: dict[str, str] = field(default_factory=dict)
    best_layer: dict[str, Optional[int]] = field(default_factory=dict)
    pre_summary: Optional[dict[str, Any]] = None

    def series(self) -> dict[str, dict[str, list[Optional[float]]]]:
        out: dict[str, dict[str, list[Optional[float]]]] = {}
        for row in self.rows:
            per = out.setdefault(row["method"], {m: [None] * len(self.layers) for m in SWEEP_METRICS})
            i = self.layers.index(row["layer"])
            for m in SWEEP_METRICS:
                per[m][i] = row.get(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"Layer sweep: {self.n_edits} single (non-sequential) edits per layer and method; metrics in %, fluency = n-gram entropy x 100"]
        header = ["Method", "Layer", "Eff.", "Gen.", "Spe.", "Score", "Flu.", "s/edit"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]

        for row in self.rows:
            lines.append(
                "| "
                + " | ".join(
                    [
                        row["method"],
                        str(row["layer"]),
                        pct(row.get("efficacy")),
                        pct(row.get("generalization")),
                        pct(row.get("specificity")),
                        pct(row.get("score")),
                        pct(row.get("fluency")),
                        pct(row.get("seconds_per_edit"), 1.0),
                    ]
                )
                + " |"
            )
        lines.append("")
        for method, layer in self.best_layer.items():
            lines.append(f"Best layer for {method} (by score): {'n/a' if layer is None else layer}")
        for method, reason in self.unavailable.items():
            lines.append(f"{method}: n/a: {reason}")
        return "\n".join(lines)


def _method_at_layer(
    name: str, layer: int, ece_hparams: ECEHyperParams, baseline_hparams: dict[str, Path]
) -> Any:
    if name == "ECE":
        hp = dataclasses.replace(ece_hparams, layers=[layer])
        return ECEMethod(hp, name="ECE", ensure_stats=True)
    if name in ("ROME", "MEMIT"):
        if name not in baseline_hparams:
            raise StudyError(f"no hparams file for {name}")
        return EasyEditMethod(name, baseline_hparams[name], overrides={"layers": [layer]})
    raise StudyError(f"layer sweep methods are {SWEEP_METHODS}, got {name!r}")


def run_layer_sweep(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[Any],
    ece_hparams: ECEHyperParams,
    baseline_hparams: dict[str, Path],
    *,
    methods: Sequence[str] = SWEEP_METHODS,
    layers: Optional[Sequence[int]] = None,
    eval_kwargs: Optional[dict[str, Any]] = None,
) -> LayerSweep:
    """Sweep ``layers`` (default: every layer) with single non-sequential edits of ``records``."""
    n_layers = n_layers_of(model)
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise StudyError(f"--layers: {bad} out of range for a model with {n_layers} layers")
    if not records:
        raise StudyError("no records to edit")
    # Statistics of every swept layer in one pass over the corpus (outside the timed edits).
    ensure_statistics(model, tok, dataclasses.replace(ece_hparams, layers=sorted(layers)))
    sweep = LayerSweep(layers=layers, n_edits=len(records))
    have_pre = False
    for name in methods:
        for layer in layers:
            method = SingleEdits(_method_at_layer(name, layer, ece_hparams, baseline_hparams), model)
            ok, reason = method.availability(model)
            if not ok:
                sweep.unavailable[name] = reason
                logger.warning("%s cannot run: %s", name, reason)
                break
            run: MethodRun = run_method(
                method,
                model,
                tok,
                records,
                batch_size=1,
                protocol="after_batch",
                eval_kwargs=eval_kwargs,
                pre=not have_pre,
            )
            result = run.result
            if result is None or result.error:
                sweep.unavailable[name] = run.reason or (result.error if result is not None else "failed")
                break
            if result.pre_summary and sweep.pre_summary is None:
                sweep.pre_summary = result.pre_summary
                have_pre = True
            row: dict[str, Any] = {"method": name, "layer": layer, "seconds_per_edit": run.mean_batch_seconds}
            for metric in SWEEP_METRICS:
                row[metric] = _mean(result.summary, metric)
                cell = result.summary.get(metric)
                row[f"{metric}_sem"] = cell.get("sem") if isinstance(cell, dict) else None
            sweep.rows.append(row)
    for name in methods:
        scored = [(r["score"], r["layer"]) for r in sweep.rows if r["method"] == name and r["score"] is not None]
        sweep.best_layer[name] = max(scored)[1] if scored else None
    return sweep


def write_layer_sweep(sweep: LayerSweep, out_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
    from ...method.atomic import write_text as atomic_write_text
    from .bench import environment

    out_dir = Path(out_dir)
    files = {
        "json": write_json(out_dir / "layer_sweep.json", {"config": config, "environment": environment(), **sweep.to_dict()}),
        "csv": write_csv(out_dir / "layer_sweep.csv", sweep.rows),
        "md": atomic_write_text(out_dir / "layer_sweep.md", sweep.format() + "\n"),
    }
    best = next((v for v in sweep.best_layer.values() if v is not None), None)
    files["png"] = plot_metric_lines(
        sweep.layers,
        sweep.series(),
        SWEEP_METRICS,
        out_dir / "layer_sweep.png",
        xlabel="layer",
        title=f"Single edits per layer ({sweep.n_edits} records)",
        mark_x=best,
    )
    return files
