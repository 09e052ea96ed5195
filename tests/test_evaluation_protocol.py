"""Sequential editing protocol runner, summary statistics, the Table-1 layout and result files."""

from __future__ import annotations

import csv
import io
import json
import math
import string
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ece_plugin.evaluation import (
    CONSISTENCY_UNAVAILABLE,
    EvaluationError,
    RunResult,
    format_table,
    mean_sem,
    results_csv,
    run_protocol,
    summarize,
    write_csv,
    write_json,
)
from ece_plugin.evaluation.data import EditRecord


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class BigramStub(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.table[input_ids]


def cf_record(case_id: int, new: str, true: str) -> EditRecord:
    return EditRecord(
        case_id=case_id,
        kind="counterfact",
        prompt=f"S{case_id} is",
        subject=f"S{case_id}",
        target_new=new,
        target_true=true,
        paraphrase_prompts=[f"So, S{case_id} is"],
        neighborhood_prompts=[f"T{case_id} is"],
        neighborhood_answers=[true],
    )


def favour_new_targets(model: BigramStub, tok: Any, batch: list[EditRecord], strength: float) -> None:
    """A toy "edit": make ' ' -> target_new the likeliest transition (shared by every prompt)."""
    space = tok.convert_tokens_to_ids(" ")
    for rec in batch:
        model.table[space, tok.convert_tokens_to_ids(rec.target_new)] = strength


# ---------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("protocol", ["after_all", "after_batch"])
def test_protocol_evaluates_at_the_right_times(protocol: str) -> None:
    records = [cf_record(i, "x", "y") for i in range(5)]
    events: list[tuple[str, tuple[Any, ...]]] = []

    def edit_fn(model: Any, tok: Any, batch: list[EditRecord]) -> dict[str, Any]:
        events.append(("edit", tuple(r.case_id for r in batch)))
        return {"n": len(batch), "tensor": torch.ones(2)}

    def evaluate(model: Any, tok: Any, recs: list[EditRecord], reference: Any = None) -> list[dict[str, Any]]:
        ref_ids = None if reference is None else tuple(c["case_id"] for c in reference)
        events.append(("eval", tuple(r.case_id for r in recs), ref_ids))  # type: ignore[arg-type]
        return [{"case_id": r.case_id, "efficacy": float(len(events))} for r in recs]

    result = run_protocol(
        torch.nn.Linear(1, 1),
        None,
        records,
        edit_fn,
        method="fake",
        batch_size=2,
        protocol=protocol,
        evaluate=evaluate,
        progress=False,
    )
    everything = (0, 1, 2, 3, 4)
    if protocol == "after_all":
        assert events == [
            ("eval", everything, None),
            ("edit", (0, 1)),
            ("edit", (2, 3)),
            ("edit", (4,)),
            ("eval", everything, everything),
        ]
    else:
        assert events == [
            ("eval", everything, None),
            ("edit", (0, 1)),
            ("eval", (0, 1), (0, 1)),
            ("edit", (2, 3)),
            ("eval", (2, 3), (2, 3)),
            ("edit", (4,)),
            ("eval", (4,), (4,)),
        ]
    assert [c["case_id"] for c in result.cases] == list(everything)
    assert result.pre_cases is not None and len(result.pre_cases) == 5
    assert len(result.seconds_per_batch) == 3
    assert result.edit_info[0] == {"n": 2, "tensor": [1.0, 1.0]}
    assert result.n_edits == 5 and result.batch_size == 2 and result.protocol == protocol
    json.dumps(result.to_dict())


def test_after_all_measures_forgetting_that_after_batch_misses() -> None:
    tok = char_tokenizer()
    # batch 1 teaches x (instead of y); batch 2 teaches y (instead of x), undoing batch 1
    records = [cf_record(0, "x", "y"), cf_record(1, "y", "x")]
    strengths = iter([3.0, 6.0])

    def edit_fn(model: Any, tok: Any, batch: list[EditRecord]) -> None:
        time.sleep(0.002)
        favour_new_targets(model, tok, batch, next(strengths))

    results = {}
    for protocol in ("after_batch", "after_all"):
        strengths = iter([3.0, 6.0])
        results[protocol] = run_protocol(
            BigramStub(len(tok)),
            tok,
            records,
            edit_fn,
            method="toy",
            batch_size=1,
            protocol=protocol,
            eval_kwargs={"generation": False},
            progress=False,
        )
    after_batch, after_all = results["after_batch"], results["after_all"]
    assert [c["efficacy"] for c in after_batch.cases] == [1.0, 1.0]
    assert [c["efficacy"] for c in after_all.cases] == [0.0, 1.0]  # the first edit was overwritten
    assert after_all.summary["efficacy"] == {"mean": 0.5, "sem": 0.5, "n": 2}
    assert after_all.pre_summary is not None and after_all.pre_summary["efficacy"]["mean"] == 0.0
    assert after_all.kind == "counterfact"
    assert all(s >= 0.002 for s in after_all.seconds_per_batch)
    assert after_all.mean_seconds_per_batch == pytest.approx(sum(after_all.seconds_per_batch) / 2)


def test_protocol_rejects_bad_arguments() -> None:
    records = [cf_record(0, "x", "y")]
    model, tok = torch.nn.Linear(1, 1), None
    with pytest.raises(EvaluationError, match="protocol must be one of"):
        run_protocol(model, tok, records, lambda *a: None, method="m", protocol="sometimes")
    with pytest.raises(EvaluationError, match="batch_size must be >= 1"):
        run_protocol(model, tok, records, lambda *a: None, method="m", batch_size=0)
    with pytest.raises(EvaluationError, match="unique case_id"):
        run_protocol(model, tok, records * 2, lambda *a: None, method="m")


# ---------------------------------------------------------------------------------------------- summary
def test_mean_and_standard_error_exact() -> None:
    # mean 0.75; sample variance ((.25^2)*3 + .75^2)/3 = 0.25; sem = 0.5 / sqrt(4) = 0.25
    assert mean_sem([1.0, 0.0, 1.0, 1.0]) == {"mean": 0.75, "sem": 0.25, "n": 4}
    assert mean_sem([0.3]) == {"mean": 0.3, "sem": None, "n": 1}
    cases: list[dict[str, Any]] = [
        {
            "case_id": 0,
            "efficacy": 1.0,
            "generalization": 0.5,
            "specificity": 0.25,
            "efficacy_magnitude": 0.1,
            "consistency": None,
            "details": {"x": 1},
        },
        {
            "case_id": 1,
            "efficacy": 1.0,
            "generalization": 0.5,
            "specificity": 0.25,
            "efficacy_magnitude": 0.3,
            "consistency": None,
        },
    ]
    summary = summarize(cases)
    assert summary["efficacy"] == {"mean": 1.0, "sem": 0.0, "n": 2}
    assert summary["efficacy_magnitude"]["mean"] == pytest.approx(0.2)
    assert summary["efficacy_magnitude"]["sem"] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))
    assert "consistency" not in summary and "details" not in summary and "case_id" not in summary
    assert summary["score"]["mean"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.25))  # harmonic mean
    assert "score" not in summarize(cases, kind="zsre")


# ---------------------------------------------------------------------------------------------- table and files
def _result(method: str, efficacy: float, *, pre: bool = False) -> RunResult:
    summary: dict[str, dict[str, Any]] = {
        "efficacy": {"mean": efficacy, "sem": 0.25, "n": 4},
        "generalization": {"mean": 0.5, "sem": 0.125, "n": 4},
        "specificity": {"mean": 0.875, "sem": None, "n": 1},
        "fluency": {"mean": 6.2231, "sem": 0.01, "n": 4},
    }
    return RunResult(
        method=method,
        protocol="after_all",
        kind="counterfact",
        n_edits=4,
        batch_size=2,
        summary=summary,
        pre_summary=dict(summary, efficacy={"mean": 0.125, "sem": 0.0625, "n": 4}) if pre else None,
        seconds_per_batch=[1.0, 2.0],
        mean_seconds_per_batch=1.5,
    )


def test_format_table_layout() -> None:
    results = [
        RunResult.unavailable(
            "ROME", "needs a CUDA device\n(EasyEdit 0.0.1 hard-codes cuda)", kind="counterfact"
        ),
        _result("ECE", 0.75, pre=True),
        _result("MEMIT", 1.0),
    ]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("CounterFact: 4 edits, batch size 2, evaluated after_all")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Method", "Eff.", "Gen.", "Spe.", "Flu.", "Consis.", "Time/batch (s)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:8]]
    assert rows[0][:3] == ["Pre-edited", "12.50 ± 6.25", "50.00 ± 12.50"]
    assert rows[0][-1] == "-"
    assert rows[1][0] == "ROME" and rows[1][1] == "n/a: needs a CUDA device (EasyEdit 0.0.1 hard-codes cuda)"
    assert rows[2] == ["ECE", "75.00 ± 25.00", "50.00 ± 12.50", "87.50", "622.31 ± 1.00", "n/a", "1.50"]
    assert rows[3][:2] == ["MEMIT", "100.00 ± 25.00"]
    assert f"Consis.: {CONSISTENCY_UNAVAILABLE}" in table
    assert CONSISTENCY_UNAVAILABLE == "n/a (needs attribute_snippets.json, idf.npy, tfidf_vocab.json)"


def test_format_table_zsre_columns_and_kind_checks() -> None:
    zsre = RunResult(
        method="ECE",
        protocol="after_batch",
        kind="zsre",
        n_edits=2,
        batch_size=1,
        summary={"efficacy": {"mean": 0.5, "sem": 0.5, "n": 2}},
        mean_seconds_per_batch=0.25,
    )
    table = format_table([zsre])
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert header == ["Method", "Eff.", "Gen.", "Spe.", "Time/batch (s)"]
    assert "| ECE    | 50.00 ± 50.00 | n/a  | n/a  | 0.25" in table
    with pytest.raises(ValueError, match="mix"):
        format_table([zsre, _result("ECE", 0.5)])


def test_result_json_and_csv_files_are_written_atomically(tmp_path: Path) -> None:
    results = [_result("ECE", 0.75, pre=True), RunResult.unavailable("ROME", "no GPU", kind="counterfact")]
    path = results[0].save_json(tmp_path / "out" / "ece.json")
    assert RunResult.load_json(path) == results[0]
    write_json(tmp_path / "out" / "all.json", [r.to_dict() for r in results])
    assert json.loads((tmp_path / "out" / "all.json").read_text())[1]["error"] == "no GPU"
    write_csv(tmp_path / "out" / "table.csv", results)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    assert [r["method"] for r in rows] == ["Pre-edited", "ECE", "ROME"]
    assert float(rows[1]["efficacy_mean"]) == 0.75 and rows[1]["specificity_sem"] == ""
    assert rows[2]["error"] == "no GPU"
    assert results_csv(results) == (tmp_path / "out" / "table.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["all.json", "ece.json", "table.csv"]
