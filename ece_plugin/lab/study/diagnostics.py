"""Where sequential editing breaks, batch by batch: what ECE's trace of each batch says about z and the write.

For every batch of a lifelong run of an ECE method, :func:`batch_diagnostics` reads the batch's trace
(:class:`~ece_plugin.method.trace.ECETrace` as a dict) and keeps

* ``z_reached``: the share of edits whose z makes the model predict every target token (greedy);
* ``z_clamped``: the share of edits whose ``||z - h||`` sits at the clamp ``clamp_norm_factor * ||h||``;
* ``z_delta_ratio``: the mean ``||z - h|| / ||h||``, and ``z_final_loss``, the mean final z loss;
* ``z_steps_mean`` / ``z_steps_max``: the z steps the batch's edits took (of ``z_step_budget``), and
  ``z_converged``: the share whose z loss fell below MEMIT's 5e-2 and so left the optimisation early
  (:func:`z_steps`);
* per edited layer: the batch neuron set's size, the mean per-edit set size, the share of the batch set that
  earlier batches already wrote (``overlap``), the mean residual ``||z - cur||`` before the layer's write and the
  update's Frobenius norm.

:func:`plot_diagnostics` draws them against the number of edits. The EasyEdit baselines leave no trace, so they
have no diagnostics.

:func:`weight_growth`, measured at every checkpoint of every method (EasyEdit's too), is how far the sequence has
moved each edited weight from the unedited one, ``||W - W0||_F / ||W0||_F``: the norm growth that Gupta et al.
(ENCORE, 2025) tie to MEMIT's and AlphaEdit's degradation over long sequences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .common import save_curve_grid, series_color

CLAMP_TOLERANCE = 1e-3  # ||z - h|| within 0.1 % of the clamp counts as clamped

PLOTTED: list[tuple[str, str, float]] = [
    ("z_reached", "z reaches its target (% of the batch)", 100.0),
    ("z_clamped", "z at the clamp (% of the batch)", 100.0),
    ("z_delta_ratio", "mean ||z - h|| / ||h||", 1.0),
    ("z_steps_mean", "z steps per edit (mean of the batch)", 1.0),
    ("z_converged", "z converged, left early (% of the batch)", 100.0),
    ("overlap", "batch neurons written before (%, mean of layers)", 100.0),
    ("residual_norm", "residual ||z - cur|| before the write (mean of layers)", 1.0),
    ("update_norm", "update norm ||Delta|| (mean of layers)", 1.0),
]


def _mean(values: Sequence[float]) -> Optional[float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def weight_growth(model: torch.nn.Module, pristine: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``||W - W0||_F / ||W0||_F`` of each weight in ``pristine`` (name -> its unedited value), in float32."""
    params = dict(model.named_parameters())
    growth: dict[str, float] = {}
    with torch.no_grad():
        for name, w0 in pristine.items():
            w = params[name].detach().float()
            base = w0.to(device=w.device, dtype=torch.float32)
            growth[name] = float((w - base).norm() / base.norm().clamp_min(1e-30))
    return growth


def z_steps(z_traces: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """The z steps over the edits of the traces' z dicts (:meth:`ece_plugin.method.values.ZResult.to_dict`):
    mean and max steps, the budget, and the share of edits whose z converged (None where a trace lacks them)."""
    steps = [int(s) for z in z_traces for s in (z.get("steps") or [])]
    converged = [bool(c) for z in z_traces for c in (z.get("converged") or [])]
    budgets = [int(z["step_budget"]) for z in z_traces if z.get("step_budget")]
    return {
        "z_steps_mean": sum(steps) / len(steps) if steps else None,
        "z_steps_max": float(max(steps)) if steps else None,
        "z_step_budget": float(max(budgets)) if budgets else None,
        "z_converged": sum(converged) / len(converged) if converged else None,
    }


def batch_diagnostics(
    trace: dict[str, Any], written_before: dict[str, set[int]], clamp_norm_factor: Optional[float]
) -> dict[str, Any]:
    """One batch's diagnostics; ``written_before`` (module -> neurons written by earlier batches) is updated
    with this batch's neurons."""
    z = trace.get("z") or {}
    reached = z.get("reached_target") or []
    delta, h = z.get("delta_norm") or [], z.get("h_norm") or []
    ratios = [d / n for d, n in zip(delta, h) if n]
    clamped = None
    if clamp_norm_factor is not None and ratios:
        clamped = sum(r >= clamp_norm_factor * (1 - CLAMP_TOLERANCE) for r in ratios) / len(ratios)
    layers = []
    for layer in trace.get("layers") or []:
        batch_set = set(layer["batch_set"])
        before = written_before.setdefault(layer["module"], set())
        layers.append({
            "layer": layer["layer"],
            "batch_set_size": len(batch_set),
            "edit_set_size": _mean(layer.get("edit_set_sizes") or []),
            "overlap": len(batch_set & before) / len(batch_set) if batch_set else None,
            "residual_norm": layer.get("residual_norm"),
            "update_norm": layer.get("update_norm"),
        })
        before |= batch_set
    return {
        "n_edits": int(trace.get("n_edits") or len(reached)),
        "z_reached": sum(bool(r) for r in reached) / len(reached) if reached else None,
        "z_clamped": clamped,
        "z_delta_ratio": _mean(ratios),
        "z_final_loss": _mean(z.get("final_loss") or []),
        **z_steps([z]),
        "overlap": _mean([lay["overlap"] for lay in layers]),
        "residual_norm": _mean([lay["residual_norm"] for lay in layers]),
        "update_norm": _mean([lay["update_norm"] for lay in layers]),
        "layers": layers,
    }


def flat_diagnostics(method: str, diagnostics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV rows: one per batch (edits done, the batch means and every layer's figures)."""
    rows, done = [], 0
    for i, d in enumerate(diagnostics):
        done += d["n_edits"]
        row: dict[str, Any] = {"method": method, "batch": i + 1, "edits_done": done}
        row.update({k: v for k, v in d.items() if k not in ("layers", "n_edits")})
        for lay in d["layers"]:
            for key, value in lay.items():
                if key != "layer":
                    row[f"layer{lay['layer']}_{key}"] = value
        rows.append(row)
    return rows


def plot_diagnostics(per_method: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Optional[Path]:
    """A grid of :data:`PLOTTED` against the number of edits, one line per method; None when nothing to draw."""
    per_method = {m: d for m, d in per_method.items() if d}
    if not per_method:
        return None
    def draw(ax: Any, key: str, scale: float) -> None:
        for i, (method, diagnostics) in enumerate(per_method.items()):
            points = [(r["edits_done"], r[key] * scale) for r in flat_diagnostics(method, diagnostics)
                      if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=method, color=series_color(i))

    rows = [r for m, d in per_method.items() for r in flat_diagnostics(m, d)]
    panels = [p for p in PLOTTED if any(r.get(p[0]) is not None for r in rows)] or PLOTTED
    return save_curve_grid(panels, draw, title, path)
