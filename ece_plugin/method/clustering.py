"""Clustering of the edits of a batch (ECE stage 2): Jaccard distances of neuron sets, k-medoids, anchors.

Each edit is represented by the boolean mask of its selected neurons over all (layer, neuron) pairs of the edited
layers; the distance of two edits is the Jaccard distance of their masks. The k-medoids solver is PAM (greedy
BUILD, then steepest-descent SWAP until no swap lowers the total distance), fully deterministic: every argmin
breaks ties by the lower index, so the same sets always give the same clusters (no random start is needed; the
``seed`` argument is accepted for API symmetry and only recorded). Each cluster's anchor is its medoid, finally
re-chosen as the member with the smallest total distance to the other members (lowest index on ties).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import pairwise_distances

logger = logging.getLogger(__name__)

_TOL = 1e-12


@dataclass
class Clusters:
    """Partition of the edits 0..n-1: ``labels[i]`` is the cluster of edit i; ``anchors[c]`` its anchor edit."""

    labels: list[int]
    anchors: list[int]
    distances: np.ndarray = field(repr=False)  # [n, n] Jaccard distances (zeros when clustering is off)
    seed: int = 0

    @property
    def members(self) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in self.anchors]
        for i, c in enumerate(self.labels):
            groups[c].append(i)
        return groups

    @property
    def n_clusters(self) -> int:
        return len(self.anchors)

    def to_dict(self) -> dict:
        return {
            "labels": list(self.labels),
            "anchors": list(self.anchors),
            "members": self.members,
            "seed": self.seed,
        }


def membership_masks(sets: Sequence[Sequence[torch.Tensor]], sizes: Sequence[int]) -> np.ndarray:
    """``sets[i][j]``: neuron indices of edit i in layer j (of ``sizes[j]`` neurons) -> bool ``[n, sum(sizes)]``."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    masks = np.zeros((len(sets), int(offsets[-1])), dtype=bool)
    for i, per_layer in enumerate(sets):
        if len(per_layer) != len(sizes):
            raise ValueError(f"edit {i}: {len(per_layer)} layer sets for {len(sizes)} layers")
        for j, idx in enumerate(per_layer):
            masks[i, offsets[j] + idx.cpu().numpy()] = True
    return masks


def jaccard_distances(masks: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard distances ``[n, n]`` of boolean masks (sklearn); two empty masks are at distance 0."""
    if masks.shape[0] == 0:
        return np.zeros((0, 0))
    d = pairwise_distances(masks.astype(bool), metric="jaccard")
    d = np.nan_to_num(np.asarray(d, dtype=np.float64), nan=0.0)
    np.fill_diagonal(d, 0.0)
    return d


def _assign(d: np.ndarray, medoids: list[int]) -> np.ndarray:
    """Index (into ``medoids``) of the nearest medoid of each point; a medoid is always its own cluster."""
    labels = np.argmin(d[:, medoids], axis=1)  # argmin returns the first minimum: lowest position wins
    for pos, m in enumerate(medoids):
        labels[m] = pos
    return labels


def _total_cost(d: np.ndarray, medoids: list[int]) -> float:
    return float(d[:, medoids].min(axis=1).sum())


def k_medoids(d: np.ndarray, k: int, max_iter: int = 100) -> list[int]:
    """PAM on the distance matrix ``d``: deterministic medoid indices (sorted)."""
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    # BUILD: the point with the smallest total distance, then greedily the point that lowers the cost most.
    medoids = [int(np.argmin(d.sum(axis=1)))]
    nearest = d[:, medoids[0]].copy()
    while len(medoids) < k:
        gains = np.maximum(nearest[None, :] - d, 0.0).sum(axis=1)  # gain of adding each candidate
        gains[medoids] = -np.inf
        best = int(np.argmax(gains))
        medoids.append(best)
        nearest = np.minimum(nearest, d[:, best])
    # SWAP: steepest descent over (medoid, non-medoid) pairs.
    cost = _total_cost(d, medoids)
    for _ in range(max_iter):
        best_cost, best_swap = cost, None
        others = np.array([i for i in range(n) if i not in medoids], dtype=np.int64)
        if others.size == 0:
            break
        for pos in range(len(medoids)):
            rest = medoids[:pos] + medoids[pos + 1 :]
            base = d[:, rest].min(axis=1) if rest else np.full(n, np.inf)
            costs = np.minimum(base[None, :], d[others]).sum(axis=1)
            j = int(np.argmin(costs))
            if costs[j] < best_cost - _TOL:
                best_cost, best_swap = float(costs[j]), (pos, int(others[j]))
        if best_swap is None:
            break
        medoids[best_swap[0]] = best_swap[1]
        cost = best_cost
    return sorted(medoids)


def cluster_edits(masks: np.ndarray, k: int, enabled: bool = True, seed: int = 0) -> Clusters:
    """Cluster the edits by the Jaccard distance of ``masks``; ``enabled=False``: each edit its own cluster."""
    n = masks.shape[0]
    if n == 0:
        raise ValueError("no edits to cluster")
    if not enabled:
        return Clusters(labels=list(range(n)), anchors=list(range(n)), distances=np.zeros((n, n)), seed=seed)
    d = jaccard_distances(masks)
    medoids = k_medoids(d, min(max(k, 1), n))
    labels = _assign(d, medoids)
    anchors = []
    for pos in range(len(medoids)):
        members = np.flatnonzero(labels == pos)
        within = d[np.ix_(members, members)].sum(axis=1)
        anchors.append(int(members[int(np.argmin(within))]))
    # Clusters are numbered by their anchor's index, so the numbering is stable too.
    order = sorted(range(len(anchors)), key=lambda c: anchors[c])
    relabel = {old: new for new, old in enumerate(order)}
    return Clusters(
        labels=[relabel[int(c)] for c in labels],
        anchors=[anchors[c] for c in order],
        distances=d,
        seed=seed,
    )
