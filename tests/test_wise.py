"""WISE from EasyEdit main in the studies: one adapter for the whole sequence, each scored prompt routed alone at
its own positions, loc prompts drawn from the statistics corpus (never a scored prompt), reset puts the wrapped
module back, and a lifelong run interrupted and resumed from its checkpoint (the side memories) equals the whole
run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import interrupt_second_batch, lifelong_rows

from ece_plugin import easyedit as ee
from ece_plugin.evaluation.scoring import score_continuations

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "testbed-llama"
COUNTERFACT = REPO / "data" / "counterfact" / "counterfact-edit.json"
VERSION = ee.easyedit_version()
needs_main = pytest.mark.skipif(
    VERSION != ee.EASYEDIT_MAIN,
    reason=f"needs EasyEdit main (easyeditor here: {VERSION or 'none'}): WISE exists only there; "
    "`make test` runs this file in .venv-main",
)
pytestmark = pytest.mark.skipif(not (TESTBED / "config.json").is_file(), reason="bundled testbed missing")
LOC = ["The sky was grey over the harbour.", "Rain fell on the old stone bridge.", "A dog slept by the door."]


def _wise_yaml(tmp_path: Path, **changes: Any) -> Path:
    """WISE's scale-testbed file for the small bundled testbed: its layer 0, fewer steps, side memories filed
    every 2 edits and merged every 4, so that a few edits go through every part of WISE."""
    config = yaml.safe_load((REPO / "hparams" / "WISE" / "testbed-llama-scale2.yaml").read_text())
    config.update(model_name=str(TESTBED), inner_params=["model.layers[0].mlp.down_proj.weight"], n_iter=8,
                  save_freq=2, merge_freq=4, **changes)
    path = tmp_path / "wise.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _requests(n: int) -> list[dict[str, Any]]:
    from ece_plugin.evaluation.data import load_records

    return [r.to_request() for r in load_records(COUNTERFACT, limit=n)]


def _nll(model: torch.nn.Module, tok: Any, requests: list[dict[str, Any]], batch_size: int) -> list[float]:
    scores = score_continuations(model, tok, [r["prompt"] for r in requests], [r["target_new"] for r in requests],
                                 batch_size=batch_size)
    return [s.nll for s in scores]


def test_loc_prompts_are_corpus_sentences_in_a_fixed_order_never_holding_the_subject(tmp_path: Path) -> None:
    from ece_plugin.lab.study.wise import LOC_WORDS, WiseMethod, corpus_sentences

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Ann Lee was born in Oslo. Short one. Ann Lee was born in Oslo. The river runs south to "
                      "the sea. Bob Ray plays the violin in Rome!\nA bridge crosses the wide river there?")
    pool = corpus_sentences([corpus])
    assert pool == corpus_sentences([corpus])  # the same order every time
    assert sorted(pool) == sorted(["Ann Lee was born in Oslo.", "The river runs south to the sea.",
                                   "Bob Ray plays the violin in Rome!", "A bridge crosses the wide river there?"])
    assert all(LOC_WORDS[0] <= len(s.split()) <= LOC_WORDS[1] for s in pool)  # "Short one." is left out

    method = WiseMethod("WISE", REPO / "hparams" / "WISE" / "testbed-llama-scale2.yaml", loc_prompts=pool)
    requests = [{"subject": "Ann Lee"}, {"subject": "Bob Ray"}, {"subject": "Nobody"}]
    chosen = method.next_loc_prompts(torch.nn.Linear(1, 1), requests)
    assert len(chosen) == 3 and "Ann Lee" not in chosen[0] and "Bob Ray" not in chosen[1]
    assert method._loc_next >= 3  # the next batch goes on from here


@pytest.mark.easyeditor
@needs_main
def test_wise_keeps_one_adapter_routes_each_row_alone_and_reset_puts_the_module_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.common import load_model_and_tokenizer
    from ece_plugin.lab.study.wise import WiseMethod

    monkeypatch.chdir(tmp_path)  # BaseEditor writes logs/ into the working directory
    model, tok = load_model_and_tokenizer(TESTBED, device="cpu")
    method = WiseMethod("WISE", _wise_yaml(tmp_path), loc_prompts=LOC)
    assert method.availability(model) == (True, "")
    original = model.model.layers[0].mlp.down_proj
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    requests = _requests(6)
    before = _nll(model, tok, requests, 1)
    method.prepare(model, tok)
    method.reset(model)
    assert method.edit_batch(model, tok, requests[:3]).via == "BaseEditor.edit"
    method.edit_batch(model, tok, requests[3:])

    adapter = method.adapter(model)
    assert adapter is not None and adapter.editing_total_cnt == 6  # both batches in one adapter
    assert len(adapter.memory_weight) == 2 and adapter.merge_cnt == 1  # filed at 2, 4 (merged), 6
    after = _nll(model, tok, requests, 1)
    assert sum(a < b - 1.0 for a, b in zip(after, before)) >= 4, (before, after)  # the edits landed
    # batched and padded, each row is routed as it is alone (without the row-wise forward WISE routes a whole
    # batch by one mean distance and, with two side memories, fails on it)
    assert _nll(model, tok, requests, 4) == pytest.approx(after, abs=1e-4)
    assert method.side_state_nbytes(model) == 3 * adapter.new_weight.numel() * 4
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags

    method.reset(model)
    assert model.model.layers[0].mlp.down_proj is original and method.adapter(model) is None
    assert _nll(model, tok, requests, 1) == pytest.approx(before, abs=1e-6)
    wise = ee.import_easyedit("easyeditor.models.wise.WISE")
    assert wise.edit_history == [] and wise.merge_group_edit_history == []


@pytest.mark.easyeditor
@needs_main
def test_wise_lifelong_resumed_from_its_side_memories_equals_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab import cli
    from ece_plugin.lab.study.wise import WiseMethod

    monkeypatch.chdir(tmp_path)
    wise = _wise_yaml(tmp_path)

    def run(out: Path, *extra: str) -> int:
        return cli.main([
            "--log-level", "WARNING", "lifelong", "--model", str(TESTBED), "--device", "cpu", "--n-edits", "6",
            "--batch-size", "2", "--checkpoint-every", "2", "--methods", "WISE", "--wise-hparams", str(wise),
            "--n-retention", "4", "--ppl-tokens", "256", "--n-fluency-prompts", "2", "--out", str(out), *extra,
        ])

    whole = tmp_path / "whole"
    assert run(whole) == 0
    kept = lifelong_rows(whole)
    assert [r["n_edits"] for r in kept] == [2, 4, 6]
    assert kept[-1]["state_bytes"] > kept[0]["state_bytes"] > 0  # side memories; the weights do not change
    assert all(g == 0.0 for r in kept for g in r["weight_growth"].values())
    assert kept[-1]["edits"]["efficacy"]["mean"] > 0.5

    cut = tmp_path / "cut"
    original = interrupt_second_batch(monkeypatch, WiseMethod)
    assert run(cut, "--keep-checkpoints") == 130
    saved = list((cut / "checkpoints").glob("*/side_memory.safetensors"))
    assert saved and json.loads((saved[0].parent / "side_memory.json").read_text())["n_memories"] == 1
    monkeypatch.setattr(WiseMethod, "edit_batch", original)
    assert cli.main(["--log-level", "WARNING", "lifelong", "--resume", str(cut)]) == 0
    assert lifelong_rows(cut) == kept
