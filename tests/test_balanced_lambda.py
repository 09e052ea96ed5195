"""mom2_update_weight_growth (a departure, 0 in the paper's form): the batch after n carried edits is written with
lambda + beta * n."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method.hparams import HParamsError
from ece_plugin.method.variants import VARIANTS, active_variants
from ece_plugin.method.variants.balanced_lambda import BalancedLambda

LAMBDA, BETA = 0.1, 0.05


def _hparams(**overrides: Any) -> Any:
    values = {"clustering": False, "neuron_threshold": 1.0, "v_num_grad_steps": 5, "v_lr": 1.0,
              "mom2_update_weight": LAMBDA, **overrides}
    return make_hparams("llama", **values)


def _weights(model: torch.nn.Module, hp: Any) -> list[torch.Tensor]:
    return [model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.detach().clone() for layer in hp.layers]


def _two_batches(model: torch.nn.Module, tok: Any, first: Any, second: Any) -> list[list[torch.Tensor]]:
    """The weights after each of two sequential batches (FACTS[:2], then FACTS[2:]), with the given hparams."""
    fake_session(model, first)
    out = []
    for batch, hp in ((FACTS[:2], first), (FACTS[2:], second)):
        torch.manual_seed(0)
        apply_ece_to_model(model, tok, batch, hp)
        out.append(_weights(model, hp))
    return out


def test_off_in_the_papers_form() -> None:
    assert VARIANTS["balanced_lambda"] is BalancedLambda
    assert not any(isinstance(v, BalancedLambda) for v in active_variants(make_hparams("llama")))
    assert any(isinstance(v, BalancedLambda) for v in active_variants(_hparams(mom2_update_weight_growth=BETA)))


def test_each_batch_is_written_with_lambda_plus_beta_times_the_carried_edits(tok: Any) -> None:
    base = make_llama(len(tok))
    grown = _two_batches(copy.deepcopy(base), tok, _hparams(mom2_update_weight_growth=BETA),
                         _hparams(mom2_update_weight_growth=BETA))
    # the same sequence with lambda set by hand: LAMBDA for the first batch, LAMBDA + BETA * 2 for the second
    by_hand = _two_batches(copy.deepcopy(base), tok, _hparams(),
                           _hparams(mom2_update_weight=LAMBDA + BETA * 2))
    plain = _two_batches(copy.deepcopy(base), tok, _hparams(), _hparams())
    for g, p in zip(grown[0], plain[0]):
        assert torch.equal(g, p)  # the first batch carries nothing: the paper's lambda
    for g, h, p in zip(grown[1], by_hand[1], plain[1]):
        assert torch.allclose(g, h, rtol=0, atol=1e-6)
        assert not torch.allclose(g, p, rtol=0, atol=1e-6)  # and lambda did change


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mom2_update_weight_growth": -1.0}, "mom2_update_weight_growth: must be >= 0"),
    ({"mom2_update_weight_growth": 1.0, "carry_keys": False}, "needs carry_keys: true"),
    ({"mom2_update_weight_growth": 1.0, "mom2_adjustment": False}, "mom2_adjustment: true"),
])
def test_bad_values_are_refused_naming_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(HParamsError, match=message):
        _hparams(**overrides)
