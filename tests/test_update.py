"""The masked least-squares update: normal equations, untouched neurons, undo."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_gpt2, make_hparams, make_llama

from ece_plugin.method.architecture import w_out
from ece_plugin.method.update import masked_gram, masked_update, spd_solve, undo, write_layers


def _problem(d_ff: int = 20, n: int = 3, s: int = 8, d_model: int = 6, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(s, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    x = torch.randn(s, 50, generator=g, dtype=torch.float64)
    c0 = x @ x.t() / 50
    y = torch.randn(s, 4, generator=g, dtype=torch.float64)
    cprev = y @ y.t()
    return k, r, c0, cprev


def test_solution_meets_its_normal_equations() -> None:
    k, r, c0, cprev = _problem()
    lam = 7.0
    delta = masked_update(k, r, c0, cprev, lam)
    a = lam * c0 + cprev + k @ k.t()
    torch.testing.assert_close(delta @ a, r @ k.t(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(masked_gram(k, c0, cprev, lam), a)


def test_carried_keys_shrink_the_update_along_old_keys() -> None:
    k, r, c0, _ = _problem()
    old = torch.randn(k.shape[0], 2, dtype=torch.float64)
    free = masked_update(k, r, c0, None, 1.0)
    kept = masked_update(k, r, c0, 1e4 * old @ old.t(), 1.0)
    assert (kept @ old).norm() < 0.1 * (free @ old).norm()


def test_singular_gram_falls_back_to_minimum_norm() -> None:
    k, r, _, _ = _problem(n=2, s=8)
    delta = masked_update(k, r, None, None, 0.0)  # K K^T has rank 2 < 8
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(delta @ (k @ k.t()), r @ k.t(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        spd_solve(torch.eye(3, dtype=torch.float64) * 2, torch.ones(3, 1, dtype=torch.float64)),
        torch.full((3, 1), 0.5, dtype=torch.float64),
    )


@pytest.mark.parametrize(("family", "d_ff"), [("llama", 48), ("gpt2", 64), ("gpt2", 32)])
def test_write_layers_touches_only_the_selected_neurons(family: str, d_ff: int, tok: Any) -> None:
    model = (make_llama if family == "llama" else make_gpt2)(len(tok), hidden=32, d_ff=d_ff)
    hp = make_hparams(family)
    w_outs = [w_out(model, hp.rewrite_module_tmp, layer) for layer in hp.layers]
    before = [wo.weight.detach().clone() for wo in w_outs]
    sets = [torch.tensor([1, 5, 9]), torch.tensor([0, 30])]
    n = 2
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, d_ff, generator=g)
    z = torch.randn(n, 32, generator=g)

    def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, torch.zeros(n, 32)

    writes = write_layers(
        w_outs,
        sets,
        z,
        read,
        lambda name, idx, dev: torch.eye(len(idx), dtype=torch.float64),
        lambda name, idx, dev: torch.zeros(len(idx), len(idx), dtype=torch.float64),
        lam=1.0,
    )
    for i, (wo, s) in enumerate(zip(w_outs, sets)):
        changed = wo.weight.detach() != before[i]
        per_neuron = changed.any(dim=1 - wo.axis)  # neuron axis survives
        assert per_neuron.nonzero().flatten().tolist() == s.tolist()
        # the written values are the solution of layer i's system (residual spread over 2 layers)
        ks = keys[:, s].double().t()
        resid = (z.double() / (2 - i)).t()
        expected = masked_update(ks, resid, torch.eye(len(s), dtype=torch.float64), None, 1.0)
        torch.testing.assert_close(
            wo.read_neurons(s) - before[i].index_select(wo.axis, s).t().contiguous()
            if wo.axis == 0
            else wo.read_neurons(s) - before[i][:, s],
            expected.float(),
            rtol=1e-5,
            atol=1e-5,
        )
        assert torch.equal(writes[i].idx, s)
    undo(w_outs, writes)
    for wo, b in zip(w_outs, before):
        assert torch.equal(wo.weight.detach(), b)


def test_exception_restores_written_layers(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama")
    w_outs = [w_out(model, hp.rewrite_module_tmp, layer) for layer in hp.layers]
    before = [wo.weight.detach().clone() for wo in w_outs]

    def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 1:
            raise RuntimeError("boom")
        return torch.randn(2, 48), torch.zeros(2, 32)

    with pytest.raises(RuntimeError, match="boom"):
        write_layers(
            w_outs,
            [torch.arange(4), torch.arange(4)],
            torch.randn(2, 32),
            read,
            lambda *a: None,
            lambda name, idx, dev: None,
            1.0,
        )
    for wo, b in zip(w_outs, before):
        assert torch.equal(wo.weight.detach(), b)
