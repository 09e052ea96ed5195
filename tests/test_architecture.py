"""Neuron axis of W_out: nn.Linear columns vs GPT-2 Conv1D rows, decided by type (never by shape)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_gpt2, make_hparams, make_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from ece_plugin.method.architecture import ArchitectureError, WOut, get_module, neuron_axis, w_out


def _pair(d_ff: int, d_model: int) -> tuple[WOut, WOut]:
    torch.manual_seed(0)
    lin = nn.Linear(d_ff, d_model, bias=False)
    conv = Conv1D(d_model, d_ff)  # weight [d_ff, d_model], y = x @ W
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.zero_()
    return WOut(0, "lin", lin, neuron_axis(lin)), WOut(0, "conv", conv, neuron_axis(conv))


@pytest.mark.parametrize(("d_ff", "d_model"), [(12, 5), (6, 6)])
def test_linear_and_conv1d_have_the_same_neuron_semantics(d_ff: int, d_model: int) -> None:
    lin, conv = _pair(d_ff, d_model)
    assert (lin.axis, conv.axis) == (1, 0)
    assert lin.d_ff == conv.d_ff == d_ff and lin.d_model == conv.d_model == d_model
    torch.testing.assert_close(lin.neuron_view(), conv.neuron_view())
    torch.testing.assert_close(lin.neuron_norms(), conv.neuron_norms())
    idx = torch.tensor([1, 3])
    torch.testing.assert_close(lin.read_neurons(idx), conv.read_neurons(idx))
    delta = torch.randn(d_model, 2, dtype=torch.float64)
    lin.add_to_neurons(idx, delta)
    conv.add_to_neurons(idx, delta)
    torch.testing.assert_close(lin.neuron_view(), conv.neuron_view())
    # neuron k's output weights are what the module adds to its output per unit of input k
    x = torch.zeros(1, d_ff)
    x[0, 3] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(lin.module(x)[0], lin.neuron_view()[:, 3])
        torch.testing.assert_close(conv.module(x)[0], conv.neuron_view()[:, 3])


def test_conv1d_square_writes_rows_not_columns() -> None:
    _, conv = _pair(6, 6)
    before = conv.weight.detach().clone()
    conv.add_to_neurons(torch.tensor([2]), torch.ones(6, 1))
    changed = conv.weight.detach() != before
    assert changed[2].all() and changed.sum() == 6  # row 2 only


def test_other_neurons_stay_bit_identical() -> None:
    lin, _ = _pair(12, 5)
    before = lin.weight.detach().clone()
    idx = torch.tensor([0, 7])
    lin.add_to_neurons(idx, torch.randn(5, 2, dtype=torch.float64))
    keep = torch.ones(12, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(lin.weight.detach()[:, keep], before[:, keep])
    assert not torch.equal(lin.weight.detach()[:, ~keep], before[:, ~keep])


def test_wrong_delta_shape_raises() -> None:
    lin, _ = _pair(12, 5)
    with pytest.raises(ValueError, match="delta shape"):
        lin.add_to_neurons(torch.tensor([0]), torch.zeros(12, 1))


def test_real_models(tok: Any) -> None:
    gpt2 = make_gpt2(len(tok), hidden=32, d_ff=64)
    wo = w_out(gpt2, make_hparams("gpt2").rewrite_module_tmp, 1)
    assert wo.axis == 0 and wo.d_ff == 64 and wo.d_model == 32 and wo.weight_name.endswith("c_proj.weight")
    square = make_gpt2(len(tok), hidden=32, d_ff=32)
    assert w_out(square, make_hparams("gpt2").rewrite_module_tmp, 0).axis == 0
    llama = make_llama(len(tok), hidden=32, d_ff=48)
    wo = w_out(llama, make_hparams("llama").rewrite_module_tmp, 0)
    assert wo.axis == 1 and wo.d_ff == 48 and wo.d_model == 32


def test_unsupported_and_missing_modules(tok: Any) -> None:
    with pytest.raises(ArchitectureError, match="unsupported W_out"):
        neuron_axis(nn.Embedding(3, 4))
    with pytest.raises(ArchitectureError, match="not found"):
        get_module(make_llama(len(tok)), "model.layers.9.mlp.down_proj")
