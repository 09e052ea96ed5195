"""Keys at the subject's last token, context templates, tokenizer padding."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_gpt2, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method.architecture import input_device
from ece_plugin.method.keys import (
    KeyReads,
    build_key_rows,
    capture,
    editing_tokenizer,
    generate_context_templates,
    lookup_indices,
    read_keys,
)
from ece_plugin.method.requests import normalise_requests
from ece_plugin.method.speed.replay import decoder_layers


def test_lookup_indices(tok: Any) -> None:
    # "<bos> The capital of France is" : France is token 4
    t = ["The capital of {} is"]
    assert lookup_indices(tok, t, ["France"], "subject_last") == [4]
    assert lookup_indices(tok, t, ["Danny Green"], "subject_last") == [5]
    assert lookup_indices(tok, t, ["Danny Green"], "subject_first") == [4]
    assert lookup_indices(tok, t, ["Danny Green"], "subject_first_after_last") == [6]
    assert lookup_indices(tok, ["The capital of {}"], ["France"], "subject_first_after_last") == [4]
    assert lookup_indices(tok, t, ["France"], "last") == [5]


def test_editing_tokenizer_sets_and_restores_padding(tok: Any) -> None:
    tok.padding_side = "left"
    pad = tok.pad_token
    try:
        with editing_tokenizer(tok):
            assert tok.padding_side == "right"
        assert tok.padding_side == "left" and tok.pad_token == pad
        tok.pad_token = None
        with editing_tokenizer(tok):
            assert tok.pad_token == tok.eos_token
        assert tok.pad_token is None
    finally:
        tok.pad_token = pad
        tok.padding_side = "right"


def _manual_key(model: Any, tok: Any, module_name: str, text: str, index: int) -> torch.Tensor:
    got = {}
    h = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: got.update(k=a[0][0, index]))
    try:
        with torch.no_grad():
            enc = tok(text, return_tensors="pt")  # ids and mask only: GPT-2 would embed token_type_ids
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        h.remove()
    return got["k"].float()


def test_read_keys_is_memits_template_average(tok: Any) -> None:
    model = make_llama(len(tok))
    requests = normalise_requests(FACTS[:2])
    templates = [["{}"], ["The river. {}", "I know. {}"]]
    rows = build_key_rows(tok, requests, templates, "subject_last", input_device(model))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    keys, z = read_keys(model, rows, names, "model.layers.1", stop_at="model.layers.1")
    assert z is not None and z.shape == (2, 32)
    for name in names:
        assert keys[name].shape == (2, 48)
        for i, req in enumerate(requests):
            per_template = []
            for ctx in ["{}", "The river. {}", "I know. {}"]:
                template = ctx.replace("{}", req.template)
                idx = lookup_indices(tok, [template], [req.subject], "subject_last")[0]
                per_template.append(_manual_key(model, tok, name, template.replace("{}", req.subject), idx))
            expected = (per_template[0] + (per_template[1] + per_template[2]) / 2) / 2
            torch.testing.assert_close(keys[name][i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keys_of_a_subject_mid_prompt_equal_the_whole_prompts(family: str, tok: Any) -> None:
    """capture() runs each chunk only up to its last fact token; the keys equal a forward of the whole prompt."""
    model = make_llama(len(tok)) if family == "llama" else make_gpt2(len(tok))
    requests = normalise_requests(
        [
            {"prompt": "{} is the capital of", "subject": "Paris", "target_new": "Italy"},
            {"prompt": "{} plays soccer in the city of", "subject": "Lionel Messi", "target_new": "Rome"},
        ]
    )
    contexts = ["{}", "I know. {}"]
    rows = build_key_rows(tok, requests, [contexts[:1], contexts[1:]], "subject_last", input_device(model))
    assert int(rows.rows.lookup.max()) + 1 < rows.rows.input_ids.shape[1]  # there is a tail to skip
    name = "model.layers.1.mlp.down_proj" if family == "llama" else "transformer.h.1.mlp.c_proj"
    got = capture(model, rows.rows, [name])[name]
    for r, (req, ctx) in enumerate((req, ctx) for req in requests for ctx in contexts):
        text = ctx.replace("{}", req.template).replace("{}", req.subject)
        expected = _manual_key(model, tok, name, text, int(rows.rows.lookup[r]))
        torch.testing.assert_close(got[r], expected, rtol=1e-5, atol=1e-5)


def test_early_stop_matches_full_forward(tok: Any) -> None:
    model = make_gpt2(len(tok))
    requests = normalise_requests(FACTS)
    rows = build_key_rows(tok, requests, [["{}"]], "subject_last", input_device(model))
    a = capture(
        model, rows.rows, ["transformer.h.0.mlp.c_proj"], ["transformer.h.1"], stop_at="transformer.h.1"
    )
    b = capture(model, rows.rows, ["transformer.h.0.mlp.c_proj"], ["transformer.h.1"], chunk_rows=1)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4)


def test_context_templates_are_seeded(tok: Any) -> None:
    model = make_llama(len(tok))
    a = generate_context_templates(model, tok, [[6, 5]], seed=3)
    b = generate_context_templates(model, tok, [[6, 5]], seed=3)
    c = generate_context_templates(model, tok, [[6, 5]], seed=4)
    assert a == b and a != c
    assert a[0] == ["{}"] and len(a[1]) == 5
    prefixes = ["The", "Therefore", "Because", "I", "You"]
    for text, prefix in zip(a[1], prefixes):
        assert text.endswith(". {}") and text.strip().startswith(prefix)
        assert (
            len(tok(text[: -len(". {}")])["input_ids"]) <= 6
        )  # MEMIT: max_out_len counts the prompt (specials dropped)
    assert generate_context_templates(model, tok, [], seed=0) == [["{}"]]
    assert len(generate_context_templates(model, tok, [[4, 7]], seed=0)[1]) == 7


def _layers(model: Any, family: str) -> Any:
    return model.model.layers if family == "llama" else model.transformer.h


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_key_reads_replay_the_layers_below_the_last_write(family: str, tok: Any) -> None:
    """Read i + 1 after writing W_out of edited layer l_i replays the decoder layers under l_i from read i: the
    same keys and z-layer outputs as reading with every layer run, and layer 0 runs in read 0 only."""
    model = make_llama(len(tok)) if family == "llama" else make_gpt2(len(tok))
    hp = make_hparams(family, layers=[1, 2])
    rows = build_key_rows(tok, normalise_requests(FACTS), [["{}"], ["The river. {}", "I know. {}"]], "subject_last",
                          input_device(model))
    names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    z_name = hp.layer_module_tmp.format(2)
    below = [decoder_layers(hp.layer_module_tmp, layer - 1) for layer in hp.layers]
    reads = KeyReads(model, rows, names, z_name, below, chunk_rows=3)  # several chunks
    runs, z_outputs = [0], [0]
    _layers(model, family)[0].register_forward_pre_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
    _layers(model, family)[2].register_forward_hook(lambda *a: z_outputs.__setitem__(0, z_outputs[0] + 1))
    keys0, cur0 = reads.read(0)
    after_read_0 = runs[0]
    expected0, expected_cur0 = read_keys(model, rows, names, z_name, stop_at=z_name, chunk_rows=64)  # all rows
    for name in names:
        torch.testing.assert_close(keys0[name], expected0[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cur0, expected_cur0, rtol=1e-5, atol=1e-5)
    n_plain = rows.n_edits
    plain_chunks, other_chunks = -(-n_plain // 3), -(-(rows.rows.n_rows - n_plain) // 3)
    assert after_read_0 == plain_chunks + other_chunks > 2  # one forward per chunk of each part
    # the templated rows stopped at the deepest W_out, before the z output (+ 1: the reference read's one chunk)
    assert z_outputs[0] == plain_chunks + 1
    after_reference = runs[0]
    with torch.no_grad():  # the write that follows read 0: W_out of layer 1
        model.get_submodule(names[0]).weight.add_(0.3 * torch.randn_like(model.get_submodule(names[0]).weight))
    keys, cur = reads.read(1)
    assert runs[0] == after_reference  # replayed
    expected_keys, expected_cur = read_keys(model, rows, [names[1]], z_name, stop_at=z_name)
    assert expected_cur is not None
    torch.testing.assert_close(keys[names[1]], expected_keys[names[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cur, expected_cur, rtol=1e-5, atol=1e-5)
    # out of order (read 1 again: its predecessor is not read 0): every layer runs
    before = runs[0]
    reads.read(1)
    assert runs[0] == before + after_read_0


def _edit_both_ways(
    model: Any, tok: Any, hp: Any, hparams_for: Callable[[bool], Any], before: Callable[[bool], None] = lambda on: None
) -> dict[bool, list[torch.Tensor]]:
    """The W_out of every edited layer after the same edit of FACTS on two twins of ``model``: with the switch on
    (True) and off (False); ``hparams_for(on)`` gives each twin's hparams, ``before(on)`` runs just before its edit."""
    edited = {}
    for on in (True, False):
        twin = copy.deepcopy(model)
        fake_session(twin, hp)
        before(on)
        torch.manual_seed(0)
        apply_ece_to_model(twin, tok, FACTS, hparams_for(on))
        edited[on] = [_w_out(twin, hp, layer) for layer in hp.layers]
    return edited


def _assert_same_edit(model: Any, hp: Any, edited: dict[bool, list[torch.Tensor]], relative: float) -> None:
    """Both edits wrote, and they differ by at most ``relative`` of the largest update element."""
    for layer, on, off in zip(hp.layers, edited[True], edited[False]):
        update = float((off - _w_out(model, hp, layer)).abs().max())
        assert update > 1e-4  # the edit did write
        assert float((on - off).abs().max()) <= relative * update


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_edit_with_layer_replay_equals_one_without(family: str, tok: Any) -> None:
    torch.manual_seed(0)
    model = make_llama(len(tok)) if family == "llama" else make_gpt2(len(tok))
    model = model.double() if family == "llama" else model
    hp = make_hparams(family, layers=[1, 2], shared_grad_steps=3, per_edit_grad_steps=4, layer_replay=True)
    edited = _edit_both_ways(model, tok, hp, lambda on: dataclasses.replace(hp, layer_replay=on))
    _assert_same_edit(model, hp, edited, 1e-4)


def _w_out(model: Any, hp: Any, layer: int) -> torch.Tensor:
    return model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.detach().clone()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_key_reads_with_the_deepest_mlp_at_the_fact_tokens_equal_full_reads(family: str, tok: Any) -> None:
    """``key_positions_only``: each part of a read runs the MLP of the deepest layer it reaches at the fact
    tokens only; every read gives the keys and z-layer outputs of the full forward, with fewer tokens in it."""
    from test_prefix_cache import _hparams, _model

    from ece_plugin.method.editor import edited_w_outs, fact_token_mlps

    model = _model(family, len(tok))
    model = model.double() if family == "llama" else model  # float64 GPT-2 masks overflow in transformers 4.x
    hp = dataclasses.replace(_hparams(family), layers=[0, 1, 2])
    torch.manual_seed(0)
    rows = build_key_rows(tok, normalise_requests(FACTS), [["{}"], ["The river. {}", "I know. {}"]], "subject_last",
                          input_device(model))
    w_outs = edited_w_outs(model, hp)
    names = [wo.name for wo in w_outs]
    z_name = hp.layer_module_tmp.format(2)
    below = [decoder_layers(hp.layer_module_tmp, layer - 1) for layer in hp.layers]
    mlps = fact_token_mlps(model, hp, w_outs)
    assert mlps is not None and len(mlps) == 3
    tokens = [0]
    mlps[2].register_forward_hook(lambda m, a, out: tokens.__setitem__(0, tokens[0] + out.shape[0] * out.shape[1]))
    sparse = KeyReads(model, rows, names, z_name, below, chunk_rows=3, mlps=mlps)
    full = KeyReads(model, rows, names, z_name, below, chunk_rows=3)
    for i in range(3):
        if i:  # the write that comes before read i
            with torch.no_grad():
                w = model.get_submodule(names[i - 1]).weight
                w.add_(0.3 * torch.randn_like(w))
        tokens[0] = 0
        keys, cur = sparse.read(i)
        sparse_tokens = tokens[0]
        tokens[0] = 0
        expected, expected_cur = full.read(i)
        assert 0 < sparse_tokens < tokens[0]
        assert set(keys) == set(expected)
        for name in keys:
            torch.testing.assert_close(keys[name], expected[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cur, expected_cur, rtol=1e-5, atol=1e-5)


def test_an_edit_with_keys_at_the_fact_tokens_equals_one_without(tok: Any) -> None:
    torch.manual_seed(0)
    model = make_llama(len(tok)).double()
    hp = make_hparams("llama", layers=[1, 2], shared_grad_steps=3, per_edit_grad_steps=4)
    assert hp.key_positions_only
    edited = _edit_both_ways(model, tok, hp, lambda on: dataclasses.replace(hp, key_positions_only=on))
    _assert_same_edit(model, hp, edited, 1e-8)


def test_a_w_out_outside_the_named_mlp_reads_every_position(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    from ece_plugin.method.editor import edited_w_outs, fact_token_mlps

    model = make_llama(len(tok))
    hp = make_hparams("llama", layers=[1, 2], mlp_module_tmp="model.layers.{}.self_attn")
    with caplog.at_level("WARNING"):
        assert fact_token_mlps(model, hp, edited_w_outs(model, hp)) is None
    assert "is not inside model.layers.1.self_attn" in caplog.text


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_the_z_cache_pass_reads_the_unedited_keys(family: str, tok: Any) -> None:
    """The suffix pass that builds the z prefix cache reads each edited W_out's input and the z layer's output at
    the fact tokens: the keys and z-layer outputs of read 0, which then does not run."""
    from test_prefix_cache import EXTRA, TEMPLATES, _hparams, _model

    from ece_plugin.method.editor import LayerKeys, edited_w_outs, unedited_keys
    from ece_plugin.method.values import prepare_z

    model = _model(family, len(tok))
    model = model.double() if family == "llama" else model  # float64 GPT-2 masks overflow in transformers 4.x
    hp = dataclasses.replace(_hparams(family), layers=[0, 1, 2])
    reqs = normalise_requests(FACTS + EXTRA)
    w_outs = edited_w_outs(model, hp)
    rows = build_key_rows(tok, reqs, TEMPLATES, hp.fact_token, input_device(model))
    setup = prepare_z(model, tok, reqs, TEMPLATES, hp, [wo.name for wo in w_outs])
    first = unedited_keys(setup, rows, w_outs)
    assert first is not None
    keys, cur = first
    expected, expected_cur = KeyReads(model, rows, [wo.name for wo in w_outs], hp.layer_module_tmp.format(2)).read(0)
    assert set(keys) == set(expected)
    for name in keys:
        torch.testing.assert_close(keys[name], expected[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cur, expected_cur, rtol=1e-5, atol=1e-5)
    runs = [0]
    _layers(model, family)[0].register_forward_pre_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
    layer_keys = LayerKeys(model, rows, hp, w_outs, [], first)
    assert runs[0] == 0 and layer_keys.first is keys  # read 0 did not run


def test_without_the_cache_pass_or_with_other_tokens_read_0_runs(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ece_plugin.method import editor
    from ece_plugin.method.editor import edited_w_outs, unedited_keys
    from ece_plugin.method.values import prepare_z

    model = make_llama(len(tok))
    hp = make_hparams("llama", layers=[1, 2])
    reqs = normalise_requests(FACTS)
    w_outs = edited_w_outs(model, hp)
    templates = [["{}"], ["The river. {}"]]
    rows = build_key_rows(tok, reqs, templates, hp.fact_token, input_device(model))
    for off in ("layer_replay", "z_prefix_cache"):
        setup = prepare_z(model, tok, reqs, templates, dataclasses.replace(hp, **{off: False}), ["x"])
        assert setup.source is None and unedited_keys(setup, rows, w_outs) is None
    tiny_budget = dataclasses.replace(hp, z_cache_mb=1e-6)  # one edit per block: no cache of every edit
    assert prepare_z(model, tok, reqs, templates, tiny_budget, [w.name for w in w_outs]).source is None
    setup = prepare_z(model, tok, reqs, templates, hp, [wo.name for wo in w_outs])
    assert unedited_keys(setup, rows, w_outs) is not None
    monkeypatch.setattr(editor, "same_up_to_fact", lambda a, b: False)
    assert unedited_keys(setup, rows, w_outs) is None


def test_same_up_to_fact_compares_the_tokens_up_to_the_fact_token(tok: Any) -> None:
    from ece_plugin.method.keys import encode_rows, same_up_to_fact

    dev = torch.device("cpu")
    a = encode_rows(tok, ["{} is in", "The city {} lies"], ["Paris", "Rome"], "subject_last", dev)
    b = encode_rows(tok, ["{} is in the north", "The city {} lies in"], ["Paris", "Rome"], "subject_last", dev)
    c = encode_rows(tok, ["{} is in", "A city {} lies"], ["Paris", "Rome"], "subject_last", dev)
    assert same_up_to_fact(a, b)  # different after the fact token only
    assert not same_up_to_fact(a, c)  # a token before it differs
    assert not same_up_to_fact(a, a.select(torch.tensor([0])))  # another number of rows


@pytest.mark.parametrize("clustering", [True, False])
def test_an_edit_whose_keys_come_from_the_z_cache_equals_one_that_reads_them(
    clustering: bool, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.method import editor

    torch.manual_seed(0)
    model = make_llama(len(tok)).double()
    hp = make_hparams("llama", layers=[1, 2], shared_grad_steps=3, per_edit_grad_steps=4, v_num_grad_steps=7,
                      clustering=clustering)
    given: list[bool] = []
    real = editor.unedited_keys
    monkeypatch.setattr(editor, "unedited_keys", lambda *a: (lambda got: given.append(got is not None) or got)(real(*a)))

    def read_them_when_off(from_cache: bool) -> None:
        if not from_cache:
            monkeypatch.setattr(editor, "same_up_to_fact", lambda a, b: False)

    edited = _edit_both_ways(model, tok, hp, lambda on: hp, read_them_when_off)
    assert given == [True, False]  # the first edit took its keys from the z cache, the second read them
    _assert_same_edit(model, hp, edited, 1e-8)
