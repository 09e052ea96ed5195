"""``ece-plugin`` commands on a tiny world: files written, numbers consistent, exact apply/revert, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_world import World, make_world

from ece_plugin.lab.cli import build_parser, main

COMMANDS = ["demo", "edit", "apply", "revert", "bench", "layer-sweep", "batch-study", "explain", "evaluate",
            "stats", "build-testbed", "stats-corpus"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage: ece-plugin " + command in capsys.readouterr().out


def test_edit_save_edits_apply_revert_round_trip(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edits = tmp_path / "edits.safetensors"
    rc, out, err = _run(
        capsys, "edit", "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data", str(world.data),
        "--limit", "4", "--batch-size", "2", "--save-edits", str(edits), "--save-model", str(tmp_path / "edited"),
        "--out", str(tmp_path / "run"), "--no-fluency", "--device", "cpu",
    )
    assert rc == 0, err
    assert "| ECE-AS" in out and "Pre-edited" in out
    result = json.loads((tmp_path / "run" / "edit.json").read_text())["run"]["result"]
    eff = result["summary"]["efficacy"]["mean"] * 100
    assert f"{eff:.2f}" in out.split("| ECE-AS")[1].split("\n")[0]  # the table shows the JSON's number
    assert len(result["seconds_per_batch"]) == 2
    rows = list(csv.DictReader((tmp_path / "run" / "edit.csv").open()))
    assert [r["method"] for r in rows] == ["Pre-edited", "ECE-AS"]

    original = load_file(world.model_dir / "model.safetensors")
    edited = load_file(tmp_path / "edited" / "model.safetensors")
    changed = sorted(k for k in original if not torch.equal(original[k], edited[k]))
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]

    rc, _, err = _run(capsys, "apply", "--model", str(world.model_dir), "--edits", str(edits), "--out", str(tmp_path / "applied"))
    assert rc == 0, err
    applied = load_file(tmp_path / "applied" / "model.safetensors")
    assert all(torch.equal(applied[k], edited[k]) for k in edited)
    rc, _, err = _run(capsys, "revert", "--model", str(tmp_path / "applied"), "--edits", str(edits), "--out", str(tmp_path / "reverted"))
    assert rc == 0, err
    reverted = load_file(tmp_path / "reverted" / "model.safetensors")
    assert all(torch.equal(reverted[k], original[k]) for k in original)

    # Refusals: reverting from the unedited model, applying twice.
    rc, _, err = _run(capsys, "revert", "--model", str(world.model_dir), "--edits", str(edits), "--out", str(tmp_path / "x"))
    error_lines = [line for line in err.splitlines() if line.startswith("ece-plugin")]
    assert rc == 1 and len(error_lines) == 1 and "EditFileError" in error_lines[0] and "edited values" in error_lines[0]
    rc, _, err = _run(capsys, "apply", "--model", str(tmp_path / "applied"), "--edits", str(edits), "--out", str(tmp_path / "y"))
    assert rc == 1 and "original values" in err
    assert not (tmp_path / "x").exists()

    # The edit file carries the sequential state (keys of the 4 edits) and the records.
    from ece_plugin.files.editfile import load_edit_file, state_from_edit_file

    edit = load_edit_file(edits)
    assert len(edit.records) == 4 and edit.hparams is not None and edit.hparams["layers"] == [0, 1]
    state = state_from_edit_file(edit)
    assert state is not None and state.n_edits == 4


def test_demo_writes_table_json_csv_and_plot(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo"
    rc, out, err = _run(
        capsys, "demo", "--model", str(world.model_dir), "--hparams-dir", str(world.root / "hparams"),
        "--data", str(world.data), "--limit", "4", "--batch-size", "2", "--methods", "ECE-AS", "MEMIT-equivalent",
        "ROME", "--out", str(out_dir), "--no-fluency", "--device", "cpu",
    )
    assert rc == 0, err
    for name in ("demo.json", "demo.csv", "demo.md", "demo.png"):
        assert (out_dir / name).is_file()
    data = json.loads((out_dir / "demo.json").read_text())
    runs = {r["method"]: r for r in data["comparisons"][0]["runs"]}
    assert set(runs) == {"ECE-AS", "MEMIT-equivalent (project code)", "ROME"}
    assert runs["ECE-AS"]["available"] and len(runs["ECE-AS"]["edit_seconds_per_batch"]) == 2
    table_lines = out.splitlines()
    assert table_lines.index(next(line for line in table_lines if line.startswith("| Pre-edited"))) < table_lines.index(
        next(line for line in table_lines if line.startswith("| ECE-AS"))
    )
    rome_line = next(line for line in table_lines if line.startswith("| ROME"))
    if not runs["ROME"]["available"]:
        assert "n/a:" in rome_line and runs["ROME"]["reason"].split(":")[0] in rome_line
    rows = list(csv.DictReader((out_dir / "demo.csv").open()))
    ece = next(r for r in rows if r["method"] == "ECE-AS")
    summary = runs["ECE-AS"]["result"]["summary"]
    assert float(ece["efficacy_mean"]) == pytest.approx(summary["efficacy"]["mean"])


def test_bad_input_gives_one_line_error(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(tmp_path / "none.yaml"),
                      "--data", str(world.data), "--save-edits", str(tmp_path / "e.safetensors"))
    assert rc == 1 and "not found" in err
    rc, _, err = _run(capsys, "edit", "--model", str(tmp_path), "--hparams", str(world.hparams),
                      "--data", str(world.data), "--save-edits", str(tmp_path / "e.safetensors"))
    assert rc == 1 and "no config.json" in err
    rc, _, err = _run(capsys, "demo", "--model", str(world.model_dir), "--hparams", str(world.hparams),
                      "--data", str(world.data), "--methods", "NOPE", "--out", str(tmp_path / "d"))
    assert rc == 1 and "unknown method 'NOPE'" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    rc, _, err = _run(capsys, "evaluate", "--model", str(world.model_dir), "--data", str(bad), "--out", str(tmp_path / "e"))
    assert rc == 1 and "bad.json" in err
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data", str(world.data),
                      "--no-eval")
    assert rc == 1 and "--save-model" in err
    rc, _, err = _run(capsys, "stats-corpus", "--model", str(world.model_dir))
    assert rc == 1 and "testbed_manifest.json" in err and not (world.model_dir / "factworld.txt").exists()


def test_evaluate_prints_pre_edit_rows(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "evaluate", "--model", str(world.model_dir), "--data", str(world.data), str(world.zsre),
                        "--limit", "4", "--out", str(tmp_path / "ev"), "--no-fluency", "--device", "cpu")
    assert rc == 0, err
    assert out.count("| Pre-edited") == 2
    cf = json.loads((tmp_path / "ev" / "pre-edit-records.json").read_text())
    assert cf["summary"]["efficacy"]["n"] == 4
    assert f"{cf['summary']['efficacy']['mean'] * 100:.2f}" in out.split("| Pre-edited")[1]
    assert (tmp_path / "ev" / "pre-edit-zsre.csv").is_file()


def test_layer_options_accept_layer_zero_and_counts_must_be_positive() -> None:
    parser = build_parser()
    assert parser.parse_args(["layer-sweep", "--layers", "0 2"]).layers == [0, 2]
    assert parser.parse_args(["stats", "--layers", "0"]).layers == [0]
    with pytest.raises(SystemExit):
        parser.parse_args(["layer-sweep", "--layers", "-1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--batch-sizes", "0"])
