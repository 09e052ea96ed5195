"""carry_values (a departure, off in the paper's form): the outputs earlier edits wrote are carried with their keys,
and the update's least squares keeps them. Checked against the explicit sums and the explicit objective."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama
from test_state import LAYER, W_OUT, tiny_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method.hparams import HParamsError
from ece_plugin.method.state import SequentialState, StateError, neuron_values
from ece_plugin.method.update import masked_update


def _weight(model: torch.nn.Module) -> torch.Tensor:
    return model.get_parameter(W_OUT)  # nn.Linear [d_model, d_ff]: the [d_model, d_ff] view itself


def _write_batch(model: torch.nn.Module, state: SequentialState, n: int, seed: int, values: bool = True) -> torch.Tensor:
    """Write random values into 5 neurons, stage the batch's keys (and V = W K) and commit it; return K."""
    g = torch.Generator().manual_seed(seed)
    weight = _weight(model)
    idx = torch.randperm(weight.shape[1], generator=g)[:5]
    with torch.no_grad():
        weight[:, idx] += torch.randn(weight.shape[0], 5, generator=g)
    keys = torch.randn(weight.shape[1], n, generator=g)
    v = weight.detach().double() @ keys.double() if values else None
    state.stage({LAYER: keys}, {W_OUT: (idx, neuron_values(weight, idx).clone())}, n_edits=n,
                values=None if v is None else {LAYER: v})
    assert state.reconcile(model) == "committed"
    return keys


def _explicit_drift(batches: list[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
    """sum_j (v_j - W k_j) k_{j,S}^T over (keys, values) of every batch."""
    w = weight.detach().double()
    return sum((v - w @ k.double()) @ k.double()[idx].T for k, v in batches)


@pytest.mark.parametrize("n", [2, 7])  # 2: keys kept low rank (3 batches, 2 * 6 <= d_ff 16); 7: dense
def test_drift_is_the_sum_of_what_later_writes_moved(n: int) -> None:
    model = tiny_llama()
    state = SequentialState()
    batches = []
    for seed in range(3):
        keys = _write_batch(model, state, n, seed)
        batches.append((keys, _weight(model).detach().double() @ keys.double()))  # v = W_t k right after
    assert state.is_dense(LAYER) == (n == 7)
    idx = torch.tensor([0, 2, 3, 9, 15])
    after_last = state.drift_masked(LAYER, idx, _weight(model), "cpu")
    assert after_last is not None  # batches 2 and 3 moved batch 1's outputs, batch 3 batch 2's; nothing batch 3's
    tol = 1e-9 if n == 2 else 1e-5  # the dense Cprev is float32 (the state's dtype); M is float64
    expected = _explicit_drift(batches[:2], _weight(model), idx)
    torch.testing.assert_close(after_last, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    with torch.no_grad():  # a later write moves every earlier edit's output
        _weight(model)[:, [2, 9]] += 0.5
    drift = state.drift_masked(LAYER, idx, _weight(model), "cpu")
    expected = _explicit_drift(batches, _weight(model), idx)
    torch.testing.assert_close(drift, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert float(drift.norm()) > 0.1


def test_masked_update_with_drift_minimises_the_objective_with_earlier_targets() -> None:
    """Delta_S from (R K^T + E)(lambda C0 + Cprev + K K^T)^-1 equals the least squares over new edits (targets R),
    earlier edits (targets v_j - W k_j at keys k_j) and lambda C0, solved as one stacked problem."""
    g = torch.Generator().manual_seed(0)
    d_model, s, n, n_old, lam = 6, 10, 4, 12, 3.0
    keys = torch.randn(s, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    old_keys = torch.randn(s, n_old, generator=g, dtype=torch.float64)
    old_targets = torch.randn(d_model, n_old, generator=g, dtype=torch.float64)  # v_j - W k_j
    a = torch.randn(s, 3 * s, generator=g, dtype=torch.float64)
    c0 = a @ a.T / (3 * s)
    delta = masked_update(keys, resid, c0, old_keys @ old_keys.T, lam, drift_s=old_targets @ old_keys.T)
    root = torch.linalg.cholesky(lam * c0)  # lambda C0 = L L^T: lambda tr(D C0 D^T) = ||D L||^2
    big_k = torch.cat([keys, old_keys, root], dim=1)
    big_r = torch.cat([resid, old_targets, torch.zeros(d_model, s, dtype=torch.float64)], dim=1)
    stacked = torch.linalg.lstsq(big_k.T, big_r.T).solution.T
    torch.testing.assert_close(delta, stacked, rtol=1e-8, atol=1e-10)
    # without drift it is the paper's update
    torch.testing.assert_close(
        masked_update(keys, resid, c0, old_keys @ old_keys.T, lam, drift_s=None),
        masked_update(keys, resid, c0, old_keys @ old_keys.T, lam, drift_s=torch.zeros(d_model, s, dtype=torch.float64)),
    )
    with pytest.raises(ValueError, match="drift"):
        masked_update(keys, resid, c0, None, lam, drift_s=torch.zeros(d_model, s + 1))


def test_start_values_save_load_rollback_and_a_batch_without_values(tmp_path: Path, caplog: Any) -> None:
    model = tiny_llama()
    state = SequentialState()
    keys0 = _write_batch(model, state, 3, 0, values=False)  # the paper's form: keys only
    idx = torch.arange(16)
    assert not state.carries_values(LAYER) and state.drift_masked(LAYER, idx, _weight(model), "cpu") is None
    checkpoint = state.checkpoint()
    state.start_values(LAYER, _weight(model))  # the earlier edits' outputs as they are now become targets
    assert state.carries_values(LAYER)
    torch.testing.assert_close(state.drift_masked(LAYER, idx, _weight(model), "cpu"),
                               torch.zeros(8, 16, dtype=torch.float64), atol=1e-9, rtol=0)
    state.rollback(checkpoint)
    assert not state.carries_values(LAYER)
    state.start_values(LAYER, _weight(model))
    w_then = _weight(model).detach().double().clone()
    keys1 = _write_batch(model, state, 3, 1)
    expected = _explicit_drift([(keys0, w_then @ keys0.double()), (keys1, _weight(model).detach().double() @ keys1.double())],
                               _weight(model) * 0.5, idx)
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = SequentialState.load(path, model)
    for s in (state, loaded):
        torch.testing.assert_close(s.drift_masked(LAYER, idx, _weight(model) * 0.5, "cpu"), expected)
    # a state file whose metadata promises values it does not hold is refused, naming the layer
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.endswith("::values")}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(StateError, match=f"values for layer '{LAYER}' missing"):
        SequentialState.load(bad)
    # a batch committed without values: M no longer matches Cprev, so it is dropped with a warning
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.state"):
        _write_batch(model, loaded, 2, 2, values=False)
    assert not loaded.carries_values(LAYER) and "no longer carried" in caplog.text


def test_stage_refuses_values_of_the_wrong_shape() -> None:
    state = SequentialState()
    idx = torch.tensor([0])
    with pytest.raises(StateError, match="expected \\[d_model, 3\\]"):
        state.stage({LAYER: torch.randn(16, 3)}, {W_OUT: (idx, torch.zeros(8, 1))}, 3,
                    values={LAYER: torch.randn(8, 2)})
    with pytest.raises(StateError, match="values for layers"):
        state.stage({LAYER: torch.randn(16, 3)}, {W_OUT: (idx, torch.zeros(8, 1))}, 3, values={"other": torch.randn(8, 3)})
    assert not state.has_pending


def test_carry_values_needs_carry_keys() -> None:
    with pytest.raises(HParamsError, match="carry_values: needs carry_keys"):
        make_hparams("llama", carry_values=True, carry_keys=False)


def test_editor_with_carry_values_is_the_paper_form_until_a_later_write_moves_earlier_outputs(tok: Any) -> None:
    """Batch 2 sees no drift (nothing has moved batch 1's outputs yet) so it writes what the paper's form writes;
    batch 3 sees the drift batch 2 caused, writes something else, and the trace reports it."""
    hp = make_hparams("llama", layers=[0, 1], clustering=False, v_num_grad_steps=3)
    hv = copy.deepcopy(hp)
    hv.carry_values = True
    paper, carried = make_llama(len(tok)), make_llama(len(tok))
    carried.load_state_dict(paper.state_dict())
    s_paper, s_carried = fake_session(paper, hp), fake_session(carried, hv)
    names = [hp.rewrite_module_tmp.format(layer) + ".weight" for layer in hp.layers]
    for batch in (FACTS[:2], FACTS[2:]):
        apply_ece_to_model(paper, tok, batch, hp)
        apply_ece_to_model(carried, tok, batch, hv)
        for name in names:
            torch.testing.assert_close(carried.get_parameter(name), paper.get_parameter(name), rtol=1e-5, atol=1e-6)
    drift = [layer["drift_norm"] for layer in s_carried.last_trace.to_dict()["layers"]]
    assert all(d is not None and d < 1e-4 for d in drift)
    assert all(layer["drift_norm"] is None for layer in s_paper.last_trace.to_dict()["layers"])
    apply_ece_to_model(paper, tok, FACTS[:1], hp)
    apply_ece_to_model(carried, tok, FACTS[:1], hv)
    drift = [layer["drift_norm"] for layer in s_carried.last_trace.to_dict()["layers"]]
    assert all(d > 1e-3 for d in drift)
    assert any(not torch.allclose(carried.get_parameter(n), paper.get_parameter(n), rtol=1e-5, atol=1e-6) for n in names)
    assert s_carried.state.carries_values(hp.rewrite_module_tmp.format(0))
