"""GRACE from EasyEdit main in the studies: the scorer groups rows by where their prompts end and says where, GRACE's
adapter reads there, reset puts the wrapped module back, and a lifelong run interrupted and resumed from its
checkpoint (the codebook) equals the whole run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from conftest import interrupt_second_batch, lifelong_rows

from ece_plugin import easyedit as ee
from ece_plugin.evaluation.scoring import encode_continuation, score_continuations

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "testbed-llama"
COUNTERFACT = REPO / "data" / "counterfact" / "counterfact-edit.json"
VERSION = ee.easyedit_version()
needs_main = pytest.mark.skipif(
    VERSION != ee.EASYEDIT_MAIN,
    reason=f"needs EasyEdit main (easyeditor here: {VERSION or 'none'}): GRACE exists only there; "
    "`make test` runs this file in .venv-main",
)
pytestmark = pytest.mark.skipif(not (TESTBED / "config.json").is_file(), reason="bundled testbed missing")

PROMPTS = ["The capital of France is", "Paris is", "A", "The mother tongue of Danielle Darrieux is", "B is"]
TARGETS = ["Paris", "a city in France", "letter", "French", "the letter after A"]


@pytest.fixture(scope="module")
def testbed() -> tuple[torch.nn.Module, Any]:
    from ece_plugin.lab.study.common import load_model_and_tokenizer

    return load_model_and_tokenizer(TESTBED, device="cpu")


def test_scorer_groups_rows_by_prompt_end_and_names_it(testbed: tuple[torch.nn.Module, Any]) -> None:
    model, tok = testbed
    ends = {tuple(ids): n_prompt for ids, n_prompt in (encode_continuation(tok, p, t) for p, t in zip(PROMPTS, TARGETS))}
    said: list[Optional[int]] = []
    seen: list[tuple[Optional[int], list[int]]] = []

    def record_forward(module: Any, args: Any, kwargs: Any) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [ends[tuple(int(x) for x in ids[r][mask[r].bool()])] for r in range(ids.shape[0])]
        seen.append((said[-1], rows))

    handle = model.register_forward_pre_hook(record_forward, with_kwargs=True)
    try:
        hooked = score_continuations(model, tok, PROMPTS, TARGETS, batch_size=2, prompt_end_hook=said.append)
    finally:
        handle.remove()
    plain = score_continuations(model, tok, PROMPTS, TARGETS, batch_size=2)

    assert said[-1] is None  # the end of the scoring is said too
    assert seen and all(all(n_prompt - 1 == position for n_prompt in rows) for position, rows in seen)
    assert sum(len(rows) for _, rows in seen) == len(PROMPTS) and all(len(rows) <= 2 for _, rows in seen)
    for a, b in zip(hooked, plain):  # same scores, in the callers' order, whatever the grouping
        assert a.target_ids == b.target_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def _grace_yaml(tmp_path: Path) -> Path:
    """GRACE's scale-testbed file for the small bundled testbed: its layer 0 instead of layer 3."""
    config = yaml.safe_load((REPO / "hparams" / "GRACE" / "testbed-llama-scale2.yaml").read_text())
    config.update(model_name=str(TESTBED), inner_params=["model.layers[0].mlp.down_proj.weight"], n_iter=20)
    path = tmp_path / "grace.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _requests(n: int) -> list[dict[str, Any]]:
    from ece_plugin.evaluation.data import load_records

    return [r.to_request() for r in load_records(COUNTERFACT, limit=n)]


def _nll(model: torch.nn.Module, tok: Any, requests: list[dict[str, Any]], hook: Any) -> list[float]:
    scores = score_continuations(model, tok, [r["prompt"] for r in requests], [r["target_new"] for r in requests],
                                 prompt_end_hook=hook)
    return [s.nll for s in scores]


@pytest.mark.easyeditor
@needs_main
def test_grace_reads_where_the_prompt_ends_and_reset_puts_the_module_back(
    testbed: tuple[torch.nn.Module, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.grace import GraceMethod

    model, tok = testbed
    monkeypatch.chdir(tmp_path)  # BaseEditor writes logs/ into the working directory
    method = GraceMethod("GRACE", _grace_yaml(tmp_path))
    assert method.availability(model) == (True, "")
    original = model.model.layers[0].mlp.down_proj
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    requests = _requests(3)
    before = _nll(model, tok, requests[:2], None)
    method.prepare(model, tok)
    method.reset(model)
    outcome = method.edit_batch(model, tok, requests[:2])

    assert outcome.via == "BaseEditor.edit"
    adapter = method.adapter(model)
    assert adapter is not None and len(adapter.keys) >= 1
    assert method.codebook_nbytes(model) > 0
    read_at_end = _nll(model, tok, requests[:2], method.prompt_end_hook)
    read_last = _nll(model, tok, requests[:2], None)  # the last position: a target token, no key there
    assert all(a < b - 1.0 for a, b in zip(read_at_end, before)), (before, read_at_end)
    assert read_last == pytest.approx(before, abs=1e-4)
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags  # GRACE froze them

    method.reset(model)
    assert model.model.layers[0].mlp.down_proj is original and method.adapter(model) is None
    assert _nll(model, tok, requests[:2], None) == pytest.approx(before, abs=1e-6)


@pytest.mark.easyeditor
@needs_main
def test_grace_lifelong_resumed_from_its_codebook_equals_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab import cli
    from ece_plugin.lab.study.grace import GraceMethod

    monkeypatch.chdir(tmp_path)
    grace = _grace_yaml(tmp_path)

    def run(out: Path, *extra: str) -> int:
        return cli.main([
            "--log-level", "WARNING", "lifelong", "--model", str(TESTBED), "--device", "cpu", "--n-edits", "4",
            "--batch-size", "2", "--checkpoint-every", "2", "--methods", "GRACE", "--grace-hparams", str(grace),
            "--n-retention", "4", "--ppl-tokens", "256", "--n-fluency-prompts", "2", "--out", str(out), *extra,
        ])

    whole = tmp_path / "whole"
    assert run(whole) == 0
    kept = lifelong_rows(whole)
    assert [r["n_edits"] for r in kept] == [2, 4]
    assert kept[-1]["state_bytes"] > kept[0]["state_bytes"] > 0  # the codebook grows; the weights do not
    assert all(g == 0.0 for r in kept for g in r["weight_growth"].values())
    assert kept[-1]["edits"]["efficacy"]["mean"] > 0.5

    cut = tmp_path / "cut"
    original = interrupt_second_batch(monkeypatch, GraceMethod)
    assert run(cut, "--keep-checkpoints") == 130
    assert [p.name for p in (cut / "checkpoints").glob("*/codebook.safetensors")]
    monkeypatch.setattr(GraceMethod, "edit_batch", original)
    assert cli.main(["--log-level", "WARNING", "lifelong", "--resume", str(cut)]) == 0
    assert lifelong_rows(cut) == kept


@pytest.mark.easyeditor
@needs_main
def test_grace_edit_whose_key_lands_on_a_key_with_its_label_trains_that_value(
    testbed: tuple[torch.nn.Module, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EasyEdit's GRACE freezes every parameter at each call, its codebook's values too: the same fact edited again
    (its key within the radius of a key with its label: GRACE widens that radius and trains its value) failed with
    'element 0 of tensors does not require grad' (a 2,000-edit CounterFact run stopped there after 1,600 edits)."""
    from ece_plugin.lab.study.grace import GraceMethod

    model, tok = testbed
    monkeypatch.chdir(tmp_path)
    method = GraceMethod("GRACE", _grace_yaml(tmp_path))
    method.prepare(model, tok)
    method.reset(model)
    try:
        request = _requests(1)[0]
        method.edit_batch(model, tok, [request, dict(request)])  # the second call finds its own key, same label
        adapter = method.adapter(model)
        assert len(adapter.keys) == 1  # no new key: the radius was widened, the value trained
        assert _nll(model, tok, [request], method.prompt_end_hook)[0] < 1.0
    finally:
        method.reset(model)


def test_the_studies_pass_a_methods_prompt_end_hook_to_the_scorer() -> None:
    """Every study scores through runner.run_method (bench, demo, batch and layer studies) or lifelong.measure;
    the runner hands the method's hook to the evaluator and leaves the others' options as they were."""
    from types import SimpleNamespace

    from ece_plugin.lab.study.runner import _with_prompt_end_hook

    said: list[Optional[int]] = []
    grace_like, plain = SimpleNamespace(prompt_end_hook=said.append), SimpleNamespace()
    assert _with_prompt_end_hook(plain, {"kind": "zsre"}) == {"kind": "zsre"}
    assert _with_prompt_end_hook(plain, None) is None
    assert _with_prompt_end_hook(grace_like, {"kind": "zsre"}) == {"kind": "zsre", "prompt_end_hook": said.append}


def test_grace_edit_ids_are_saved_flat_and_nested_back_as_grace_builds_them() -> None:
    """GRACE nests its edit ids one level deeper per key (``[ids] + [new]``): after about a thousand keys json
    cannot write them (a 2,000-edit run stopped at its 1,000-edit checkpoint with RecursionError). The checkpoint
    keeps them flat and puts GRACE's nesting back, and reads a checkpoint written nested."""
    from ece_plugin.lab.study.grace import _flat_edit_ids, _nested_edit_ids

    nested: Any = ["t0"]
    for i in range(1, 5000):
        nested = [nested] + [f"t{i}"]
    flat = _flat_edit_ids(nested)
    assert flat == [f"t{i}" for i in range(5000)]
    assert json.loads(json.dumps(flat)) == flat
    rebuilt = _nested_edit_ids(flat)
    for i in range(4999, 0, -1):  # walk down both without recursion
        assert rebuilt[1] == nested[1] == f"t{i}"
        rebuilt, nested = rebuilt[0], nested[0]
    assert rebuilt == nested == ["t0"]
    assert _flat_edit_ids(flat) == flat  # already flat: as it is
    assert _flat_edit_ids([["a"], "b"]) == ["a", "b"] and _nested_edit_ids([]) == []
