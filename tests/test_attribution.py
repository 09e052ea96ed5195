"""AS / WI / RS scores and the smallest top set holding a share p."""

from __future__ import annotations

import pytest
import torch

from ece_plugin.method.attribution import attribute_layer, batch_scores, neuron_scores, select_top_p, share_of


def test_single_dominant_neuron_gives_a_set_of_one() -> None:
    scores = torch.tensor([0.01, 100.0, 0.02, 0.03])
    (s,) = select_top_p(scores, 0.8)
    assert s.tolist() == [1]


def test_smallest_prefix_reaching_p() -> None:
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])  # total 10
    assert select_top_p(scores, 0.7)[0].tolist() == [0, 1]  # 7 >= 7
    assert select_top_p(scores, 0.71)[0].tolist() == [0, 1, 2]
    assert select_top_p(scores, 0.1)[0].tolist() == [0]
    torch.manual_seed(0)
    for _ in range(20):
        row = torch.rand(50) ** 3
        (s,) = select_top_p(row, 0.8)
        assert share_of(row.double(), s) >= 0.8 - 1e-12
        order = torch.sort(row, descending=True, stable=True).indices
        smaller = order[: len(s) - 1]
        assert share_of(row.double(), smaller) < 0.8  # minimal


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0])  # total 8; 0.5 -> two of the three 2.0s
    assert select_top_p(scores, 0.5)[0].tolist() == [1, 2]
    assert select_top_p(scores.flip(0), 0.5)[0].tolist() == [1, 2]


def test_p_one_selects_exactly_the_nonzero_neurons() -> None:
    scores = torch.tensor([0.0, 1e-30, 5.0, 0.0, 2.0])
    assert select_top_p(scores, 1.0)[0].tolist() == [1, 2, 4]


def test_never_empty() -> None:
    assert select_top_p(torch.zeros(5), 0.8)[0].tolist() == [0]
    assert select_top_p(torch.zeros(5), 1.0)[0].tolist() == [0]
    assert len(select_top_p(torch.tensor([3.0]), 1e-9)[0]) == 1


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="p must lie"):
        select_top_p(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        select_top_p(torch.tensor([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="attribution method"):
        neuron_scores("XX", torch.ones(1, 3), torch.ones(3))


def test_vectorised_rows_equal_single_rows() -> None:
    torch.manual_seed(1)
    scores = torch.rand(6, 40) ** 2
    batched = select_top_p(scores, 0.8)
    for i in range(6):
        assert torch.equal(batched[i], select_top_p(scores[i], 0.8)[0])


def test_scores_definitions() -> None:
    acts = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 1.0]])
    norms = torch.tensor([2.0, 1.0, 4.0])
    torch.testing.assert_close(neuron_scores("AS", acts, norms), acts.abs().double())
    torch.testing.assert_close(neuron_scores("WI", acts, norms), norms.double().expand(2, 3))
    torch.testing.assert_close(neuron_scores("RS", acts, norms), (acts.abs() * norms).double())


def test_batch_score_weighs_every_edit_equally() -> None:
    a = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    b = a.clone()
    b[0] *= 1000  # a loud edit must not swamp the batch set
    torch.testing.assert_close(batch_scores(a), batch_scores(b))
    assert batch_scores(a).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_wi_sets_are_identical_and_clustering_uses_as_sets() -> None:
    torch.manual_seed(2)
    acts, norms = torch.randn(3, 20), torch.rand(20)
    att = attribute_layer(0, "WI", acts, norms, 0.8)
    assert all(torch.equal(s, att.edit_sets[0]) for s in att.edit_sets)
    as_sets = select_top_p(acts.abs(), 0.8)
    assert all(torch.equal(x, y) for x, y in zip(att.cluster_sets, as_sets))
    att_as = attribute_layer(0, "AS", acts, norms, 0.8)
    assert all(sh >= 0.8 - 1e-12 for sh in att_as.edit_shares) and att_as.batch_share >= 0.8 - 1e-12
