"""The explain trace of one ECE batch: which neurons, which clusters, how z was reached, where time went.

``apply_ece_to_model`` stores an :class:`ECETrace` at ``session.last_trace``; ``to_dict()`` gives plain JSON
types (the explain command and the benchmark read it), ``save(path)`` writes it atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from . import atomic

SHARE_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5)
HISTOGRAM_BINS = 20
TOP_NEURONS = 20


@dataclass
class ScoreSummary:
    """Summary of a layer's batch scores (normalised to sum 1)."""

    top_neurons: list[int]
    top_scores: list[float]
    share_of_top_fraction: dict[str, float]  # "0.05" -> share of the score held by the top 5% of neurons
    histogram_counts: list[int]  # neurons per bin of normalised score, bins equal over [0, max]
    histogram_edges: list[float]

    @classmethod
    def of(cls, batch_score: torch.Tensor) -> ScoreSummary:
        s = batch_score.detach().double().cpu()
        total = float(s.sum())
        s = s / total if total > 0 else s
        ordered = torch.sort(s, descending=True, stable=True)
        cums = ordered.values.cumsum(0)
        d = s.numel()
        shares = {f"{f:g}": float(cums[max(1, int(round(f * d))) - 1]) for f in SHARE_FRACTIONS}
        top = min(TOP_NEURONS, d)
        hi = float(s.max()) if d else 0.0
        counts = torch.histc(s.float(), bins=HISTOGRAM_BINS, min=0.0, max=hi if hi > 0 else 1.0)
        edges = torch.linspace(0.0, hi if hi > 0 else 1.0, HISTOGRAM_BINS + 1)
        return cls(
            top_neurons=ordered.indices[:top].tolist(),
            top_scores=ordered.values[:top].tolist(),
            share_of_top_fraction=shares,
            histogram_counts=[int(c) for c in counts.tolist()],
            histogram_edges=edges.tolist(),
        )


@dataclass
class LayerTrace:
    """Neuron selection and the update of one edited layer."""

    layer: int
    module: str
    d_ff: int
    edit_sets: list[list[int]]
    edit_set_sizes: list[int]
    edit_shares: list[float]  # share of each edit's score its set holds (>= p)
    batch_set: list[int]
    batch_set_size: int
    batch_share: float
    scores: ScoreSummary
    residual_norm: float = float("nan")
    update_norm: float = float("nan")


@dataclass
class ECETrace:
    """Everything an explanation of one batch needs."""

    attribution: str
    neuron_threshold: float
    n_edits: int
    requests: list[dict[str, Any]]
    context_templates: list[list[str]]
    layers: list[LayerTrace] = field(default_factory=list)
    clusters: dict[str, Any] = field(default_factory=dict)
    z: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: Union[str, Path]) -> None:
        """Write the trace as JSON atomically."""
        atomic.write_text(path, self.to_json(indent=1))


def _plain(value: Any) -> Any:
    """Recursively turn tensors and numpy values into JSON types (NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:
        return None
    return value
