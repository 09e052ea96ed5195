"""benchmarks/capacity.py: checkpoints placed at their edited neurons per edit, against issue 15's targets."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import benchmark_module

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cap() -> ModuleType:
    return benchmark_module("capacity")


def _summary(es: float, ps: float, ns: float) -> dict[str, Any]:
    return {k: {"mean": v, "sem": 0.01, "n": 10} for k, v in
            (("efficacy", es), ("generalization", ps), ("specificity", ns))}


def _run(folder: Path, kind: str = "counterfact") -> Path:
    folder.mkdir(parents=True)
    ppl = {"wiki.test": {"perplexity": 200.0}}
    data = {
        "kind": kind,
        "config": {"batch_size": 15},
        "pre_edit": {"n_edits": 0, "edits": _summary(0.01, 0.02, 0.99), "first_batch": {}, "perplexity": ppl},
        "methods": [{
            "method": "ECE-AS",
            "rows": [
                {"n_edits": 150, "edits": _summary(0.99, 0.90, 0.96), "first_batch": {}, "perplexity": {"wiki.test": {"perplexity": 215.0}}},
                {"n_edits": 300, "edits": _summary(0.97, 0.84, 0.93), "first_batch": {}, "perplexity": {"wiki.test": {"perplexity": 230.0}}},
            ],
        }],
    }
    (folder / "lifelong.json").write_text(json.dumps(data))
    return folder


def test_edited_neurons_come_from_the_config_and_the_shipped_layers(cap: ModuleType) -> None:
    assert cap.testbed_neurons(REPO / "testbed" / "testbed-llama-scale2", REPO / "hparams") == 4 * 2560
    ratios = cap.paper_ratios(REPO / "hparams")
    assert ratios["Llama-3-8B"] == pytest.approx(5 * 14336 / 2000)  # layers 4-8
    assert ratios["GPT-2 XL"] == pytest.approx(5 * 6400 / 2000)  # layers 13-17: 16 per edit


def test_checkpoints_are_placed_and_judged_against_their_own_pre_edit_row(cap: ModuleType, tmp_path: Path) -> None:
    points = cap.run_points("300 / 15", _run(tmp_path / "r"), 10240)
    assert [(p.n_edits, p.batch_size) for p in points] == [(150, 15), (300, 15)]
    assert [p.neurons_per_edit for p in points] == pytest.approx([10240 / 150, 10240 / 300])
    # 150: every target (NS 96 >= 99 - 5, perplexity 215 <= 220); 300: PS 84 < 85, NS 93 < 94, 230 > 220
    assert points[0].targets() == {"ES": True, "PS": True, "NS": True, "PPL": True}
    assert points[1].targets() == {"ES": True, "PS": False, "NS": False, "PPL": False}
    assert cap.series_label(points[0], points) == "300 / 15"  # one method: the run's label names the series
    other = [cap.Point(**{**vars(points[0]), "method": "MEMIT"})]
    assert cap.series_label(points[0], points + other) == "300 / 15: ECE-AS"


def test_main_writes_table_plot_and_refuses_zsre(cap: ModuleType, tmp_path: Path) -> None:
    run = _run(tmp_path / "r")
    out = cap.main(["--model", str(REPO / "testbed" / "testbed-llama-scale2"), "--run", f"300 / 15={run}",
                    "--out", str(tmp_path / "out")])
    md = out["md"].read_text()
    assert "| 300 / 15 | ECE-AS | 15 | 150 | 68.3 | 99.0 ± 1.0 |" in md and "4 of 4" in md and "1 of 4: ES" in md
    assert out["png"].stat().st_size > 0
    saved = json.loads(out["json"].read_text())
    assert saved["edited_neurons"] == 10240 and saved["points"][1]["targets"]["PS"] is False
    with pytest.raises(SystemExit, match="zsre run"):
        cap.main(["--model", str(REPO / "testbed" / "testbed-llama-scale2"), "--run",
                  f"z={_run(tmp_path / 'z', kind='zsre')}", "--out", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        cap.parse_run("no-separator")
