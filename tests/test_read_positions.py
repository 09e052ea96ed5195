"""The loss layer's MLP at the read positions only (read_positions.py): the same z, fewer tokens through it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from conftest import FACTS, make_hparams, make_llama, make_tokenizer
from test_prefix_cache import EXTRA, TEMPLATES, _hparams, _model, assert_same_z

from ece_plugin.method.architecture import ArchitectureError
from ece_plugin.method.requests import normalise_requests
from ece_plugin.method.speed.read_positions import mlp_at_positions
from ece_plugin.method.values import compute_z, z_modules


def test_the_mlp_runs_at_the_given_positions_only() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    x = torch.randn(3, 5, 4)
    rows, pos = torch.tensor([0, 2, 2, 0]), torch.tensor([4, 1, 3, 4])  # (0, 4) twice
    seen: list[tuple[int, ...]] = []
    mlp[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    with mlp_at_positions(mlp, rows, pos):
        out = mlp(x)
    assert seen == [(1, 3, 4)]  # three distinct tokens went in
    full = mlp(x)
    assert seen[-1] == (3, 5, 4)  # the hooks are gone after the block
    read = torch.zeros(3, 5, dtype=torch.bool)
    read[rows, pos] = True
    torch.testing.assert_close(out[read], full[read])
    assert torch.all(out[~read] == 0)


def test_a_module_returning_a_tuple_is_refused_by_name() -> None:
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    pair = Pair()
    with pytest.raises(ArchitectureError, match="z_loss_positions_only: false"):
        with mlp_at_positions(pair, torch.tensor([0]), torch.tensor([0])):
            pair(torch.zeros(1, 2, 3))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_z_with_the_loss_mlp_at_read_positions_equals_z_without(family: str) -> None:
    tok = make_tokenizer(bos=family == "llama")
    model = _model(family, len(tok))
    model = model.double() if family == "llama" else model  # strict check in float64 (see test_prefix_cache)
    reqs = normalise_requests(FACTS + EXTRA)
    hp = dataclasses.replace(_hparams(family), shared_grad_steps=3, per_edit_grad_steps=6, kl_factor=0.5)
    assert hp.z_loss_positions_only and z_modules(model, hp).loss_mlp is not None
    loss_mlp = model.get_submodule(hp.mlp_module_tmp.format(2))
    tokens = [0]

    def count(module: Any, args: tuple, output: torch.Tensor) -> None:
        tokens[0] += output.shape[0] * output.shape[1]

    loss_mlp.register_forward_hook(count)  # registered first: it sees the MLP's own output
    cluster_of, anchors = [0, 1, 0, 1, 0, 1], [0, 3]
    sparse = compute_z(model, tok, reqs, TEMPLATES, hp, cluster_of, anchors, True)
    sparse_tokens, tokens[0] = tokens[0], 0
    full = compute_z(
        model, tok, reqs, TEMPLATES, dataclasses.replace(hp, z_loss_positions_only=False), cluster_of, anchors, True
    )
    assert 0 < sparse_tokens < tokens[0]
    assert_same_z(family, sparse, full)


def test_nothing_changes_when_the_loss_layer_is_the_z_layer(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", layers=[0, 2], v_loss_layer=2)  # z at the last layer: no layer after it
    assert z_modules(model, hp).loss_mlp is None


def test_a_missing_mlp_module_warns_and_runs_everywhere(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", mlp_module_tmp="model.layers.{}.feed_forward")
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.values"):
        assert z_modules(model, hp).loss_mlp is None
    assert "loss layer's MLP runs at every position" in caplog.text
