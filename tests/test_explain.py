"""Explanations: report from a trace (overlaps, clusters), heatmap files, and `explain` without editing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cli_world import make_world

from ece_plugin.lab.cli import main
from ece_plugin.lab.explain import (
    ExplainError,
    explanation_from_trace,
    jaccard,
    overlap_matrix,
    write_explanation,
)


def _trace() -> dict:
    return {
        "attribution": "AS",
        "requests": [{"case_id": "a"}, {"case_id": "b"}, {"case_id": "c"}],
        "layers": [
            {"layer": 4, "edit_sets": [[1, 2, 3], [2, 3, 4], [9]], "edit_shares": [0.81, 0.85, 0.9],
             "batch_set": [1, 2, 3, 4, 9], "scores": {"top_neurons": [2]}},
        ],
        "clusters": {"labels": [0, 0, 1], "anchors": [1, 2]},
        "timings": {"z": 1.0},
    }


def test_report_from_trace(tmp_path: Path) -> None:
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert overlap_matrix([[1], [1], [2]]) == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    data = explanation_from_trace(_trace()).to_dict()
    layer = data["layers"][0]
    assert data["edits"] == ["a", "b", "c"]
    assert [e["n_neurons"] for e in layer["per_edit"]] == [3, 3, 1]
    assert layer["jaccard"][0][1] == pytest.approx(0.5) and layer["jaccard"][0][2] == 0.0
    assert layer["mean_pairwise_jaccard"] == pytest.approx(0.5 / 3)
    assert layer["most_shared_neurons"][0] == {"neuron": 2, "n_edits": 2}
    assert data["clusters"] == [
        {"cluster": 0, "anchor": 1, "anchor_edit": "b", "members": [0, 1]},
        {"cluster": 1, "anchor": 2, "anchor_edit": "c", "members": [2]},
    ]
    files = write_explanation(explanation_from_trace(_trace()), tmp_path)
    assert json.loads(files["json"].read_text())["n_edits"] == 3
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ExplainError, match="per-layer"):
        explanation_from_trace({"clusters": {}})


def test_explain_command_does_not_edit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path / "w")
    before = load_file(world.model_dir / "model.safetensors")
    rc = main(["--log-level", "WARNING", "explain", "--model", str(world.model_dir), "--hparams", str(world.hparams),
               "--data", str(world.data), "--limit", "4", "--out", str(tmp_path / "ex"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert data["n_edits"] == 4 and [layer["layer"] for layer in data["layers"]] == [0, 1]
    assert data["edited"] is False
    for layer in data["layers"]:
        assert all(e["score_share"] >= 0.8 - 1e-9 for e in layer["per_edit"])
        assert layer["batch_neuron_count"] == len(layer["batch_neurons"]) > 0
    assert sum(len(c["members"]) for c in data["clusters"]) == 4
    assert (tmp_path / "ex" / "explain.png").is_file()
    assert "layer 0: 4 edits" in out
    after = load_file(world.model_dir / "model.safetensors")
    assert all((before[k] == after[k]).all() for k in before)
