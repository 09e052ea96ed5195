"""norm_anchor_budget (a departure, 0 in the paper's form): every edited layer's drift from its unedited weight is
pulled back onto a ball of norm_anchor_budget * ||W0|| before each batch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method.hparams import HParamsError
from ece_plugin.method.variants import VARIANTS, active_variants
from ece_plugin.method.variants.norm_anchor import NormAnchor, NormAnchorError, drift_ratio, pull_back

BATCHES = [FACTS[:2], FACTS[2:], FACTS[:2], FACTS[2:]]  # the same facts again: the drift keeps growing


def _hparams(**overrides: Any) -> Any:
    return make_hparams("llama", clustering=False, neuron_threshold=1.0, v_num_grad_steps=5, v_lr=1.0,
                        mom2_update_weight=0.1, **overrides)


def _names(hp: Any) -> list[str]:
    return [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]


def _sequence(model: Any, tok: Any, hp: Any) -> None:
    fake_session(model, hp)
    for batch in BATCHES:
        apply_ece_to_model(model, tok, batch, hp)


def test_pull_back_scales_the_drift_onto_the_budget() -> None:
    w0 = torch.randn(6, 8)
    w = w0 + 3.0 * torch.randn(6, 8)
    ratio = drift_ratio(w, w0)
    factor = pull_back(w, w0, 0.5)
    assert factor == pytest.approx(0.5 / ratio, rel=1e-5)
    assert drift_ratio(w, w0) == pytest.approx(0.5, rel=1e-5)
    inside = w.clone()
    assert pull_back(w, w0, 0.6) == 1.0 and torch.equal(w, inside)  # within the budget: unchanged


def test_off_in_the_paper_form_and_a_budget_never_reached_changes_nothing(tok: Any) -> None:
    assert "norm_anchor" in VARIANTS and not NormAnchor.is_active(make_hparams("llama"))
    assert not any(isinstance(v, NormAnchor) for v in active_variants(make_hparams("llama")))
    base = make_llama(len(tok))
    anchored = copy.deepcopy(base)
    hp = _hparams()
    _sequence(base, tok, hp)
    _sequence(anchored, tok, _hparams(norm_anchor_budget=1e6))
    for name in _names(hp):
        assert torch.equal(base.get_submodule(name).weight, anchored.get_submodule(name).weight)


def test_every_layer_starts_each_batch_within_the_budget(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_llama(len(tok))
    w0 = {n: base.get_submodule(n).weight.detach().clone() for n in _names(_hparams())}
    free = copy.deepcopy(base)
    _sequence(free, tok, _hparams())
    grown = {n: drift_ratio(free.get_submodule(n).weight, w) for n, w in w0.items()}
    budget = 0.5 * min(grown.values())  # the unbounded sequence grows past it in every layer
    seen: list[dict[str, float]] = []
    start = NormAnchor.start

    def watched(self: NormAnchor, model: Any, n_edits_before: int) -> None:
        start(self, model, n_edits_before)
        seen.append({n: drift_ratio(model.get_submodule(n).weight, w) for n, w in w0.items()})

    monkeypatch.setattr(NormAnchor, "start", watched)
    anchored = copy.deepcopy(base)
    _sequence(anchored, tok, _hparams(norm_anchor_budget=budget))
    assert len(seen) == len(BATCHES) and all(r == 0.0 for r in seen[0].values())
    assert all(r <= budget * (1 + 1e-5) for ratios in seen for r in ratios.values())
    assert any(r == pytest.approx(budget, rel=1e-4) for r in seen[-1].values())  # it was pulled back


def test_a_sequence_without_its_unedited_weights_fails_before_anything_changes(tok: Any) -> None:
    hp = _hparams(norm_anchor_budget=0.1)
    model = make_llama(len(tok))
    _sequence(model, tok, _hparams())  # edited without the anchor: no unedited weights were taken
    session_copy = copy.deepcopy(model)  # a model that holds edits, seen by the variant for the first time
    before = {n: session_copy.get_submodule(n).weight.detach().clone() for n in _names(hp)}
    from ece_plugin.method.state import get_session

    get_session(session_copy).statistics = get_session(model).statistics
    with pytest.raises(NormAnchorError, match="never seen"):
        apply_ece_to_model(session_copy, tok, FACTS[:2], hp)
    assert all(torch.equal(session_copy.get_submodule(n).weight, w) for n, w in before.items())


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(HParamsError, match="norm_anchor_budget"):
        _hparams(norm_anchor_budget=-0.5)
    with pytest.raises(HParamsError, match="carry_keys"):
        _hparams(norm_anchor_budget=1.0, carry_keys=False)


def test_a_right_hand_side_term_joins_the_solve() -> None:
    from ece_plugin.method.update import masked_gram, masked_update

    torch.manual_seed(0)
    keys, resid = torch.randn(5, 3).double(), torch.randn(4, 3).double()
    c0 = torch.eye(5).double() * 0.5
    rhs = torch.randn(4, 5).double()
    a = masked_gram(keys, c0, None, 2.0)
    expected = (resid @ keys.t() + rhs) @ torch.linalg.inv(a)
    torch.testing.assert_close(masked_update(keys, resid, c0, None, 2.0, rhs), expected)
    torch.testing.assert_close(masked_update(keys, resid, c0, None, 2.0), resid @ keys.t() @ torch.linalg.inv(a))


def test_the_anchored_ridge_pulls_the_drift_back_more_than_a_ridge_on_the_update(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha ||W_new - W0||^2 against alpha ||W_new - W||^2 (the same alpha, ``rhs_term`` switched off) and none:
    the anchored ridge ends nearest the unedited weights in every layer."""
    base = make_llama(len(tok))
    hp = _hparams()
    w0 = {n: base.get_submodule(n).weight.detach().clone() for n in _names(hp)}
    drift: dict[str, dict[str, float]] = {}
    for label in ("none", "update ridge", "anchored ridge"):
        model = copy.deepcopy(base)
        with monkeypatch.context() as m:
            if label == "update ridge":
                m.setattr(NormAnchor, "rhs_term", lambda *a: None)
            _sequence(model, tok, hp if label == "none" else _hparams(norm_anchor_ridge=20.0))
        drift[label] = {n: drift_ratio(model.get_submodule(n).weight, w) for n, w in w0.items()}
    for n in w0:
        assert drift["anchored ridge"][n] < drift["update ridge"][n] < drift["none"][n]


def test_the_anchored_ridge_solves_the_anchored_least_squares(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the second batch, the variant's right-hand side is -alpha (W - W0) at the batch's neurons."""
    hp = _hparams(norm_anchor_ridge=5.0)
    model = make_llama(len(tok))
    name = _names(hp)[0]
    w0 = model.get_submodule(name).weight.detach().clone()
    terms: list[tuple[torch.Tensor, torch.Tensor]] = []
    rhs_term = NormAnchor.rhs_term

    def watched(self: NormAnchor, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Any:
        term = rhs_term(self, w_out_name, idx, device)
        if w_out_name == name:
            terms.append((term, model.get_submodule(name).weight.detach().clone()[:, idx]))
        return term

    monkeypatch.setattr(NormAnchor, "rhs_term", watched)
    _sequence(model, tok, hp)
    assert torch.all(terms[0][0] == 0)  # the first batch: no drift yet
    term, w_before = terms[1]
    idx = torch.arange(w0.shape[1])  # every neuron (p = 1)
    torch.testing.assert_close(term, -5.0 * (w_before - w0[:, idx]).double())
