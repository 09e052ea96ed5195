"""benchmarks/edit_decay.py: the split of how far an earlier edit's z-layer output moved, and the patch hook."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import FACTS, benchmark_module, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.evaluation.data import EditRecord


@pytest.fixture(scope="module")
def ed() -> ModuleType:
    return benchmark_module("edit_decay")


def _text(target: Any) -> str:
    return target["str"] if isinstance(target, dict) else target


def _records() -> list[EditRecord]:
    return [
        EditRecord(case_id=i, kind="counterfact", prompt=f["prompt"].replace("{}", f["subject"]),
                   subject=f["subject"], target_new=_text(f["target_new"]), target_true=_text(f["ground_truth"]))
        for i, f in enumerate(FACTS)
    ]


@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_moved_splits_into_leak_key_drift_and_attention(ed: ModuleType, tok: Any, layers: list[int]) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", layers=layers, clustering=False, v_num_grad_steps=3)
    fake_session(model, hp)
    records = _records()
    probe = ed.Probe(model, tok, records[:2], hp)
    _, h0 = probe.read()
    apply_ece_to_model(model, tok, [r.to_request() for r in records[:2]], hp)
    keys, h = probe.read()
    ref = {"keys": keys, "h": h, "h0": h0, "w": ed.weights(model, probe.names, hp.layers, hp.rewrite_module_tmp)}
    first = ed.measure(probe, ref, 2)
    assert first["moved"] == 0 and first["holds"] == first["holds_patched"]  # the patch puts back h itself
    apply_ece_to_model(model, tok, [r.to_request() for r in records[2:]], hp)
    later = ed.measure(probe, ref, len(records))
    assert later["moved"] > 1e-4 and later["leak"] > 1e-4
    if layers == [0]:  # nothing below layer 0 is edited and its attention reads the embeddings only
        assert later["key_drift"] < 1e-6 and later["attention"] < 1e-6
        assert later["leak"] == pytest.approx(later["moved"], rel=1e-4)
    else:  # layer 1's keys and attention read layer 0's edited output
        assert later["key_drift"] > 1e-6 and later["attention"] > 1e-6


def test_the_patch_replaces_the_z_layer_output_at_one_position_only(ed: ModuleType) -> None:
    hidden = torch.randn(1, 5, 4)
    value = torch.randn(4)
    hook = ed._replace_at(2, value)
    for output in (hidden, (hidden, "cache")):
        patched = hook(None, None, output)
        tensor = patched[0] if isinstance(patched, tuple) else patched
        assert torch.equal(tensor[0, 2], value) and torch.equal(tensor[0, [0, 1, 3, 4]], hidden[0, [0, 1, 3, 4]])
    assert isinstance(hook(None, None, (hidden, "cache")), tuple)
