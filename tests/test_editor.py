"""End to end: apply_ece_to_model on tiny Llama and GPT-2 models."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_gpt2, make_hparams, make_llama, target_prob

from ece_plugin import apply_ece_to_model
from ece_plugin.method.architecture import input_device
from ece_plugin.method.keys import build_key_rows, read_keys
from ece_plugin.method.requests import RequestError, normalise_requests
from ece_plugin.method.state import get_session

CASES = [("llama", 48), ("gpt2", 64), ("gpt2", 32)]  # (family, d_ff); d_ff == d_model = 32 catches axis bugs


def _model(family: str, d_ff: int, tok: Any) -> Any:
    return (make_llama if family == "llama" else make_gpt2)(len(tok), hidden=32, d_ff=d_ff)


def _probs(model: Any, tok: Any) -> list[float]:
    out = []
    for f in FACTS:
        target = f["target_new"]["str"] if isinstance(f["target_new"], dict) else f["target_new"]
        out.append(target_prob(model, tok, f["prompt"].replace("{}", f["subject"]), target))
    return out


@pytest.mark.parametrize(("family", "d_ff"), CASES)
def test_edit_raises_target_probability_and_copy_restores(family: str, d_ff: int, tok: Any) -> None:
    model = _model(family, d_ff, tok)
    hp = make_hparams(family, context_template_length_params=[[5, 5]])
    session = fake_session(model, hp)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _probs(model, tok)
    edited, weights_copy = apply_ece_to_model(model, tok, FACTS, hp, return_orig_weights=True)
    assert edited is model
    after = _probs(model, tok)
    assert sum(a > 2 * b for a, b in zip(after, before)) >= 3, (before, after)
    assert sum(after) > 5 * sum(before)

    trace = session.last_trace
    names = {hp.rewrite_module_tmp.format(layer) + ".weight" for layer in hp.layers}
    assert set(weights_copy) == names
    for name, p in model.named_parameters():
        if name not in names:
            assert torch.equal(p, original[name]), name  # nothing else moves
    for layer_trace in trace.layers:
        name = layer_trace.module + ".weight"
        w = model.get_parameter(name).detach()
        axis = 0 if family == "gpt2" else 1  # Conv1D: neuron = row; Linear: neuron = column
        changed = (w != original[name]).any(dim=1 - axis).nonzero().flatten().tolist()
        assert changed and set(changed) <= set(layer_trace.batch_set)
        assert len(layer_trace.batch_set) < d_ff
    for name, w in weights_copy.items():
        model.get_parameter(name).data.copy_(w)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name])


def test_trace_content(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", context_template_length_params=[[5, 5]])
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS, hp)
    d = session.last_trace.to_dict()
    json.dumps(d)  # JSON-able
    assert d["n_edits"] == 4 and d["attribution"] == "AS" and len(d["layers"]) == 2
    for stage in (
        "context_templates",
        "keys",
        "attribution",
        "clustering",
        "z",
        "statistics",
        "solve",
        "total",
    ):
        assert d["timings"][stage] >= 0
    layer = d["layers"][0]
    assert len(layer["edit_sets"]) == 4 and all(s >= 0.8 - 1e-9 for s in layer["edit_shares"])
    assert layer["edit_set_sizes"] == [len(s) for s in layer["edit_sets"]]
    assert layer["batch_share"] >= 0.8 - 1e-9 and len(layer["scores"]["top_neurons"]) == 20
    assert sum(layer["scores"]["histogram_counts"]) == layer["d_ff"]
    c = d["clusters"]
    assert c["n_clusters"] == 2 and all(a in m for a, m in zip(c["anchors"], c["members"]))
    assert d["z"]["steps_shared"] == [15] * 4 and len(d["z"]["final_loss"]) == 4
    assert len(d["context_templates"][1]) == 5


def test_bad_requests_raise_before_any_change(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama")
    before = copy.deepcopy(model.state_dict())
    bad = [FACTS[0], {"prompt": "The capital of", "subject": "Italy", "target_new": "Rome"}]
    with pytest.raises(RequestError, match="does not occur"):
        apply_ece_to_model(model, tok, bad, hp)
    with pytest.raises(RequestError, match="missing key"):
        apply_ece_to_model(model, tok, [{"prompt": "{} x", "subject": "a"}], hp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_copy_session_kwargs_and_tokenizer_restored(tok: Any) -> None:
    model = make_gpt2(len(tok))
    hp = make_hparams("gpt2", clustering=False, v_num_grad_steps=3)
    before = copy.deepcopy(model.state_dict())
    tok.padding_side = "left"
    try:
        edited, wc = apply_ece_to_model(
            model,
            tok,
            FACTS[:2],
            hp,
            copy=True,
            session=fake_session(model, hp),
            train_ds=None,
            return_orig_weights=False,
        )
        assert tok.padding_side == "left"
    finally:
        tok.padding_side = "right"
    assert edited is not model and wc == {}  # no copy unless asked for
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(not torch.equal(v, before[k]) for k, v in edited.state_dict().items())


def test_sequential_edits_carry_keys(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS[:2], hp)
    assert session.state.has_pending
    apply_ece_to_model(model, tok, FACTS[2:], hp)  # reconciles: batch 1 persisted -> committed
    assert session.state.n_edits == 2 and session.state.has_pending
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    cprev = session.state.cprev(name)
    assert cprev is not None and cprev.shape == (48, 48) and torch.linalg.matrix_rank(cprev) == 2
    # an edit undone by EasyEdit (weights restored) is not carried
    _, wc = apply_ece_to_model(model, tok, FACTS[:1], hp, return_orig_weights=True)
    assert session.state.n_edits == 4
    for n, w in wc.items():
        model.get_parameter(n).data.copy_(w)
    assert session.state.reconcile(model) == "discarded-restored"
    assert session.state.n_edits == 4
    assert get_session(model) is session


def test_carry_keys_off_carries_nothing_and_edits_as_the_first_batch(tok: Any) -> None:
    """carry_keys=false (the MEMIT-equivalent's sequential form): no state is staged, and a second batch is
    written exactly as a first batch would be on the same weights (no Cprev in its covariance)."""
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3, carry_keys=False)
    model = make_llama(len(tok))
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS[:2], hp)
    assert not session.state.has_pending and session.state.n_edits == 0 and session.state.nbytes() == 0
    fresh = copy.deepcopy(model)
    fake_session(fresh, hp)
    apply_ece_to_model(model, tok, FACTS[2:], hp)
    apply_ece_to_model(fresh, tok, FACTS[2:], hp)
    name = hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight"
    assert torch.equal(model.get_parameter(name), fresh.get_parameter(name))
    assert session.state.n_edits == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_carried_keys_are_the_keys_of_the_edited_model(family: str, tok: Any) -> None:
    """The state carries keys read while writing (layer i after layers < i); they equal a fresh read."""
    model = make_llama(len(tok)) if family == "llama" else make_gpt2(len(tok))
    hp = make_hparams(family, layers=[0, 1], clustering=False, v_num_grad_steps=3)
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS, hp)
    model_after_first = copy.deepcopy(model)
    apply_ece_to_model(model, tok, FACTS[:1], hp)  # commits the first batch
    key_rows = build_key_rows(tok, normalise_requests(FACTS), [["{}"]], hp.fact_token, input_device(model))
    names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    keys, _ = read_keys(model_after_first, key_rows, names, None, stop_at=hp.layer_module_tmp.format(1))
    for name in names:
        k = keys[name].double()
        torch.testing.assert_close(session.state.cprev(name), k.t() @ k, rtol=1e-5, atol=1e-5)


def test_clustering_off_and_wi(tok: Any) -> None:
    model = make_gpt2(len(tok))
    hp = make_hparams(
        "gpt2", attribution="WI", clustering=True, n_clusters=2, shared_grad_steps=3, per_edit_grad_steps=2
    )
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS, hp)
    d = session.last_trace.to_dict()
    layer = d["layers"][0]
    assert all(s == layer["edit_sets"][0] for s in layer["edit_sets"])  # WI: input-independent
    assert layer["batch_set"] == layer["edit_sets"][0]
    assert d["clusters"]["n_clusters"] == 2


def test_with_the_real_statistics_cache(tok: Any, tmp_path: Any) -> None:
    """The session's own StatisticsCache (tiny corpus, cache files under tmp_path) feeds the update."""
    from conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5) + "\n")
    model = make_llama(len(tok))
    model.config._name_or_path = "tiny-llama"
    hp = make_hparams(
        "llama",
        mom2_corpus=str(corpus),
        mom2_dataset="corpus",
        stats_dir=str(tmp_path / "stats"),
        mom2_n_samples=50,
        clustering=False,
        v_num_grad_steps=4,
    )
    from ece_plugin.method.state import reset_session

    reset_session(model)
    session = get_session(model, hp)
    before = _probs(model, tok)
    apply_ece_to_model(model, tok, FACTS, hp)
    assert len(session.statistics) == 2
    assert any((tmp_path / "stats").rglob("*.npz"))
    assert sum(_probs(model, tok)) > sum(before)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_on_cuda(family: str, tok: Any) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _model(family, 48 if family == "llama" else 64, tok).cuda()
    hp = make_hparams(family, context_template_length_params=[[5, 5]])
    session = fake_session(model, hp)
    before = _probs(model.cpu(), tok)
    model.cuda()
    apply_ece_to_model(model, tok, FACTS, hp, session=session)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert sum(_probs(model.cpu(), tok)) > 5 * sum(before)
