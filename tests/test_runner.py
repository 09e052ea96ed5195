"""The study runner's method frame: every run starts from a reset, prepared method and leaves the model's edited
weights as they were (or at the given snapshot), also when the method fails half-way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_evaluation_protocol import BigramStub, cf_record, char_tokenizer

from ece_plugin.lab.study.baselines import BatchOutcome
from ece_plugin.lab.study.runner import run_method, time_method


class ScribbleThenFail:
    """Adds 1 to the model's table on every batch and raises on batch ``fail_at`` (0: never)."""

    name = "scribble"

    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.batches = 0
        self.resets = 0
        self.prepared = 0

    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        return True, ""

    def edited_weight_names(self, model: torch.nn.Module) -> list[str]:
        return ["table"]

    def prepare(self, model: torch.nn.Module, tok: Any) -> None:
        self.prepared += 1

    def reset(self, model: torch.nn.Module) -> None:
        self.resets += 1

    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        self.batches += 1
        with torch.no_grad():
            model.table.add_(1.0)
        if self.batches == self.fail_at:
            raise RuntimeError("boom in batch")
        return BatchOutcome(seconds=0.25)


@pytest.fixture
def setup() -> tuple[BigramStub, Any, list[Any]]:
    tok = char_tokenizer()
    model = BigramStub(len(tok))
    with torch.no_grad():
        model.table.normal_()
    return model, tok, [cf_record(i, "Paris", "Rome") for i in range(3)]


def test_run_method_failing_half_way_is_reported_and_the_model_restored(setup: Any) -> None:
    model, tok, records = setup
    before = model.table.detach().clone()
    method = ScribbleThenFail(fail_at=2)
    run = run_method(method, model, tok, records, batch_size=1, pre=False, progress=False)
    assert method.batches == 2  # the first batch went through, the second wrote and then raised
    assert not run.available and run.reason == "failed: RuntimeError: boom in batch"
    assert run.result.error == run.reason and run.result.n_edits == 3  # the table row says why
    assert torch.equal(model.table, before)
    assert method.prepared == 1 and method.resets == 2  # reset before the run and after it


def test_run_method_starts_from_and_ends_at_the_given_snapshot(setup: Any) -> None:
    model, tok, records = setup
    snapshot = {"table": torch.zeros_like(model.table)}
    method = ScribbleThenFail(fail_at=1)
    run_method(method, model, tok, records, batch_size=1, snapshot=snapshot, pre=False, progress=False)
    assert torch.equal(model.table, snapshot["table"])


def test_time_method_times_every_batch_and_restores(setup: Any) -> None:
    model, tok, records = setup
    before = model.table.detach().clone()
    method = ScribbleThenFail()
    assert time_method(method, model, tok, records, batch_size=2) == [0.25, 0.25]  # batches of 2 and 1
    assert torch.equal(model.table, before) and method.resets == 2


def test_time_method_restores_when_an_edit_raises(setup: Any) -> None:
    model, tok, records = setup
    before = model.table.detach().clone()
    method = ScribbleThenFail(fail_at=2)
    with pytest.raises(RuntimeError, match="boom in batch"):
        time_method(method, model, tok, records, batch_size=1)
    assert torch.equal(model.table, before) and method.resets == 2
