"""prompt_keys_weight (a departure, 0 in the paper's form): the keys at the edit prompts' other tokens are kept."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin.architecture import input_device
from ece_plugin.editor import apply_ece_to_model
from ece_plugin.hparams import HParamsError
from ece_plugin.keys import build_key_rows, editing_tokenizer
from ece_plugin.prompt_keys import prompt_keys
from ece_plugin.requests import normalise_requests


def _plain_rows(tok: Any, model: Any, hp: Any) -> Any:
    rows = build_key_rows(tok, normalise_requests(FACTS), [["{}"]], hp.fact_token, input_device(model))
    return rows.rows


def test_prompt_keys_are_w_out_inputs_at_every_real_token_but_the_fact_token(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama")
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    with editing_tokenizer(tok):
        rows = _plain_rows(tok, model, hp)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    handle.remove()
    expected = [seen[0][r, t] for r in range(rows.n_rows) for t in range(int(rows.lengths[r]))
                if t != int(rows.lookup[r])]
    got = prompt_keys(model, rows, name, chunk_rows=3)  # chunks of 3 rows: the order stays row-major
    assert got.shape == (int(rows.lengths.sum()) - rows.n_rows, model.config.intermediate_size)
    torch.testing.assert_close(got, torch.stack(expected).float())


def test_the_update_keeps_the_prompt_keys_and_carries_them(tok: Any) -> None:
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    hk = copy.deepcopy(hp)
    hk.prompt_keys_weight = 100.0
    base = make_llama(len(tok))
    kept = copy.deepcopy(base)
    fake_session(base, hp)
    session = fake_session(kept, hk)
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    with editing_tokenizer(tok):
        rows = _plain_rows(tok, base, hp)
    keys = prompt_keys(base, rows, name).double()  # layer 0 of the only edited layer: no write changes them
    w0 = base.get_submodule(name).weight.detach().double().clone()
    apply_ece_to_model(base, tok, FACTS, hp)
    apply_ece_to_model(kept, tok, FACTS, hk)
    moved = {m: ((model.get_submodule(name).weight.detach().double() - w0) @ keys.T).norm()
             for m, model in (("paper", base), ("kept", kept))}
    assert moved["kept"] < 0.5 * moved["paper"]
    session.state.reconcile(kept)  # commits the batch: its keys and the prompt keys, scaled by sqrt(mu)
    assert session.state.n_edits == len(FACTS)
    cprev = session.state.cprev(name)
    assert cprev is not None
    prompt_part = hk.prompt_keys_weight * keys.T @ keys
    residual = cprev - prompt_part  # what remains is the edits' own keys: rank <= number of edits
    assert torch.linalg.matrix_rank(residual, atol=1e-3 * float(cprev.norm())) <= len(FACTS)


def test_prompt_keys_weight_must_not_be_negative() -> None:
    with pytest.raises(HParamsError, match="prompt_keys_weight"):
        make_hparams("llama", prompt_keys_weight=-1.0)


def test_prompt_keys_can_be_kept_for_the_batch_only(tok: Any) -> None:
    """carry_prompt_keys false: the batch keeps them, the carried state holds the edits' keys alone."""
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3, prompt_keys_weight=100.0, carry_prompt_keys=False)
    model = make_llama(len(tok))
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS, hp)
    session.state.reconcile(model)
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    assert session.state.n_keys(name) == len(FACTS)  # low rank: one column per edit, no prompt keys
