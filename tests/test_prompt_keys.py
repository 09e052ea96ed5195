"""prompt_keys_weight (a departure, 0 in the paper's form): the keys at the edit prompts' other tokens are kept."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method.architecture import input_device
from ece_plugin.method.hparams import HParamsError
from ece_plugin.method.keys import build_key_rows, editing_tokenizer
from ece_plugin.method.requests import normalise_requests
from ece_plugin.method.variants.prompt_keys import prompt_keys


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


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_prompt_keys_decay_must_lie_in_0_1(value: float) -> None:
    with pytest.raises(HParamsError, match="prompt_keys_decay"):
        make_hparams("llama", prompt_keys_decay=value)


def _fading_state(gamma: float) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    from ece_plugin.method.state import SequentialState

    gen = torch.Generator().manual_seed(0)
    state = SequentialState()
    keys = [torch.randn(16, 2, generator=gen) for _ in range(3)]
    prompts = [torch.randn(16, 4, generator=gen) for _ in range(3)]
    for k, kp in zip(keys, prompts):
        state.stage({"w": k}, {}, 2, protected={"w": kp}, decay=gamma)
        state._commit(state._pending)  # what reconcile does once the write is seen persisted
        state._pending = None
    return state, keys, prompts


def test_fading_prompt_keys_sum_to_the_decayed_moment() -> None:
    """Cprev = sum K K^T over the edits + sum_b gamma^(age b) K_P,b K_P,b^T, in every read of the state."""
    gamma = 0.5
    state, keys, prompts = _fading_state(gamma)
    expected = sum(k.double() @ k.double().T for k in keys)
    expected = expected + sum(gamma ** (2 - b) * kp.double() @ kp.double().T for b, kp in enumerate(prompts))
    torch.testing.assert_close(state.cprev("w"), expected, rtol=1e-5, atol=1e-5)
    idx = torch.tensor([4, 1, 3])
    torch.testing.assert_close(state.cprev_masked("w", idx, "cpu"), expected[idx][:, idx], rtol=1e-5, atol=1e-5)
    assert state.n_keys("w") == 6  # the edits' keys alone stay low rank; the prompt keys are in P


def test_fading_prompt_keys_survive_save_load_and_rollback(tmp_path: Any) -> None:
    from ece_plugin.method.state import SequentialState

    state, _, _ = _fading_state(0.7)
    before = state.cprev("w")
    state.save(tmp_path / "state.safetensors")
    loaded = SequentialState.load(tmp_path / "state.safetensors")
    torch.testing.assert_close(loaded.cprev("w"), before)
    checkpoint = loaded.checkpoint()
    loaded.stage({"w": torch.ones(16, 1)}, {}, 1, protected={"w": torch.ones(16, 2)}, decay=0.7)
    loaded._commit(loaded._pending)
    loaded._pending = None
    assert not torch.allclose(loaded.cprev("w"), before)
    loaded.rollback(checkpoint)
    torch.testing.assert_close(loaded.cprev("w"), before)


def test_the_editor_fades_the_carried_prompt_keys(tok: Any) -> None:
    """With gamma < 1 the batch's prompt keys go to P at weight mu; gamma = 1 keeps them among the edits' keys."""
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3, prompt_keys_weight=4.0, prompt_keys_decay=0.5)
    model = make_llama(len(tok))
    session = fake_session(model, hp)
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    with editing_tokenizer(tok):
        keys = prompt_keys(model, _plain_rows(tok, model, hp), name).double()
    apply_ece_to_model(model, tok, FACTS, hp)
    session.state.reconcile(model)
    assert session.state.n_keys(name) == len(FACTS)
    layer = session.state._layers[name]
    torch.testing.assert_close(layer.protected.double(), 4.0 * keys.T @ keys, rtol=1e-4, atol=1e-4)
