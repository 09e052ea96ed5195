"""SequentialState: commit/discard by looking at W_out, low-rank -> dense switch, save/load, sessions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ece_plugin.method.state import (
    EditSession,
    SequentialState,
    StateError,
    StateMismatchError,
    WrittenNeurons,
    get_session,
    neuron_values,
    reset_session,
)

W_OUT = "model.layers.1.mlp.down_proj.weight"
LAYER = "model.layers.1.mlp.down_proj"


def tiny_llama(intermediate: int = 16, hidden: int = 8, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=20, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config).eval()


def _edit(model: torch.nn.Module, idx: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new values into W_out columns idx (nn.Linear: neurons are columns); return (pre, post)."""
    weight = model.get_parameter(W_OUT)
    pre = neuron_values(weight, idx).clone()
    torch.manual_seed(seed)
    with torch.no_grad():
        weight[:, idx] += torch.randn(weight.shape[0], len(idx))
    return pre, neuron_values(weight, idx).clone()


def test_commit_when_edit_persists_and_discard_when_restored() -> None:
    model = tiny_llama()
    state = SequentialState()
    idx = torch.tensor([1, 4, 5])
    k1 = torch.randn(16, 2)
    pre, post = _edit(model, idx, 0)
    state.stage({LAYER: k1}, {W_OUT: (idx, post)}, n_edits=2)
    assert state.has_pending and state.n_edits == 0
    assert torch.count_nonzero(state.cprev_masked(LAYER, idx, "cpu")) == 0  # nothing before reconcile
    assert state.reconcile(model) == "committed"  # the edit is still in the weights (sequential mode)
    assert state.n_edits == 2
    torch.testing.assert_close(state.cprev_masked(LAYER, idx, "cpu"), (k1 @ k1.T).double()[idx][:, idx])
    assert state.reconcile(model) == "none"

    # a second edit that EasyEdit restores afterwards (non-sequential mode): not carried
    pre2, post2 = _edit(model, idx, 1)
    state.stage({LAYER: torch.randn(16, 1)}, {W_OUT: WrittenNeurons(idx, post2, pre=pre2)}, n_edits=1)
    with torch.no_grad():
        model.get_parameter(W_OUT)[:, idx] = pre2  # weights_copy restore
    assert state.reconcile(model) == "discarded-restored"
    assert state.n_edits == 2
    torch.testing.assert_close(state.cprev(LAYER), (k1 @ k1.T).double())


def test_restore_without_pre_values_is_a_quiet_discard_and_other_changes_warn(caplog) -> None:
    model = tiny_llama()
    state = SequentialState()
    idx = torch.tensor([0, 2])
    pre, post = _edit(model, idx, 0)
    state.stage({LAYER: torch.randn(16, 1)}, {W_OUT: (idx, post)}, n_edits=1)
    with torch.no_grad():
        model.get_parameter(W_OUT)[:, idx] = pre
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.state"):
        assert state.reconcile(model) == "discarded-restored"
    assert not caplog.records
    # neither pre nor post: somebody else changed the weights -> warn, do not carry
    pre, post = _edit(model, idx, 1)
    state.stage({LAYER: torch.randn(16, 1)}, {W_OUT: (idx, post, 1, pre)}, n_edits=1)
    with torch.no_grad():
        model.get_parameter(W_OUT)[:, idx] += 1.0
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.state"):
        assert state.reconcile(model) == "discarded-changed"
    assert any("neither the post-edit nor the pre-edit" in r.message for r in caplog.records)
    assert state.n_edits == 0 and state.cprev(LAYER) is None


def test_partial_restore_warns_and_discards(caplog) -> None:
    model = tiny_llama()
    w0 = "model.layers.0.mlp.down_proj.weight"
    idx = torch.tensor([3])
    post0 = neuron_values(model.get_parameter(w0), idx).clone()
    pre1, post1 = _edit(model, idx, 0)
    with torch.no_grad():
        model.get_parameter(W_OUT)[:, idx] = pre1  # layer 1 restored, layer 0 still "post"
    state = SequentialState()
    state.stage({LAYER: torch.randn(16, 1)}, {w0: (idx, post0), W_OUT: (idx, post1, 1, pre1)}, n_edits=1)
    with caplog.at_level(logging.WARNING, logger="ece_plugin.method.state"):
        assert state.reconcile(model) == "discarded-changed"
    assert caplog.records


def test_stage_twice_without_reconcile_is_an_error() -> None:
    state = SequentialState()
    state.stage({LAYER: torch.randn(16, 1)}, {}, n_edits=1)
    with pytest.raises(StateError, match="reconcile"):
        state.stage({LAYER: torch.randn(16, 1)}, {}, n_edits=1)
    with pytest.raises(StateError, match=r"expected \[d_ff, n\]"):
        SequentialState().stage({LAYER: torch.randn(16)}, {}, n_edits=1)


def test_gpt2_conv1d_rows_are_neurons() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval()
    name = "transformer.h.0.mlp.c_proj.weight"
    weight = model.get_parameter(name)
    assert weight.shape == (32, 8)  # Conv1D: [d_ff, d_model]
    idx = torch.tensor([5, 9])
    with torch.no_grad():
        weight[idx, :] += 1.0
    post = neuron_values(weight, idx, conv1d=True)
    assert post.shape == (2, 8)
    state = SequentialState()
    state.stage({"transformer.h.0.mlp.c_proj": torch.randn(32, 1)}, {name: (idx, post)}, n_edits=1)
    assert state.reconcile(model) == "committed"  # the axis (rows) was inferred from the Conv1D owner


def test_low_rank_to_dense_switch_gives_the_same_cprev() -> None:
    model = tiny_llama(intermediate=16)
    state = SequentialState()
    torch.manual_seed(3)
    all_keys = []
    for step in range(6):  # 3 keys per step: 2n > 16 after the third step
        k = torch.randn(16, 3)
        all_keys.append(k)
        state.stage({LAYER: k}, {}, n_edits=3)
        assert state.reconcile(model) == "committed"
        expected = torch.cat(all_keys, 1).double()
        expected = expected @ expected.T
        torch.testing.assert_close(state.cprev(LAYER), expected, rtol=1e-5, atol=1e-5)
        idx = torch.tensor([0, 3, 15])
        torch.testing.assert_close(state.cprev_masked(LAYER, idx, "cpu"), expected[idx][:, idx], rtol=1e-5,
                                   atol=1e-5)
        if step < 2:
            assert not state.is_dense(LAYER) and state.n_keys(LAYER) == 3 * (step + 1)
        else:
            assert state.is_dense(LAYER) and state.n_keys(LAYER) == 0
    assert state.n_edits == 18
    assert state.nbytes() == 16 * 16 * 4  # dense float32


def test_save_load_round_trip_and_refusals(tmp_path: Path) -> None:
    model = tiny_llama()
    state = SequentialState()
    k_dense = torch.randn(16, 9)  # 2 * 9 > 16: dense
    state.stage({LAYER: k_dense, "model.layers.0.mlp.down_proj": torch.randn(16, 2)}, {}, n_edits=9)
    path = tmp_path / "sub" / "state.safetensors"
    state.save(path, model=model)  # reconciles first
    assert state.n_edits == 9 and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["state.safetensors"]  # no temp files left
    loaded = SequentialState.load(path, model=model)
    assert loaded.n_edits == 9 and sorted(loaded.layer_names) == sorted(state.layer_names)
    assert loaded.is_dense(LAYER) and not loaded.is_dense("model.layers.0.mlp.down_proj")
    for name in state.layer_names:
        torch.testing.assert_close(loaded.cprev(name), state.cprev(name))
    # another d_ff, another hidden size
    with pytest.raises(StateMismatchError, match="d_ff 32, the state 16"):
        SequentialState.load(path, model=tiny_llama(intermediate=32))
    with pytest.raises(StateMismatchError, match="hidden_size"):
        SequentialState.load(path, model=tiny_llama(hidden=12))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="not a readable safetensors"):
        SequentialState.load(bad)
    with pytest.raises(FileNotFoundError):
        SequentialState.load(tmp_path / "missing.safetensors")


def test_empty_state_round_trip_and_reset(tmp_path: Path) -> None:
    state = SequentialState()
    state.save(tmp_path / "empty.safetensors")
    assert SequentialState.load(tmp_path / "empty.safetensors").n_edits == 0
    state.stage({LAYER: torch.randn(16, 1)}, {}, n_edits=1)
    state.reconcile(tiny_llama())
    assert state.n_edits == 1 and state.nbytes() == 16 * 4
    state.reset()
    assert state.n_edits == 0 and state.layer_names == [] and state.nbytes() == 0
    assert torch.equal(state.cprev_masked(LAYER, torch.tensor([1, 2]), "cpu"), torch.zeros(2, 2, dtype=torch.float64))


def test_session_attached_to_model_and_reset() -> None:
    model = tiny_llama()

    class HP:
        state_device = "cpu"

    session = get_session(model, HP())
    assert isinstance(session, EditSession) and session.state.device == "cpu"
    assert get_session(model) is session
    assert "_ece_session" not in dict(model.named_modules())  # plain attribute, not a submodule
    session.context_templates = ["{}"]
    reset_session(model)
    fresh = get_session(model)
    assert fresh is not session and fresh.context_templates is None and fresh.state.n_edits == 0


def test_deepcopied_model_gets_own_state_but_shares_statistics() -> None:
    import copy

    from torch import nn

    from ece_plugin.method.state import get_session

    model = nn.Linear(3, 2)
    session = get_session(model)
    clone = copy.deepcopy(model)
    clone_session = get_session(clone)
    assert clone_session is not session
    assert clone_session.state is not session.state  # edits of the copy never reach the original's state
    assert clone_session.statistics is session.statistics  # read-only C0 is not duplicated
