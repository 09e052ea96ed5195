"""Explanations of ECE edits: which neurons each edit chose, how edits overlap, the clusters and anchors.

A report is built from an ECE trace (``get_session(model, hparams).last_trace.to_dict()`` after an edit,
or :func:`explain_records` which runs attribution, selection and clustering only, without editing) and
written as JSON plus PNG heatmaps: per layer an edits x neurons selection heatmap (neurons ordered by how
many edits chose them) and the edits x edits Jaccard overlap matrix.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

MAX_HEATMAP_NEURONS = 256


class ExplainError(ValueError):
    """A trace lacks what a report needs."""


# ----------------------------------------------------------------------------- math
def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def overlap_matrix(selections: Sequence[Sequence[int]]) -> list[list[float]]:
    """Pairwise Jaccard similarity of the edits' neuron sets."""
    sets = [set(s) for s in selections]
    n = len(sets)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            union = sets[i] | sets[j]
            value = 1.0 if not union else len(sets[i] & sets[j]) / len(union)
            out[i][j] = out[j][i] = value
    return out


def _summary(values: Sequence[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None, "median": None}
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    mid = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return {"n": n, "mean": sum(ordered) / n, "min": ordered[0], "max": ordered[-1], "median": mid}


# ----------------------------------------------------------------------------- report
@dataclass
class LayerExplanation:
    """Selections of one layer."""

    layer: int
    selections: list[list[int]]  # per edit: selected neuron indices
    score_shares: Optional[list[float]] = None  # per edit: share of the total score the set holds
    batch_neurons: Optional[list[int]] = None  # the union the update writes
    score_summary: Optional[dict[str, Any]] = None  # attribution score distribution (from the trace)

    def to_dict(self, edit_labels: Sequence[str]) -> dict[str, Any]:
        sizes = [len(s) for s in self.selections]
        overlap = overlap_matrix(self.selections)
        n = len(self.selections)
        off_diag = [overlap[i][j] for i in range(n) for j in range(n) if i < j]
        counts: dict[int, int] = {}
        for sel in self.selections:
            for idx in sel:
                counts[idx] = counts.get(idx, 0) + 1
        batch = self.batch_neurons if self.batch_neurons is not None else sorted(counts)
        return {
            "layer": self.layer,
            "per_edit": [
                {
                    "edit": edit_labels[i] if i < len(edit_labels) else str(i),
                    "n_neurons": sizes[i],
                    "score_share": None if self.score_shares is None else self.score_shares[i],
                    "neurons": list(self.selections[i]),
                }
                for i in range(n)
            ],
            "set_size": _summary(sizes),
            "score_share": _summary(self.score_shares or []),
            "batch_neuron_count": len(batch),
            "batch_neurons": list(batch),
            "most_shared_neurons": [
                {"neuron": k, "n_edits": v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
            ],
            "mean_pairwise_jaccard": (sum(off_diag) / len(off_diag)) if off_diag else None,
            "jaccard": overlap,
            "score_distribution": self.score_summary,
        }


@dataclass
class Explanation:
    """A whole report: layers, edits, clusters and anchors, plus anything else the trace had."""

    edit_labels: list[str]
    layers: list[LayerExplanation]
    clusters: Optional[list[int]] = None  # per edit: cluster id
    anchors: Optional[list[int]] = None  # per cluster: index of the anchor edit
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        clusters_out = None
        if self.clusters is not None:
            groups: dict[int, list[int]] = {}
            for i, c in enumerate(self.clusters):
                groups.setdefault(int(c), []).append(i)
            clusters_out = [
                {
                    "cluster": c,
                    "anchor": None if self.anchors is None or c >= len(self.anchors) else self.anchors[c],
                    "anchor_edit": None
                    if self.anchors is None or c >= len(self.anchors)
                    else self.edit_labels[self.anchors[c]],
                    "members": members,
                }
                for c, members in sorted(groups.items())
            ]
        return {
            "n_edits": len(self.edit_labels),
            "edits": self.edit_labels,
            "layers": [layer.to_dict(self.edit_labels) for layer in self.layers],
            "clusters": clusters_out,
            **self.extra,
        }


def _get(mapping: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in mapping and mapping[name] is not None:
            return mapping[name]
    return None


def explanation_from_trace(trace: Mapping[str, Any], edit_labels: Optional[Sequence[str]] = None) -> Explanation:
    """Build an :class:`Explanation` from an ECE trace dict (``last_trace.to_dict()``)."""
    if not isinstance(trace, Mapping):
        raise ExplainError(f"expected a trace dict, got {type(trace).__name__}")
    layers_raw = _get(trace, "layers", "per_layer")
    if layers_raw is None:
        raise ExplainError(f"the trace has no per-layer selections (keys: {sorted(trace)})")
    if isinstance(layers_raw, Mapping):
        items = [(int(k), v) for k, v in layers_raw.items()]
    else:
        items = [(int(v.get("layer", i)), v) for i, v in enumerate(layers_raw)]
    layers = []
    for layer, info in sorted(items, key=lambda kv: kv[0]):
        selections = _get(info, "edit_sets", "selected", "selected_neurons", "selections")
        if selections is None:
            raise ExplainError(f"layer {layer}: the trace has no selected neurons (keys: {sorted(info)})")
        layers.append(
            LayerExplanation(
                layer=layer,
                selections=[[int(i) for i in s] for s in selections],
                score_shares=_get(info, "edit_shares", "score_share", "share_of_score"),
                batch_neurons=_get(info, "batch_set", "batch_neurons"),
                score_summary=_get(info, "scores", "score_summary"),
            )
        )
    n_edits = len(layers[0].selections) if layers else 0
    labels = list(edit_labels) if edit_labels is not None else None
    if labels is None:
        requests = trace.get("requests") or []
        if len(requests) == n_edits and all(isinstance(r, Mapping) for r in requests):
            labels = [str(r.get("case_id", i)) for i, r in enumerate(requests)]
        else:
            labels = [str(i) for i in range(n_edits)]
    clusters_raw = _get(trace, "clusters", "clustering")
    clusters = anchors = None
    if isinstance(clusters_raw, Mapping):
        clusters = _get(clusters_raw, "labels", "assignments", "cluster_of_edit")
        anchors = _get(clusters_raw, "anchors", "medoids")
    elif isinstance(clusters_raw, list):
        clusters = clusters_raw
        anchors = _get(trace, "anchors", "medoids")
    extra = {
        key: trace[key]
        for key in ("attribution", "neuron_threshold", "timings", "z", "requests")
        if key in trace
    }
    return Explanation(
        edit_labels=labels,
        layers=layers,
        clusters=[int(c) for c in clusters] if clusters is not None else None,
        anchors=[int(a) for a in anchors] if anchors is not None else None,
        extra=extra,
    )


# ----------------------------------------------------------------------------- plots
def _selection_matrix(layer: LayerExplanation, max_neurons: int) -> tuple[list[list[float]], list[int]]:
    counts: dict[int, int] = {}
    for sel in layer.selections:
        for idx in sel:
            counts[idx] = counts.get(idx, 0) + 1
    columns = [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_neurons]]
    col_of = {k: j for j, k in enumerate(columns)}
    matrix = [[0.0] * len(columns) for _ in layer.selections]
    for i, sel in enumerate(layer.selections):
        for idx in sel:
            if idx in col_of:
                matrix[i][col_of[idx]] = 1.0
    return matrix, columns


def plot_explanation(explanation: Explanation, path: Path, max_neurons: int = MAX_HEATMAP_NEURONS) -> Path:
    """One row per layer: selection heatmap (edits x most-chosen neurons) and the Jaccard overlap matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .study.common import savefig

    n_layers = max(1, len(explanation.layers))
    fig, axes = plt.subplots(n_layers, 2, figsize=(12, 3.2 * n_layers + 0.6), squeeze=False)
    for row, layer in enumerate(explanation.layers):
        matrix, columns = _selection_matrix(layer, max_neurons)
        ax = axes[row][0]
        if columns:
            ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
        ax.set_title(f"layer {layer.layer}: selected neurons ({len(columns)} most chosen)")
        ax.set_xlabel("neuron (ordered by number of edits choosing it)")
        ax.set_ylabel("edit")
        ax2 = axes[row][1]
        im = ax2.imshow(overlap_matrix(layer.selections), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax2.set_title(f"layer {layer.layer}: Jaccard overlap between edits")
        ax2.set_xlabel("edit")
        ax2.set_ylabel("edit")
        fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.tight_layout()
    return savefig(fig, path)


def write_explanation(explanation: Explanation, out_dir: Path, stem: str = "explain") -> dict[str, Path]:
    """``<stem>.json`` and ``<stem>.png`` under ``out_dir``."""
    from .study.common import write_json

    out_dir = Path(out_dir)
    json_path = write_json(out_dir / f"{stem}.json", explanation.to_dict())
    png_path = plot_explanation(explanation, out_dir / f"{stem}.png")
    return {"json": json_path, "png": png_path}


# ----------------------------------------------------------------------------- without editing
def explain_records(model: Any, tok: Any, requests: Sequence[Mapping[str, Any]], hparams: Any) -> Explanation:
    """ECE's stages 1-2 only (context templates, keys, attribution and selection, clustering) for
    ``requests`` as ONE batch on the model as it is; nothing is edited."""
    import time

    from ..method.architecture import input_device, num_layers, w_out
    from ..method.attribution import attribute_layer
    from ..method.clustering import cluster_edits, membership_masks
    from ..method.editor import context_templates
    from ..method.keys import build_key_rows, editing_tokenizer, read_keys
    from ..method.requests import normalise_requests
    from ..method.state import get_session
    from ..method.trace import ScoreSummary

    if not requests:
        raise ExplainError("no records to explain")
    edit_requests = normalise_requests(list(requests))
    hparams.validate(num_layers(model))
    session = get_session(model, hparams)
    w_outs = [w_out(model, hparams.rewrite_module_tmp, layer) for layer in hparams.layers]
    names = [wo.name for wo in w_outs]
    z_name = hparams.layer_module_tmp.format(hparams.layers[-1])
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with editing_tokenizer(tok):
            t0 = time.perf_counter()
            templates = context_templates(model, tok, hparams, session)
            t1 = time.perf_counter()
            rows = build_key_rows(tok, edit_requests, templates, hparams.fact_token, input_device(model))
            keys, _ = read_keys(model, rows, names, z_name, stop_at=z_name)
            t2 = time.perf_counter()
            atts = [
                attribute_layer(wo.layer, hparams.attribution, keys[wo.name], wo.neuron_norms(), hparams.neuron_threshold)
                for wo in w_outs
            ]
            t3 = time.perf_counter()
            n = len(edit_requests)
            masks = membership_masks([[a.cluster_sets[i] for a in atts] for i in range(n)], [wo.d_ff for wo in w_outs])
            clusters = cluster_edits(masks, hparams.n_clusters_for(n), enabled=hparams.clustering, seed=hparams.seed)
            t4 = time.perf_counter()
    finally:
        model.train(was_training)
    timings.update(context_templates=t1 - t0, keys=t2 - t1, attribution=t3 - t2, clustering=t4 - t3)
    layers = [
        LayerExplanation(
            layer=a.layer,
            selections=[s.tolist() for s in a.edit_sets],
            score_shares=a.edit_shares,
            batch_neurons=a.batch_set.tolist(),
            score_summary=dataclasses.asdict(ScoreSummary.of(a.batch_score)),
        )
        for a in atts
    ]
    return Explanation(
        edit_labels=[str(r.case_id) if r.case_id is not None else str(i) for i, r in enumerate(edit_requests)],
        layers=layers,
        clusters=list(clusters.labels),
        anchors=list(clusters.anchors),
        extra={
            "attribution": hparams.attribution,
            "neuron_threshold": hparams.neuron_threshold,
            "clustering_enabled": bool(hparams.clustering),
            "timings": timings,
            "edited": False,
            "requests": [
                {"case_id": r.case_id, "prompt": r.text, "subject": r.subject, "target_new": r.target_new}
                for r in edit_requests
            ],
        },
    )
