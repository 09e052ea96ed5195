"""bench (--timing and tables), layer-sweep, batch-study and stats on a tiny world; EasyEdit baselines where
the installed EasyEdit can run on the CPU (EasyEdit main), otherwise the reason is checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli_world import World, make_world

from ece_plugin import easyedit
from ece_plugin.lab.cli import main

EASYEDIT_CPU, EASYEDIT_REASON = easyedit.can_run_on("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _common(world: World) -> list[str]:
    return ["--model", str(world.model_dir), "--hparams-dir", str(world.root / "hparams"), "--data", str(world.data),
            "--no-fluency", "--device", "cpu"]


def test_bench_timing(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "timing"
    rc, out, err = _run(capsys, "bench", "--timing", *_common(world), "--n-edits", "4", "--batch-sizes", "2",
                        "--out", str(out_dir))
    assert rc == 0, err
    data = json.loads((out_dir / "timing.json").read_text())["report"]
    methods = {m["method"]: m for m in data["methods"]}
    ece = methods["ECE-AS"]
    assert ece["ratio_to_ece"] == pytest.approx(1.0) and len(ece["seconds_per_batch"]) == 2
    assert data["repeats"] == 3 and len(ece["seconds_per_batch_by_round"]) == 3  # the default: 3 rounds
    round_means = sorted(sum(r) / len(r) for r in ece["seconds_per_batch_by_round"])
    assert ece["median_seconds_per_batch"] == pytest.approx(round_means[1])
    assert ece["quality"]["efficacy"] is not None and ece["peak_memory"]["process_max_rss_mib"] > 0
    assert {"z", "attribution", "clustering", "keys", "solve"} <= set(data["ece_stage_seconds"])
    assert data["z_steps_per_edit"] == 4
    steps = ece["z_steps"]  # the steps ECE's edits took, from its traces (round 1)
    assert 1 <= steps["z_steps_mean"] <= steps["z_steps_max"] <= steps["z_step_budget"] == 4
    each = ece["z_steps_each"]  # every edit's own count, in edit order
    assert len(each) == 4 and all(1 <= s <= 4 for s in each)
    assert sum(each) / len(each) == pytest.approx(steps["z_steps_mean"]) and max(each) == steps["z_steps_max"]
    assert 0.0 <= steps["z_converged"] <= 1.0
    if steps["z_converged"] == 0.0:  # none left early: every edit took the whole budget
        assert steps["z_steps_mean"] == 4
    assert "z steps mean / max" in out and "z conv. %" in out
    full_depth = methods["ECE-AS (layer replay off)"]  # exact: the same edit, every layer run in every z step
    assert full_depth["available"] and full_depth["ratio_to_ece"] > 0
    for key in ("efficacy", "generalization", "specificity"):
        assert full_depth["quality"][key] == pytest.approx(ece["quality"][key])
    if EASYEDIT_CPU:
        assert methods["MEMIT"]["available"] and methods["AlphaEdit"]["available"]
        assert methods["MEMIT"]["ratio_to_ece"] > 0
        assert methods["MEMIT"]["z_steps_each"] == []  # EasyEdit leaves no trace of its steps
    else:
        stand_in = methods["MEMIT-equivalent (project code)"]
        assert stand_in["available"] and stand_in["ratio_to_ece"] > 0
        assert any("cannot run" in n for n in data["notes"])
        assert "MEMIT-equivalent (project code)" in out
    for name in ("timing.csv", "timing.md", "timing.png"):
        assert (out_dir / name).is_file()
    assert "ECE time by stage" in out
    assert any(n.startswith("warm-up, not timed: ECE on a copy of the model, 4 records") for n in data["notes"])


def test_bench_timing_warm_up_and_extra_rounds_leave_the_model_alone(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.lab.study.bench import warm_up
    from ece_plugin.lab.study.common import load_model_and_tokenizer
    from ece_plugin.method.hparams import ECEHyperParams
    from ece_plugin.method.state import get_session

    model, tok = load_model_and_tokenizer(str(world.model_dir), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = ECEHyperParams.from_hparams(next((world.root / "hparams" / "ECE").glob("*.yaml")))
    assert warm_up(model, tok, load_records(str(world.data), limit=2), hp) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert get_session(model).state.n_edits == 0 and not get_session(model).state.has_pending
    rc, out, err = _run(capsys, "bench", "--timing", *_common(world), "--n-edits", "2", "--batch-sizes", "2",
                        "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "t0"))
    assert rc == 0, err
    data = json.loads((tmp_path / "t0" / "timing.json").read_text())["report"]
    assert not any(n.startswith("warm-up") for n in data["notes"])
    assert all(len(m["seconds_per_batch_by_round"]) == 1 for m in data["methods"] if m["available"])
    assert "median of 1 rounds" in out
    rc, out, err = _run(capsys, "bench", "--timing", *_common(world), "--n-edits", "2", "--repeats", "0")
    assert rc == 2 and "--repeats: expected a positive integer, got '0'" in err  # refused where parsed
    from ece_plugin.lab.study.baselines import ECEMethod
    from ece_plugin.lab.study.runner import time_method

    seconds = time_method(ECEMethod(hp), model, tok, load_records(str(world.data), limit=3), batch_size=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)  # batches of 2 and 1, edit-only
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert get_session(model).state.n_edits == 0 and not get_session(model).state.has_pending
    rc, out, err = _run(capsys, "bench", "--timing", *_common(world), "--n-edits", "2", "--warmup", "-1")
    assert rc == 2 and "--warmup: expected an integer >= 0, got '-1'" in err


def test_bench_tables_over_settings(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bench"
    rc, out, err = _run(capsys, "bench", *_common(world), "--methods", "ECE-RS", "MEMIT-equivalent", "--n-edits", "2 4",
                        "--batch-sizes", "2", "--out", str(out_dir))
    assert rc == 0, err
    data = json.loads((out_dir / "bench.json").read_text())
    assert [(c["n_edits"], c["batch_size"]) for c in data["comparisons"]] == [(2, 2), (4, 2)]
    rows = list(csv.DictReader((out_dir / "bench.csv").open()))
    assert {(r["setting_n_edits"], r["method"]) for r in rows} >= {("2", "ECE-RS"), ("4", "MEMIT-equivalent (project code)")}
    assert (out_dir / "bench-n2-b2.png").is_file() and (out_dir / "bench-n4-b2.png").is_file()
    assert out.count("| Pre-edited") == 2
    assert "z steps per edit: ECE-RS mean" in out  # from ECE's traces; EasyEdit's baselines leave none


def test_layer_sweep_names_best_layer(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "sweep"
    methods = ["ECE", "ROME", "MEMIT"] if EASYEDIT_CPU else ["ECE", "MEMIT"]
    rc, out, err = _run(capsys, "layer-sweep", *_common(world), "--limit", "2", "--methods", *methods,
                        "--out", str(out_dir))
    assert rc == 0, err
    data = json.loads((out_dir / "layer_sweep.json").read_text())
    ece_rows = [r for r in data["rows"] if r["method"] == "ECE"]
    assert [r["layer"] for r in ece_rows] == [0, 1]
    assert data["best_layer"]["ECE"] == max(ece_rows, key=lambda r: (r["score"], r["layer"]))["layer"]
    assert f"Best layer for ECE (by score): {data['best_layer']['ECE']}" in out
    if EASYEDIT_CPU:
        assert {r["method"] for r in data["rows"]} == {"ECE", "ROME", "MEMIT"}
    else:
        assert "MEMIT" in data["unavailable"]
    assert (out_dir / "layer_sweep.png").is_file() and (out_dir / "layer_sweep.csv").is_file()


def test_batch_study_batch_and_sequential(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bs"
    rc, out, err = _run(capsys, "batch-study", *_common(world), "--methods", "ECE", "--batch-sizes", "1 2",
                        "--total", "2", "--out", str(out_dir))
    assert rc == 0, err
    data = json.loads((out_dir / "batch_study.json").read_text())
    got = {(r["setting"], r["batch_size"]): r for r in data["rows"]}
    assert set(got) == {("batch", 1), ("batch", 2), ("sequential", 1), ("sequential", 2)}
    assert got[("sequential", 1)]["n_batches"] == 2 and got[("batch", 1)]["n_edits"] == 1
    assert (out_dir / "batch_study.png").is_file()


def test_stats_command_writes_easyedit_layout(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "stats", "--model", str(world.model_dir), "--hparams", str(world.hparams),
                        "--out", str(tmp_path / "st"), "--device", "cpu")
    assert rc == 0, err
    files = sorted(p.name for p in (world.stats_dir / "tiny-llama" / "corpus_stats").glob("*.npz"))
    assert files == [f"model.layers.{i}.mlp.down_proj_float32_mom2_50.npz" for i in (0, 1)]
    assert json.loads((tmp_path / "st" / "stats.json").read_text())["stats_dir"] == str(world.stats_dir)


@pytest.mark.easyeditor
@pytest.mark.skipif(not EASYEDIT_CPU, reason=f"EasyEdit cannot run on the CPU here: {EASYEDIT_REASON}")
def test_demo_with_easyedit_baselines(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "demo"
    cwd = tmp_path / "cwd"  # an empty working directory of its own: what the demo leaves there is its own doing
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, out, err = _run(capsys, "demo", *_common(world), "--limit", "4", "--batch-size", "2", "--methods", "ECE-AS",
                        "ROME", "MEMIT", "AlphaEdit", "--out", str(out_dir))
    assert rc == 0, err
    runs = {r["method"]: r for r in json.loads((out_dir / "demo.json").read_text())["comparisons"][0]["runs"]}
    for name in ("ROME", "MEMIT", "AlphaEdit"):
        assert runs[name]["available"], runs[name]["reason"]
        assert runs[name]["result"]["summary"]["efficacy"]["n"] == 4
    # EasyEdit main's BaseEditor made the edits (sequential_edit=True), on the model the evaluation read
    assert runs["ROME"]["via"] == "BaseEditor.edit"
    assert runs["MEMIT"]["via"] == runs["AlphaEdit"]["via"] == "BaseEditor.batch_edit"
    assert runs["ECE-AS"]["via"] == "ece_plugin"
    assert "MEMIT via BaseEditor.batch_edit(sequential_edit=True)" in out
    assert all(s > 0 for name in ("ROME", "MEMIT") for s in runs[name]["edit_seconds_per_batch"])
    # AlphaEdit's projection went to a private file (EasyEdit itself would write ./null_space_project.pt); the only
    # thing in the working directory is what EasyEdit main's BaseEditor always writes: logs/run.log, results.json
    assert not list(cwd.rglob("null_space_project.pt"))
    assert {p.name for p in cwd.iterdir()} <= {"logs"}
    assert not (world.root / "hparams" / "P-absent.pt").exists()


def test_demo_record_limit_cuts_one_method_short_and_says_so(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--rome-limit` (here on an ECE variant, which runs everywhere): that method edits only the first records, in
    the same batches, and a line under the table says so."""
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.lab.study.bench import compare_methods
    from ece_plugin.lab.study.common import StudyError, load_model_and_tokenizer
    from ece_plugin.lab.study.methods import build_methods
    from ece_plugin.method.hparams import ECEHyperParams

    model, tok = load_model_and_tokenizer(str(world.model_dir), device="cpu")
    hp = ECEHyperParams.from_hparams(next((world.root / "hparams" / "ECE").glob("*.yaml")))
    records = load_records(str(world.data), limit=4)
    methods = build_methods(["ECE-AS", "ECE-RS"], hp, {})
    comparison = compare_methods(methods, model, tok, records, batch_size=2, eval_kwargs={"generation": False},
                                 record_limits={"ECE-RS": 2, "ECE-AS": 9})
    runs = {r.name: r for r in comparison.runs}
    assert runs["ECE-AS"].result.summary["efficacy"]["n"] == 4 and len(runs["ECE-AS"].batch_seconds) == 2
    assert runs["ECE-RS"].result.summary["efficacy"]["n"] == 2 and len(runs["ECE-RS"].batch_seconds) == 1
    assert "Fewer records: ECE-RS on the first 2 of the 4 records" in comparison.table
    assert "ECE-AS on the first" not in comparison.table  # a limit above the record count is no limit
    with pytest.raises(StudyError, match="record limits must be >= 1"):
        compare_methods(methods, model, tok, records, batch_size=2, record_limits={"ECE-RS": 0})


def test_method_bars_leave_out_methods_that_did_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ece_plugin.lab.study import plots

    drawn: dict[str, Any] = {}
    real_savefig = plots.savefig

    def spy(fig: Any, path: Path) -> Path:
        ax, ax_t = fig.axes
        drawn["bars"] = len(ax.patches)
        drawn["labels"] = [t.get_text() for t in ax_t.get_xticklabels()]
        drawn["texts"] = [t.get_text() for t in ax.texts]
        return real_savefig(fig, path)

    monkeypatch.setattr(plots, "savefig", spy)
    summary = {"efficacy": {"mean": 0.9, "sem": 0.01, "n": 10}, "specificity": {"mean": 0.8, "sem": 0.02, "n": 10}}
    rows = [("Pre-edited", summary, None), ("ECE-AS", summary, 1.5), ("MEMIT", None, None)]
    path = plots.plot_method_bars(rows, ["efficacy", "specificity"], tmp_path / "bars.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["bars"] == 4  # 2 methods x 2 metrics; no empty slot for MEMIT
    assert drawn["labels"] == ["ECE-AS"]  # only timed methods in the time panel
    assert drawn["texts"] == ["not run: MEMIT"]


def test_curve_grid_keeps_each_series_colour_in_every_panel_and_lists_every_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series missing from the first panels (e.g. weight growth recorded by one run only) keeps its own colour
    where it appears, and the shared legend names it."""
    pytest.importorskip("matplotlib")
    from ece_plugin.lab.study import common
    from ece_plugin.lab.study.diagnostics import plot_diagnostics

    figures: list[Any] = []
    monkeypatch.setattr(common, "savefig", lambda fig, path: figures.append(fig) or Path(path))
    trace = {"n_edits": 10, "z_reached": 0.5, "update_norm": 2.0, "layers": []}
    per_method = {
        "A": [dict(trace), dict(trace)],
        "B": [{**trace, "update_norm": None}, {**trace, "update_norm": None}],  # B has no update norm
        "C": [dict(trace), dict(trace)],
    }
    plot_diagnostics(per_method, tmp_path / "d.png", "t")
    (fig,) = figures
    colours: dict[str, set[str]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert colours == {"A": {"C0"}, "B": {"C1"}, "C": {"C2"}}  # C is C2 also in the panel without B
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["A", "B", "C"]
