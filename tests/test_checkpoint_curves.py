"""benchmarks/checkpoint_curves.py: an experiment's checkpoints as curves."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import benchmark_module

FIELDS = ["label", "setting", "method", "n_edits", "protocol", "efficacy", "generalization", "specificity",
          "perplexity", "retention_accuracy", "weight_growth_max"]


def _experiment(root: Path) -> Path:
    folder = root / "exp"
    folder.mkdir(parents=True)
    with open(folder / "checkpoints.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow({"label": "Pre-edited", "setting": "pre-edit", "method": "Pre-edited", "n_edits": "0",
                         "protocol": "after_all", "efficacy": "1", "perplexity": "243"})
        for label, setting in (("A", "a"), ("B", "b")):
            for n in (1000, 2000):
                for protocol in ("after_all", "immediate"):
                    writer.writerow({"label": label, "setting": setting, "method": "ECE-AS", "n_edits": str(n),
                                     "protocol": protocol, "efficacy": "90", "generalization": "80",
                                     "specificity": "70", "perplexity": "300", "retention_accuracy": "40",
                                     "weight_growth_max": "" if setting == "b" else "2.5"})
        writer.writerow({"label": "A", "setting": "a", "method": "ECE-AS", "n_edits": "500", "protocol": "",
                         "efficacy": "95"})  # an older row without a protocol: read as after all
    return folder


def test_runs_are_series_by_label_and_protocol_without_the_unedited_model(tmp_path: Path) -> None:
    cc = benchmark_module("checkpoint_curves")
    folder = _experiment(tmp_path / "results")
    series = cc.read(folder / "checkpoints.csv", "label", {})
    assert set(series) == {(r, p) for r in "AB" for p in ("after_all", "immediate")}
    assert [n for n, _ in series[("A", "after_all")]] == [500, 1000, 2000]  # sorted; the protocol-less row joins
    kept = cc.read(folder / "checkpoints.csv", "label", cc.parse_where(["setting=b"]))
    assert {r for r, _ in kept} == {"B"}


def test_the_figure_is_written_into_the_experiment_folder(tmp_path: Path) -> None:
    cc = benchmark_module("checkpoint_curves")
    _experiment(tmp_path / "results")
    assert cc.main(["--results", str(tmp_path / "results"), "--experiment", "exp", "--out", "c.png",
                    "--pre-edit-ppl", "243"]) == 0
    assert (tmp_path / "results" / "exp" / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "none", "--out", "c.png"], "no such file"),
    (["--experiment", "exp", "--out", "c.png", "--where", "setting=z"], "no checkpoint rows"),
    (["--experiment", "exp", "--out", "c.png", "--where", "setting"], "expected KEY=V1,V2"),
])
def test_bad_requests_are_refused_naming_the_problem(tmp_path: Path, argv: list[str], message: str) -> None:
    cc = benchmark_module("checkpoint_curves")
    _experiment(tmp_path / "results")
    with pytest.raises(SystemExit, match=message):
        cc.main(["--results", str(tmp_path / "results"), *argv])
