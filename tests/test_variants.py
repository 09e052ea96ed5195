"""The variant mechanism (ece_plugin/method/variants): the hooks run at their points, with none active a batch is
the paper's, what a hook returns reaches the update and the state, and the core never reads a variant's hparams."""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin.method import variants
from ece_plugin.method.hparams import ECEHyperParams
from ece_plugin.method.keys import KeyRows
from ece_plugin.method.variants import VARIANTS, CarriedKeys, EditVariant, active_variants

METHOD_DIR = Path(variants.__file__).resolve().parent.parent


class Recorder(EditVariant):
    """Records every hook call; adds ``gram`` I to the Gram matrix and carries ``extra`` keys when asked to."""

    name = "recorder"
    calls: list[tuple[str, ...]] = []
    gram = 0.0
    extra: Optional[tuple[int, float]] = None  # (columns, decay)

    @classmethod
    def is_active(cls, hparams: Any) -> bool:
        return True

    def start(self, model: torch.nn.Module, n_edits_before: int) -> None:
        self.calls.append(("start",))

    def begin(self, model: torch.nn.Module, key_rows: KeyRows) -> None:
        self.calls.append(("begin",))

    def before_write(self, model: torch.nn.Module, w_out_name: str) -> None:
        self.calls.append(("before_write", w_out_name))

    def gram_term(self, w_out_name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        self.calls.append(("gram_term", w_out_name))
        if not self.gram:
            return None
        return self.gram * torch.eye(int(idx.numel()), dtype=torch.float64, device=device)

    def carried_keys(self, w_out_name: str) -> Optional[CarriedKeys]:
        self.calls.append(("carried_keys", w_out_name))
        if self.extra is None:
            return None
        columns, decay = self.extra
        return CarriedKeys(torch.ones(48, columns), decay)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    monkeypatch.setitem(VARIANTS, Recorder.name, Recorder)
    monkeypatch.setattr(Recorder, "calls", [])
    return Recorder


def _edit(tok: Any, hp: ECEHyperParams, model: Optional[torch.nn.Module] = None) -> tuple[torch.nn.Module, Any]:
    model = make_llama(len(tok)) if model is None else model
    session = fake_session(model, hp)
    torch.manual_seed(0)
    apply_ece_to_model(model, tok, FACTS, hp)
    return model, session


def _weights(model: torch.nn.Module, hp: ECEHyperParams) -> list[torch.Tensor]:
    return [model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.detach().clone() for layer in hp.layers]


def test_no_variant_is_active_in_the_papers_form() -> None:
    assert active_variants(make_hparams("llama")) == []
    defaults = ECEHyperParams(model_name="m", layers=[0])
    assert [cls for cls in VARIANTS.values() if cls.is_active(defaults)] == []


def test_every_registered_variant_names_its_own_hparams_fields() -> None:
    known = {f.name for f in dataclasses.fields(ECEHyperParams)}
    for name, cls in VARIANTS.items():
        assert cls.name == name and issubclass(cls, EditVariant)
        assert cls.fields and set(cls.fields) <= known, (name, cls.fields)


def test_hooks_run_at_their_points_and_a_silent_variant_changes_nothing(tok: Any, recorder: type[Recorder]) -> None:
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    base = make_llama(len(tok))
    paper = copy.deepcopy(base)
    edited, _ = _edit(tok, hp, base)
    names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    assert recorder.calls == [
        ("start",), ("begin",),
        ("before_write", names[0]), ("gram_term", names[0]),
        ("before_write", names[1]), ("gram_term", names[1]),
        ("carried_keys", names[0]), ("carried_keys", names[1]),
    ]
    VARIANTS.pop(Recorder.name)
    _edit(tok, hp, paper)
    for ours, theirs in zip(_weights(edited, hp), _weights(paper, hp)):
        assert torch.equal(ours, theirs)  # bit-identical: the hooks alone change nothing


def test_a_gram_term_reaches_the_update_and_carried_keys_the_state(tok: Any, recorder: type[Recorder]) -> None:
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    _, paper = _edit(tok, hp)
    recorder.gram, recorder.extra = 1e6, (3, 1.0)
    model, session = _edit(tok, hp)
    for ours, theirs in zip(session.last_trace.layers, paper.last_trace.layers):
        assert ours.update_norm < 0.01 * theirs.update_norm  # a huge ridge-like term all but stops the write
    session.state.reconcile(model)
    name = hp.rewrite_module_tmp.format(hp.layers[0])
    assert session.state.n_keys(name) == len(FACTS) + 3  # the variant's keys join the edits' own


def test_fading_keys_of_different_decays_fail_the_batch_before_any_change(tok: Any,
                                                                          recorder: type[Recorder],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(Recorder):
        name = "other"

        def carried_keys(self, w_out_name: str) -> Optional[CarriedKeys]:
            return CarriedKeys(torch.ones(48, 2), 0.5)

    monkeypatch.setitem(VARIANTS, Other.name, Other)
    recorder.extra = (2, 0.9)
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    model = make_llama(len(tok))
    before = _weights(model, hp)
    session = fake_session(model, hp)
    with pytest.raises(RuntimeError, match="different rates"):
        apply_ece_to_model(model, tok, FACTS, hp)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model, hp)))  # all or nothing
    assert not session.state.has_pending


def _core_modules() -> list[Path]:
    return [p for p in sorted(METHOD_DIR.rglob("*.py")) if "variants" not in p.parts and p.name != "hparams.py"]


def test_the_core_never_reads_a_variants_hparams() -> None:
    owned = {field: cls.name for cls in VARIANTS.values() for field in cls.fields}
    found = []
    for path in _core_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else node.value if (
                isinstance(node, ast.Constant) and isinstance(node.value, str)) else None
            if name in owned:
                found.append(f"{path.name}:{node.lineno} reads {name} ({owned[name]})")
    assert _core_modules() and not found, found
