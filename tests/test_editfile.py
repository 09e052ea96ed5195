"""Edit files: exact apply / revert, refusal for another model or unexpected values, state round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ece_plugin.files.editfile import (
    EditFileError,
    apply_edit_file,
    build_edit_file,
    load_edit_file,
    revert_edit_file,
    save_edit_file,
)

W0 = "model.layers.0.mlp.down_proj.weight"
W1 = "model.layers.1.mlp.down_proj.weight"


def _llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def _edit_columns(model: torch.nn.Module, name: str, cols: list[int], seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_parameter(name)
        w[:, cols] += torch.randn(w.shape[0], len(cols), generator=gen)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_round_trip_is_bit_exact_and_only_changed_neurons_are_stored(tmp_path: Path) -> None:
    model = _llama()
    before = _params(model)
    originals = {n: model.get_parameter(n).detach().clone() for n in (W0, W1)}
    _edit_columns(model, W0, [3, 7, 60])
    _edit_columns(model, W1, [0])
    after = _params(model)
    edit = build_edit_file(model, originals, hparams={"layers": [0, 1]}, records=[{"case_id": 1}])
    assert edit.weights[W0].indices.tolist() == [3, 7, 60]
    assert edit.weights[W1].indices.tolist() == [0]
    assert edit.weights[W0].neuron_axis == 1 and edit.weights[W0].original.shape == (3, 32)
    path = save_edit_file(edit, tmp_path / "e.safetensors")
    loaded = load_edit_file(path)
    assert loaded.hparams == {"layers": [0, 1]} and loaded.records == [{"case_id": 1}]
    assert loaded.fingerprint == edit.fingerprint

    fresh = _llama()
    assert _bit_equal(_params(fresh), before)
    apply_edit_file(fresh, path)
    assert _bit_equal(_params(fresh), after)
    revert_edit_file(fresh, path)
    assert _bit_equal(_params(fresh), before)


def test_refuses_wrong_values_and_other_models(tmp_path: Path) -> None:
    model = _llama()
    originals = {W0: model.get_parameter(W0).detach().clone()}
    _edit_columns(model, W0, [5])
    path = save_edit_file(build_edit_file(model, originals), tmp_path / "e.safetensors")
    with pytest.raises(EditFileError, match="original values"):
        apply_edit_file(model, path)  # already edited: it does not hold the originals
    with pytest.raises(EditFileError, match="edited values"):
        revert_edit_file(_llama(), path)  # unedited: it does not hold the edited values
    with pytest.raises(EditFileError, match="another model"):
        apply_edit_file(_llama(hidden=48), path)
    other_seed = _llama(seed=3)  # same architecture, other weights
    with pytest.raises(EditFileError, match="original values"):
        apply_edit_file(other_seed, path)


def test_gpt2_conv1d_neurons_are_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32)).eval()
    name = "transformer.h.0.mlp.c_proj.weight"  # Conv1D [d_ff=128, d_model=32]
    before = _params(model)
    originals = {name: model.get_parameter(name).detach().clone()}
    with torch.no_grad():
        model.get_parameter(name)[[2, 9]] += 1.0
    after = _params(model)
    edit = build_edit_file(model, originals)
    assert edit.weights[name].neuron_axis == 0 and edit.weights[name].indices.tolist() == [2, 9]
    path = save_edit_file(edit, tmp_path / "g.safetensors")
    revert_edit_file(model, path)
    assert _bit_equal(_params(model), before)
    apply_edit_file(model, path)
    assert _bit_equal(_params(model), after)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(EditFileError, match="not a readable"):
        load_edit_file(junk)
    with pytest.raises(FileNotFoundError):
        load_edit_file(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(EditFileError, match="not an ece-plugin edit file"):
        load_edit_file(plain)
