"""benchmarks/lifelong_validation.py: the interleaved validation sequence and measurement on its records only."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from conftest import benchmark_module

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lv() -> ModuleType:
    return benchmark_module("lifelong_validation")


def test_validation_batches_are_spread_among_never_trained_load_edits(lv: ModuleType) -> None:
    val = lv.validation_records()
    seq, positions = lv.interleaved(val, 600)
    assert len(seq) == 1000 and len(positions) == 400
    batches = [b for b in range(10) if b * 100 in positions]
    assert batches == [0, 3, 6, 9]  # evenly spread, first and last batch included
    assert [seq[i] for i in sorted(positions)] == val  # every validation record once, in order
    load = [r for i, r in enumerate(seq) if i not in positions]
    manifest = (REPO / "testbed" / "testbed-llama-scale2" / "testbed_manifest.json").read_text()
    trained = set(json.loads(manifest)["counterfact_case_ids"])
    assert not trained & {r["case_id"] for r in load}  # the load edits are facts the testbed never saw
    with pytest.raises(SystemExit, match="multiple of 100"):
        lv.interleaved(val, 150)


def _probes(records: list[str], measured: Any) -> Any:
    from ece_plugin.lab.study.lifelong import Probes

    return Probes(records=[SimpleNamespace(case_id=r) for r in records], retention_records=[], texts={},
                  kind="counterfact", measured=measured)


@pytest.fixture()
def fake_scoring(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """lifelong's scoring, replaced: each case is its record, each summary the records it read."""
    import ece_plugin.lab.study.lifelong as lifelong

    scored: list[list[str]] = []

    def evaluate(model: Any, tok: Any, records: list[Any], **kw: Any) -> list[dict[str, Any]]:
        scored.append([r.case_id for r in records])
        return [{"case_id": r.case_id, "reference": kw.get("reference")} for r in records]

    monkeypatch.setattr(lifelong, "evaluate_records", evaluate)
    monkeypatch.setattr(lifelong, "summarize", lambda cases, kind: [c["case_id"] for c in cases])
    monkeypatch.setattr(lifelong, "pad_token_id", lambda tok: 0)
    return scored


def test_measurements_read_the_measured_positions_only(fake_scoring: list[list[str]]) -> None:
    import ece_plugin.lab.study.lifelong as lifelong

    config = lifelong.LifelongConfig(n_edits=5, batch_size=1, checkpoint_every=5, n_fluency_prompts=0)
    probes = _probes(["a", "b", "c", "d", "e"], [1, 3])
    row = lifelong.measure(None, None, probes, config, 4, None)
    assert fake_scoring[-1] == ["b", "d"] and row["n_edits"] == 4 and row["first_batch"] == ["b"]
    lifelong.measure(None, None, probes, config, 2, None)
    assert fake_scoring[-1] == ["b"]
    lifelong.measure(None, None, probes, config, 0, None)  # the pre-edit row: every measured record
    assert fake_scoring[-1] == ["b", "d"]
    lifelong.measure(None, None, _probes(["a", "b", "c"], None), config, 0, None)  # no positions: every record
    assert fake_scoring[-1] == ["a", "b", "c"]


def test_the_immediate_protocol_reads_the_measured_batches_only(fake_scoring: list[list[str]]) -> None:
    import ece_plugin.lab.study.lifelong as lifelong

    config = lifelong.LifelongConfig(n_edits=6, batch_size=2, checkpoint_every=6)
    probes = _probes(["l0", "l1", "v0", "v1", "l2", "l3"], [2, 3])
    probes.kind = "zsre"
    pre = [{"case_id": "v0"}, {"case_id": "v1"}]  # the measured records' pre-edit cases, in order
    assert lifelong.measure_immediate(None, None, probes, config, 0, 2, pre) == []  # a load batch
    cases = lifelong.measure_immediate(None, None, probes, config, 2, 2, pre)
    assert [c["case_id"] for c in cases] == ["v0", "v1"] and cases[0]["reference"] == pre
    assert fake_scoring == [["v0", "v1"]]


@pytest.mark.parametrize("measured", [[], [3, 1], [1, 1], [9], [-1], [2, 3]])
def test_measured_positions_out_of_order_or_range_are_refused(measured: list[int]) -> None:
    from ece_plugin.lab.study.common import StudyError
    from ece_plugin.lab.study.lifelong import LifelongConfig

    with pytest.raises(StudyError, match="measured position"):
        _probes(["a", "b", "c", "d"], measured).prepare(None, LifelongConfig(n_edits=4, batch_size=1, checkpoint_every=2,
                                                                                n_fluency_prompts=0))


def test_the_validation_sequence_passes_its_positions_to_lifelong(lv: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_main(argv: list[str]) -> int:
        seen["argv"] = argv
        if "--measure-only" in argv:
            seen["positions"] = json.loads(Path(argv[argv.index("--measure-only") + 1]).read_text())
        seen["n"] = len(json.loads(Path(argv[argv.index("--data") + 1]).read_text()))
        return 0

    monkeypatch.setattr(lv, "main", fake_main)
    assert lv.run(["--load", "600", "--out", str(tmp_path / "v")]) == 0
    _, positions = lv.interleaved(lv.validation_records(), 600)
    assert seen["positions"] == sorted(positions) and seen["n"] == 1000
    assert lv.run(["--n-validation", "10", "--batch-size", "5", "--out", str(tmp_path / "w")]) == 0
    assert "--measure-only" not in seen["argv"]  # no load edits: every record is measured


def test_no_load_batch_repeats_a_prompt_and_the_shorter_sequences_are_unchanged(lv: ModuleType) -> None:
    raw = json.loads((REPO / "data" / "counterfact" / "counterfact-edit.json").read_text())
    assert lv.load_records(600) == raw[2200:2800]  # the sequence of the --load 600 rows, as measured
    load = lv.load_records(1600)
    assert len(load) == 1600
    for b in range(16):
        keys = [(r["prompt"], r["subject"]) for r in load[b * 100 : (b + 1) * 100]]
        assert len(set(keys)) == 100
    assert load != raw[2200:3800]  # record 3044 repeats a prompt of its batch and is skipped


@pytest.mark.parametrize("name", ["testbed-llama-scale2"])
def test_each_scale_testbed_trained_the_validation_records_and_not_the_load_edits(lv: ModuleType, name: str) -> None:
    model, hparams = lv.testbed_paths(name)
    assert hparams.is_file() and (model / "config.json").is_file()
    manifest = json.loads((model / "testbed_manifest.json").read_text())
    trained = set(manifest["counterfact_case_ids"])
    val = lv.validation_records()
    assert {r["case_id"] for r in val[:200]} <= set(manifest["counterfact_val_case_ids"])
    assert {r["case_id"] for r in val[200:]} <= trained  # counterfact-edit.json records 2000-2199
    assert not trained & {r["case_id"] for r in lv.load_records(1600)}
    with pytest.raises(SystemExit, match="one of"):
        lv.testbed_paths("testbed-llama")


def test_the_load_pool_holds_only_never_trained_records_and_keeps_the_measured_sequences(lv: ModuleType) -> None:
    edit = json.loads((REPO / "data" / "counterfact" / "counterfact-edit.json").read_text())
    pool = lv.never_trained_pool()
    assert pool[:2800] == edit[2200:5000]  # the --load sequences measured before the pool existed
    ids = [r["case_id"] for r in pool]
    assert len(ids) == len(set(ids)) == 9319
    for name in lv.TESTBEDS:
        manifest = json.loads((REPO / "testbed" / name / "testbed_manifest.json").read_text())
        trained = set(manifest["counterfact_case_ids"]) | set(manifest["counterfact_val_case_ids"])
        assert not trained & set(ids)
    checks = {edit[i]["case_id"] for i in lv.PRE_EDIT_CHECKS}
    assert not checks & set(ids)
    corpus = [edit[i] for i in lv.CORPUS]
    assert pool[-len(corpus):] == corpus  # the facts the statistics corpus describes come last


def test_the_10000_edit_sequence_spreads_the_reported_records_among_8000_load_edits(lv: ModuleType) -> None:
    reported = lv.reported_records()
    seq, positions = lv.interleaved(reported, 8000)
    assert len(seq) == 10000 and len(positions) == 2000
    assert [seq[i] for i in sorted(positions)] == reported
    batches = sorted({i // 100 for i in positions})
    assert len(batches) == 20 and batches[0] == 0 and batches[-1] == 99
    assert len({r["case_id"] for r in seq}) == 10000  # no fact edited twice
    with pytest.raises(SystemExit, match="--load 9400: only 93[0-9]{2} never-trained"):
        lv.interleaved(reported, 9400)


def test_reported_needs_load_edits(lv: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lv.run(["--reported", "--testbed", "testbed-llama-scale2", "--out", "unused"])
    assert "--reported needs --load" in capsys.readouterr().err


def _scores(efficacy: float) -> dict[str, Any]:
    metrics = {"efficacy": efficacy, "generalization": 0.5, "specificity": 0.7}
    edits = {k: {"mean": v, "sem": 0.01, "n": 200} for k, v in metrics.items()}
    return {
        "edits": edits, "first_batch": edits,
        "retention": {"retention_accuracy": 0.9, "retention_preference": 0.95, "n": 200.0},
        "perplexity": {"wiki.test": {"perplexity": 250.0, "nll": 5.5, "n_tokens": 64.0}}, "fluency": 4.0,
    }


def _finished_run(folder: Path, method: str, efficacy: float, pre_efficacy: float = 0.01) -> Path:
    """A finished run's lifelong.json in the layout `ece-plugin lifelong` writes (the fields the table reads)."""
    doc = {
        "protocol": "after_all", "kind": "counterfact",
        "config": {"n_edits": 200, "batch_size": 100, "checkpoint_every": 100},
        "meta": {"model": "m"},
        "pre_edit": {"n_edits": 0, **_scores(pre_efficacy)},
        "methods": [{"method": method, "n_done": 200, "batch_seconds": [1.0, 1.0],
                     "rows": [{"n_edits": 200, **_scores(efficacy)}]}],
    }
    folder.mkdir(parents=True)
    (folder / "lifelong.json").write_text(json.dumps(doc))
    return folder


def test_merge_names_each_run_by_its_label_and_refuses_another_sequence(lv: ModuleType, tmp_path: Path) -> None:
    a = _finished_run(tmp_path / "a", "ECE-AS", 0.9)
    b = _finished_run(tmp_path / "b", "ECE-AS", 0.6)
    paths = lv.merge(tmp_path / "out", [("paper", a), ("best", b)])
    merged = json.loads(paths["json"].read_text())
    assert [(m["method"], m["rows"][-1]["edits"]["efficacy"]["mean"]) for m in merged["methods"]] == [("paper", 0.9), ("best", 0.6)]
    assert merged["meta"]["merged_from"] == {"paper": str(a), "best": str(b)}
    table = paths["md"].read_text()
    assert "| paper | 200 | after all | 90.0" in table and "| best | 200 | after all | 60.0" in table
    other = _finished_run(tmp_path / "c", "ECE-AS", 0.9, pre_efficacy=0.2)
    with pytest.raises(SystemExit, match="another sequence"):
        lv.merge(tmp_path / "out2", [("paper", a), ("other", other)])
    with pytest.raises(SystemExit, match="nor the pre-edit row"):
        lv.merge(tmp_path / "out3", [("paper", a), ("x", tmp_path / "missing")])
    # a run stopped before its end: its pre-edit row and its method's progress up to the last checkpoint
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    doc = json.loads((b / "lifelong.json").read_text())
    (stopped / "pre_edit.json").write_text(json.dumps({**doc["pre_edit"], "cases": []}))
    (stopped / "checkpoints" / "ECE-AS.progress.json").write_text(
        json.dumps({**doc["methods"][0], "n_done": 100, "written_neurons": {"w": [1]}})
    )
    merged = json.loads(lv.merge(tmp_path / "out5", [("paper", a), ("stopped", stopped)])["json"].read_text())
    assert merged["meta"]["stopped_at"] == {"stopped": 100} and merged["methods"][1]["method"] == "stopped"
    with pytest.raises(SystemExit, match="must be a finished one"):
        lv.merge(tmp_path / "out6", [("stopped", stopped), ("paper", a)])
    for key, merges in (("checkpoint_every", True), ("batch_size", False)):  # measured elsewhere: the same sequence
        d = tmp_path / f"changed-{key}"
        d.mkdir()
        doc = json.loads((b / "lifelong.json").read_text())
        doc["config"][key] = doc["config"][key] * 2
        (d / "lifelong.json").write_text(json.dumps(doc))
        if merges:
            lv.merge(tmp_path / f"out-{key}", [("paper", a), (key, d)])
        else:
            with pytest.raises(SystemExit, match="another sequence"):
                lv.merge(tmp_path / f"out-{key}", [("paper", a), (key, d)])
    assert lv._label_dir(f"ECE [mu=1]={a}") == ("ECE [mu=1]", a)  # a label may name an override
    with pytest.raises(SystemExit, match="LABEL=RUN_FOLDER"):
        lv.run(["--merge", str(a), "--out", str(tmp_path / "out4")])


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "carry_values=true"], "'carry_values' is not an ECE hyperparameter"),  # removed: it did not help
    (["--rewind-z"], "unrecognized arguments: --rewind-z"),  # the NSE prototypes are gone: they did not help
    (["--write-passes", "2"], "unrecognized arguments: --write-passes"),
])
def test_removed_settings_are_refused_by_name(lv: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str],
                                              message: str) -> None:
    with pytest.raises(SystemExit):
        lv.run([*argv, "--out", "unused"])
    assert message in capsys.readouterr().err
