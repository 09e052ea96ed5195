"""The masked least-squares update (ECE stage 4).

For each edited layer l (in order) with batch neuron set S, keys K (``[d_ff, n]``, recomputed after the earlier
layers changed), targets z and current z-layer outputs, MEMIT's residual spread ``R = (z - cur) / (L - i)``
(``[d_model, n]``) is written into the neurons S only:

    Delta_S = R K_S^T (lambda C0_SS + Cprev_SS + K_S K_S^T)^{-1}

(the editor passes ``Cprev_SS`` with the terms of the active variants added, ``variants/``), solved in float64 (Cholesky; LU if that fails; minimum-norm least squares if the matrix is singular, which can
only happen with ``mom2_adjustment: false`` and no carried keys), never with an explicit inverse. The neurons
outside S are not written at all, so they stay bit-identical. With S = all neurons and Cprev = 0 this is
exactly MEMIT's update ``R K^T (lambda C0 + K K^T)^{-1}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .architecture import WOut
from .finite import NonFiniteUpdateError, count_nonfinite, describe_nonfinite

logger = logging.getLogger(__name__)


def masked_gram(
    keys_s: torch.Tensor,
    c0_ss: Optional[torch.Tensor],
    cprev_ss: Optional[torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """``lambda C0_SS + Cprev_SS + K_S K_S^T`` (float64) for ``keys_s`` ``[|S|, n]``."""
    k = keys_s.double()
    a = k @ k.t()
    if c0_ss is not None:
        a = a + lam * c0_ss.to(device=a.device, dtype=torch.float64)
    if cprev_ss is not None:
        a = a + cprev_ss.to(device=a.device, dtype=torch.float64)
    return a


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^{-1} b`` for symmetric positive (semi-)definite ``a`` (float64), without forming an inverse."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:
        logger.warning("update: the masked Gram matrix is singular; using the minimum-norm solution")
        if a.device.type == "cpu":
            return torch.linalg.lstsq(a, b, driver="gelsd").solution
        return torch.linalg.pinv(a, hermitian=True) @ b


def masked_update(
    keys_s: torch.Tensor,
    resid: torch.Tensor,
    c0_ss: Optional[torch.Tensor],
    cprev_ss: Optional[torch.Tensor],
    lam: float,
    rhs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``Delta_S = R K_S^T A^{-1}`` (``[d_model, |S|]``, float64) for ``keys_s`` ``[|S|, n]`` and ``resid``
    ``[d_model, n]``: computed as ``R (A^{-1} K_S)^T`` like MEMIT (n right-hand sides; A is symmetric). ``rhs``
    ``[d_model, |S|]`` (a variant's term, None: none) joins the right-hand side: ``(R K_S^T + rhs) A^{-1}``."""
    if keys_s.shape[1] != resid.shape[1]:
        raise ValueError(f"keys {tuple(keys_s.shape)} and residuals {tuple(resid.shape)} disagree on n")
    a = masked_gram(keys_s, c0_ss, cprev_ss, lam)
    sol = spd_solve(a, keys_s.double().to(a.device))
    delta = resid.double().to(a.device) @ sol.t()
    if rhs is not None:
        delta = delta + spd_solve(a, rhs.to(device=a.device, dtype=torch.float64).t()).t()
    return delta


# ------------------------------------------------------------------------------------------ layers loop
KeyReader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
BlockFn = Callable[[str, torch.Tensor, torch.device], Optional[torch.Tensor]]
RhsFn = Callable[[str, torch.Tensor, torch.device], Optional[torch.Tensor]]  # [d_model, |S|] or None


@dataclass
class LayerWrite:
    """What was written into one layer (for the trace) and the values needed to undo it."""

    layer: int
    name: str
    idx: torch.Tensor  # neuron set S (CPU)
    pre: torch.Tensor  # W_out neurons S before the edit, native layout
    post: torch.Tensor  # after the edit, native layout
    residual_norm: float  # mean ||z - cur|| over the batch before this layer
    update_norm: float  # ||Delta_S||_F
    seconds: dict[str, float] = field(default_factory=dict)


def write_layers(
    w_outs: Sequence[WOut],
    sets: Sequence[torch.Tensor],
    z: torch.Tensor,
    read: KeyReader,
    c0_block: BlockFn,
    cprev_block: BlockFn,
    lam: float,
    journal: Optional[list[LayerWrite]] = None,
    rhs_block: Optional[RhsFn] = None,
) -> list[LayerWrite]:
    """Write the masked update into each layer in order; ``read(i)`` gives (keys ``[n, d_ff]``, current
    z-layer outputs ``[n, d_model]``) of layer i on the model as it is then; ``c0_block`` and ``cprev_block`` give
    a layer's ``C0_SS`` and ``Cprev_SS`` blocks (None: none).

    Every layer's record (with its pre-edit values) enters ``journal`` (a new list when not given) BEFORE the
    layer is written, so a caller holding the journal can always undo. On any exception (``KeyboardInterrupt``
    included) every neuron written so far is restored before re-raising. A layer whose written neurons are not
    all finite raises :class:`~ece_plugin.method.finite.NonFiniteUpdateError` naming the layer and the non-finite
    input, after that rollback."""
    writes: list[LayerWrite] = [] if journal is None else journal
    n_layers = len(w_outs)
    try:
        for i, (wo, idx) in enumerate(zip(w_outs, sets)):
            t0 = time.perf_counter()
            keys, cur = read(i)
            t1 = time.perf_counter()
            dev = wo.device
            idx_dev = idx.to(dev)
            diff = z.to(cur.device) - cur  # [n, d_model] float32, as MEMIT's targets
            resid = (diff.double() / (n_layers - i)).t().to(dev)
            keys_s = keys.to(dev).index_select(1, idx_dev).t()
            c0 = c0_block(wo.name, idx, dev)
            cprev = cprev_block(wo.name, idx, dev)
            t2 = time.perf_counter()
            rhs = rhs_block(wo.name, idx, dev) if rhs_block is not None else None
            delta = masked_update(keys_s, resid, c0, cprev, lam, rhs)
            record = LayerWrite(
                layer=wo.layer,
                name=wo.name,
                idx=idx.cpu(),
                pre=wo.read_native(idx_dev).cpu(),
                post=torch.empty(0),
                residual_norm=float(diff.norm(dim=1).mean()),
                update_norm=float(delta.norm()),
            )
            writes.append(record)  # before the write: an interrupt during it is undone too
            wo.add_to_neurons(idx_dev, delta)
            record.post = wo.read_native(idx_dev).cpu()
            record.seconds = {"keys": t1 - t0, "statistics": t2 - t1, "solve": time.perf_counter() - t2}
            if count_nonfinite(record.post):
                inputs = {"keys": keys_s, "targets z": z, "current outputs": cur, "C0 block": c0,
                          "Cprev block": cprev, "solved update": delta}
                bad = [name for name, t in inputs.items() if count_nonfinite(t)]
                why = (f"non-finite {', '.join(bad)}" if bad
                       else f"the update overflows the weights' dtype {wo.weight.dtype}")
                raise NonFiniteUpdateError(
                    f"layer {wo.layer} ({wo.name}): the update would make weights non-finite "
                    f"({describe_nonfinite(record.post)}; cause: {why}); the batch was rolled back, "
                    "no weight changed"
                )
            logger.info(
                "layer %d: %d/%d neurons, residual %.3f, update norm %.3f",
                wo.layer,
                idx.numel(),
                wo.d_ff,
                record.residual_norm,
                record.update_norm,
            )
    except BaseException:
        undo(w_outs, writes)
        raise
    return writes


@torch.no_grad()
def undo(w_outs: Sequence[WOut], writes: Sequence[LayerWrite]) -> None:
    """Put back the pre-edit values of every written neuron (last written first)."""
    by_name = {wo.name: wo for wo in w_outs}
    for w in reversed(list(writes)):
        wo = by_name[w.name]
        wo.weight.index_copy_(wo.axis, w.idx.to(wo.device), w.pre.to(device=wo.device, dtype=wo.weight.dtype))
