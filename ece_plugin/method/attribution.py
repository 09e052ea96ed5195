"""Neuron attribution (ECE stage 1): AS / WI / RS scores and the smallest top set holding a share p.

Scores of the d_ff neurons of one layer's W_out for one edit, from its key ``a`` (the template-averaged input of
W_out at the subject's last token, the same keys the update uses) and the neuron norms ``n_k = ||W_out neuron k||``
(L2 norm of the d_model output weights of neuron k):

* ``AS`` (activation score): ``|a_k|``.
* ``WI`` (weight importance): ``n_k``. Input-independent: every edit of a batch gets the same scores and the
  same neuron set, so WI sets carry no information for clustering (the clustering then uses AS sets).
* ``RS`` (residual sensitivity): ``|a_k| * n_k`` (the size of neuron k's contribution to the residual stream).

Selection: sort the scores in descending order (stable, so ties go to the lower index), take the smallest
prefix whose cumulative sum reaches ``p`` times the total. It is never empty (a single dominant neuron gives a
set of size 1; an all-zero score vector gives the first neuron). ``p = 1`` selects exactly the neurons with a
non-zero score (the cumulative-sum test would be at the mercy of rounding there).

Batch set: the batch score of neuron k is ``sum_i s_ik / sum_j s_ij``: each edit's scores normalised to sum 1,
then summed, so that every edit weighs the same in the batch set whatever its activation scale (the authors'
code sums raw ``|a_k|``, which lets edits with large activations dominate). The same selection rule is applied
to the batch score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

METHODS = ("AS", "WI", "RS")


def neuron_scores(method: str, acts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Scores ``[n_edits, d_ff]`` (float64) for ``acts`` ``[n_edits, d_ff]`` and ``norms`` ``[d_ff]``."""
    if acts.dim() != 2 or norms.dim() != 1 or acts.shape[1] != norms.shape[0]:
        raise ValueError(f"acts {tuple(acts.shape)} and norms {tuple(norms.shape)} do not match")
    a = acts.detach().double().abs()
    n = norms.detach().double().to(a.device)
    if method == "AS":
        return a
    if method == "WI":
        return n.unsqueeze(0).expand_as(a).clone()
    if method == "RS":
        return a * n.unsqueeze(0)
    raise ValueError(f"attribution method must be one of {METHODS}, got {method!r}")


def select_top_p(scores: torch.Tensor, p: float) -> list[torch.Tensor]:
    """For each row of ``scores`` ``[n, d]`` (or a single ``[d]``), the smallest set of top neurons whose
    cumulative score reaches ``p`` of the row total, as sorted index tensors (ascending). Vectorised."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must lie in (0, 1], got {p}")
    s = scores.detach().double()
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if (s < 0).any():
        raise ValueError("neuron scores must be non-negative")
    order = torch.sort(s, dim=1, descending=True, stable=True)
    cums = order.values.cumsum(1)
    totals = cums[:, -1:]
    if p >= 1.0:
        sizes = (s > 0).sum(1)
    else:
        sizes = (cums < p * totals).sum(1) + 1
    sizes = sizes.clamp(min=1, max=s.shape[1])
    return [order.indices[i, : int(sizes[i])].sort().values for i in range(s.shape[0])]


def share_of(scores: torch.Tensor, idx: torch.Tensor) -> float:
    """Share of the total of ``scores`` ``[d]`` held by neurons ``idx``."""
    total = float(scores.sum())
    return float(scores[idx.to(scores.device)].sum()) / total if total > 0 else 0.0


def batch_scores(scores: torch.Tensor) -> torch.Tensor:
    """Batch score ``[d_ff]``: the sum over edits of each edit's scores normalised to sum 1."""
    totals = scores.sum(1, keepdim=True)
    return (scores / torch.where(totals > 0, totals, torch.ones_like(totals))).sum(0)


@dataclass
class LayerAttribution:
    """Attribution of one layer for a batch."""

    layer: int
    scores: torch.Tensor  # [n_edits, d_ff] float64
    edit_sets: list[torch.Tensor]  # per edit, sorted neuron indices
    batch_score: torch.Tensor  # [d_ff]
    batch_set: torch.Tensor  # sorted neuron indices
    cluster_sets: list[torch.Tensor]  # the per-edit sets used for clustering (AS sets for WI)

    @property
    def edit_shares(self) -> list[float]:
        return [share_of(self.scores[i], s) for i, s in enumerate(self.edit_sets)]

    @property
    def batch_share(self) -> float:
        return share_of(self.batch_score, self.batch_set)


def attribute_layer(
    layer: int, method: str, acts: torch.Tensor, norms: torch.Tensor, p: float
) -> LayerAttribution:
    """Scores, per-edit sets, batch score and batch set of one layer."""
    scores = neuron_scores(method, acts, norms)
    edit_sets = select_top_p(scores, p)
    batch = batch_scores(scores)
    batch_set = select_top_p(batch, p)[0]
    cluster_sets = edit_sets if method != "WI" else select_top_p(neuron_scores("AS", acts, norms), p)
    return LayerAttribution(layer, scores, edit_sets, batch, batch_set, cluster_sets)
