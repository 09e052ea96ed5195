"""Prefix cache and layer replay: running only the tokens from the fact token on, over cached prefix keys/values,
and only the layers after the z layer, over its cached outputs, is exact."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from conftest import FACTS, make_gpt2, make_hparams, make_llama, make_tokenizer

from ece_plugin.method import values
from ece_plugin.method.architecture import ArchitectureError
from ece_plugin.method.requests import normalise_requests
from ece_plugin.method.speed.prefix_cache import PrefixCache, RowBatch, edit_blocks, key_value_bytes_per_token
from ece_plugin.method.speed.replay import LayerReplay, decoder_layers, replayed_layers
from ece_plugin.method.values import _forward, build_z_problem, compute_z, z_modules

TEMPLATES = [["{}"], ["I know the city. {}", "You know. {}"]]
# the subject opens the prompt (its last token is the first token without a BOS) and a two-token target
EXTRA = [
    {
        "prompt": "{} is the capital of",
        "subject": "Paris",
        "target_new": "New York",
        "ground_truth": "France",
    },
    {"prompt": "{} plays", "subject": "Lionel Messi", "target_new": "tennis", "ground_truth": "soccer"},
]


def _model(family: str, vocab: int) -> Any:
    if family == "gptj":  # rotary positions, parallel attention and MLP
        from transformers import GPTJConfig, GPTJForCausalLM

        torch.manual_seed(0)
        config = GPTJConfig(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return GPTJForCausalLM(config).eval()
    return make_llama(vocab) if family == "llama" else make_gpt2(vocab)


def _hparams(family: str) -> Any:
    if family == "gptj":
        return make_hparams(
            "gpt2", rewrite_module_tmp="transformer.h.{}.mlp.fc_out", attn_module_tmp="transformer.h.{}.attn",
            lm_head_module="lm_head",
        )
    return make_hparams(family)


def _replay(hp: Any) -> LayerReplay:
    return LayerReplay(decoder_layers(hp.layer_module_tmp, hp.layers[-1]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("replay", [False, True])
def test_suffix_forward_equals_full_forward(family: str, bos: bool, replay: bool) -> None:
    tok = make_tokenizer(bos=bos)
    model = _model(family, len(tok))
    hp = _hparams(family)
    problem = build_z_problem(
        tok, normalise_requests(FACTS + EXTRA), TEMPLATES, "subject_last", torch.device("cpu")
    )
    assert bos or int(problem.rows.lookup.min()) == 0  # a row with an empty prefix is covered
    mods = z_modules(model, hp)
    all_rows = torch.arange(problem.rows.n_rows)
    # built in several chunks
    cache = PrefixCache(model, problem.rows, all_rows, chunk_rows=5, replay=_replay(hp) if replay else None)
    assert cache.nbytes > 0
    assert (cache.hidden is not None) == replay
    gen = torch.Generator().manual_seed(0)
    for rows in (all_rows, torch.tensor([7, 0, 12, 3])):  # everything, and a reordered subset
        disp = torch.randn(len(rows), 32, generator=gen)
        h_full, hid_full = _forward(model, mods, RowBatch.full(problem.rows.select(rows)), disp)
        batch = cache.batch(rows)
        assert (batch.replay_hidden is not None) == replay
        h_cached, hid_cached = _forward(model, mods, batch, disp)
        torch.testing.assert_close(h_cached, h_full, rtol=1e-5, atol=1e-5)
        for j, row in enumerate(rows.tolist()):
            split, length = int(problem.rows.lookup[row]), int(problem.rows.lengths[row])
            assert int(batch.offset[j]) == split and int(batch.fact_pos[j]) == 0
            torch.testing.assert_close(
                hid_cached[j, : length - split], hid_full[j, split:length], rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("replay", [False, True])
def test_z_with_the_prefix_cache_equals_z_without(family: str, replay: bool) -> None:
    tok = make_tokenizer(bos=family == "llama")
    # Adam's first steps are nearly lr * sign(grad): float32 rounding in a near-zero gradient coordinate can flip
    # one, so Llama runs in float64 (strict check); transformers 4.46's GPT-2 cannot, it gets a relative check
    model = _model(family, len(tok))
    model = model.double() if family == "llama" else model
    reqs = normalise_requests(FACTS + EXTRA)
    hp = make_hparams(family, shared_grad_steps=3, per_edit_grad_steps=6, kl_factor=0.5, layer_replay=replay)
    cluster_of, anchors = [0, 1, 0, 1, 0, 1], [0, 3]
    cached = compute_z(model, tok, reqs, TEMPLATES, hp, cluster_of, anchors, True)
    full = compute_z(
        model, tok, reqs, TEMPLATES, dataclasses.replace(hp, z_prefix_cache=False), cluster_of, anchors, True
    )
    assert_same_z(family, cached, full)
    assert torch.all((cached.z - cached.h).norm(dim=1) > 0)


def assert_same_z(family: str, got: Any, expected: Any) -> None:
    """Two ZResults of one problem agree: strictly for Llama (run in float64), relative to the move for GPT-2/J."""
    if family == "llama":
        torch.testing.assert_close(got.z, expected.z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.shared, expected.shared, rtol=1e-6, atol=1e-6)
    else:
        moved = (expected.z - expected.h).norm(dim=1)
        assert torch.all((got.z - expected.z).norm(dim=1) <= 1e-2 * moved)
    assert got.steps_per_edit == expected.steps_per_edit
    assert got.final_loss == pytest.approx(expected.final_loss, rel=1e-3, abs=1e-4)


def test_blocks_give_the_same_z_as_one_run(tok: Any) -> None:
    model = make_llama(len(tok))
    reqs = normalise_requests(FACTS + EXTRA)
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=5)
    one = compute_z(model, tok, reqs, TEMPLATES, hp, list(range(6)), list(range(6)), False)
    tiny = dataclasses.replace(hp, z_cache_mb=1e-6)  # one edit per block
    blocks = compute_z(model, tok, reqs, TEMPLATES, tiny, list(range(6)), list(range(6)), False)
    torch.testing.assert_close(blocks.z, one.z, rtol=1e-5, atol=1e-5)
    assert blocks.steps_per_edit == one.steps_per_edit


def test_edit_blocks_respect_the_budget(tok: Any) -> None:
    model = make_llama(len(tok))
    per_token = key_value_bytes_per_token(model)
    assert per_token == 2 * 3 * 2 * 8 * 4  # keys + values, 3 layers, 2 key/value heads of 8, float32
    problem = build_z_problem(tok, normalise_requests(FACTS), TEMPLATES, "subject_last", torch.device("cpu"))
    cache = PrefixCache(model, problem.rows, torch.arange(problem.rows.n_rows), chunk_rows=8)
    assert cache.nbytes == problem.rows.n_rows * cache.width * per_token  # the estimate is the real size
    # 10 edits x 3 rows x 4 prefix tokens: 3 edits fit in 3.5 edits' worth of memory
    budget = 3.5 * 3 * 4 * per_token / 2**20
    blocks = edit_blocks(list(range(10)), 3, 4.0, per_token, budget)
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert edit_blocks([0, 1], 3, 4.0, per_token, 1e-9) == [[0], [1]]


def test_kl_rows_are_not_run_when_the_kl_term_is_off(tok: Any) -> None:
    problem = build_z_problem(
        tok, normalise_requests(FACTS[:2]), TEMPLATES, "subject_last", torch.device("cpu")
    )
    assert problem.optimised_rows(1, with_kl=True).tolist() == [4, 5, 6, 7]
    assert problem.optimised_rows(1, with_kl=False).tolist() == [4, 5, 6]


def test_an_unusable_cache_falls_back_to_whole_prompts(
    tok: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_llama(len(tok))
    reqs = normalise_requests(FACTS)
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    expected = compute_z(model, tok, reqs, TEMPLATES, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)

    def unusable(*args: Any, **kwargs: Any) -> None:
        raise ArchitectureError("unsupported key/value layout")

    monkeypatch.setattr(values, "PrefixCache", unusable)
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.values"):
        got = compute_z(model, tok, reqs, TEMPLATES, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)
    assert "prefix cache unavailable (unsupported key/value layout)" in caplog.text
    torch.testing.assert_close(got.z, expected.z, rtol=1e-4, atol=1e-4)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*args: Any) -> None:
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replayed_layers_do_not_run_during_the_steps(family: str) -> None:
    tok = make_tokenizer(bos=family == "llama")
    model = _model(family, len(tok))
    reqs = normalise_requests(FACTS + EXTRA)
    layers = model.model.layers if family == "llama" else model.transformer.h
    runs = {"z layer": _count_calls(layers[1]), "after it": _count_calls(layers[2])}
    hp = make_hparams(family, clustering=False, v_num_grad_steps=8, layer_replay=True)
    compute_z(model, tok, reqs, TEMPLATES, hp, list(range(6)), list(range(6)), False)
    with_replay = {k: v[0] for k, v in runs.items()}
    for v in runs.values():
        v[0] = 0
    compute_z(model, tok, reqs, TEMPLATES, dataclasses.replace(hp, layer_replay=False), list(range(6)),
              list(range(6)), False)
    without = {k: v[0] for k, v in runs.items()}
    assert with_replay["after it"] == without["after it"] > 8  # the same steps ran
    # the z layer ran only in the passes before the steps: the reference, the prefixes and the replay's filling
    assert with_replay["z layer"] == 3
    assert without["z layer"] == without["after it"]
    assert type(layers[1]).__name__ != "_Replay"  # the real layers are back


def test_replayed_layers_are_restored_after_an_error(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama")
    before = list(model.model.layers)
    with pytest.raises(RuntimeError, match="boom"):
        with replayed_layers(model, _replay(hp), torch.zeros(1, 1, 32)):
            assert type(model.model.layers[0]).__name__ == "_Replay"
            raise RuntimeError("boom")
    assert list(model.model.layers) == before


def test_an_unusable_replay_falls_back_to_running_every_layer(
    tok: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_llama(len(tok))
    reqs = normalise_requests(FACTS)
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3, layer_replay=False)
    expected = compute_z(model, tok, reqs, TEMPLATES, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)

    def unusable(*args: Any, **kwargs: Any) -> None:
        raise ArchitectureError("layer 'model.layers.1' did not run in the forward pass")

    monkeypatch.setattr(PrefixCache, "_run_suffixes", unusable)
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.values"):
        got = compute_z(model, tok, reqs, TEMPLATES, dataclasses.replace(hp, layer_replay=True),
                        [0, 1, 2, 3], [0, 1, 2, 3], False)
    assert "layer replay unavailable (layer 'model.layers.1' did not run" in caplog.text
    torch.testing.assert_close(got.z, expected.z, rtol=1e-5, atol=1e-5)
