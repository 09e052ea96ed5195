"""Jaccard distances, deterministic k-medoids, anchors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ece_plugin.method.clustering import cluster_edits, jaccard_distances, k_medoids, membership_masks


def _random_masks(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.random((3, d)) < 0.3
    masks = np.array([centers[i % 3] ^ (rng.random(d) < 0.08) for i in range(n)])
    masks[:, 0] = True  # never empty
    return masks


def test_membership_masks_over_layers() -> None:
    sets = [[torch.tensor([0, 2]), torch.tensor([1])], [torch.tensor([2]), torch.tensor([0, 1])]]
    m = membership_masks(sets, [3, 2])
    assert m.tolist() == [[True, False, True, False, True], [False, False, True, True, True]]


def test_jaccard_matches_definition() -> None:
    m = _random_masks(6, 30, 0)
    d = jaccard_distances(m)
    for i in range(6):
        for j in range(6):
            inter, union = (m[i] & m[j]).sum(), (m[i] | m[j]).sum()
            assert d[i, j] == pytest.approx(1 - inter / union)


def test_same_input_gives_same_clusters() -> None:
    m = _random_masks(12, 40, 3)
    a, b = cluster_edits(m, 3), cluster_edits(m.copy(), 3)
    assert a.labels == b.labels and a.anchors == b.anchors


def test_anchors_are_members_minimising_total_distance() -> None:
    m = _random_masks(15, 40, 5)
    c = cluster_edits(m, 4)
    d = jaccard_distances(m)
    for anchor, members in zip(c.anchors, c.members):
        assert anchor in members
        totals = {i: d[i, members].sum() for i in members}
        assert totals[anchor] == pytest.approx(min(totals.values()))
        assert anchor == min(i for i in members if totals[i] <= totals[anchor] + 1e-12)  # ties: lowest index
    assert sorted(i for g in c.members for i in g) == list(range(15))


def test_recovers_obvious_groups_and_pam_cost_is_optimal_on_small_input() -> None:
    m = np.zeros((6, 10), dtype=bool)
    m[:3, :5] = True
    m[3:, 5:] = True
    m[1, 5] = True
    m[4, 0] = True
    c = cluster_edits(m, 2)
    assert c.members == [[0, 1, 2], [3, 4, 5]]
    d = jaccard_distances(_random_masks(8, 25, 9))
    meds = k_medoids(d, 2)
    best = min(d[:, [i, j]].min(1).sum() for i in range(8) for j in range(i + 1, 8))
    assert d[:, meds].min(1).sum() == pytest.approx(best)


def test_k_one_singletons_and_off() -> None:
    m = _random_masks(5, 20, 1)
    one = cluster_edits(m, 1)
    assert one.members == [[0, 1, 2, 3, 4]] and one.n_clusters == 1
    every = cluster_edits(m, 5)
    assert every.anchors == [0, 1, 2, 3, 4] and every.labels == [0, 1, 2, 3, 4]
    off = cluster_edits(m, 2, enabled=False)
    assert off.labels == off.anchors == [0, 1, 2, 3, 4]
    single = cluster_edits(m[:1], 3)
    assert single.anchors == [0] and single.labels == [0]


def test_identical_sets_are_at_distance_zero() -> None:
    m = np.ones((4, 6), dtype=bool)
    c = cluster_edits(m, 2)
    assert np.all(c.distances == 0)
    assert sorted(i for g in c.members for i in g) == [0, 1, 2, 3]
    assert c.to_dict()["anchors"] == c.anchors
