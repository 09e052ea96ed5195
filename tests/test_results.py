"""results/ renders every results table of README.md and docs/; the renderer on a tiny results folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ece_plugin.lab import results
from ece_plugin.lab.results import PROTOCOLS, ResultsError

REPO = Path(__file__).resolve().parent.parent


def test_readme_and_docs_tables_equal_what_the_results_render() -> None:
    stale = results.render_all(REPO, write=False)
    assert stale == [], f"out of date, run `python -m ece_plugin.lab.results`: {stale}"


def test_every_declared_table_is_in_a_document_and_states_its_protocol() -> None:
    texts = {doc: doc.read_text() for doc in results.documents(REPO)}
    tables = results.load_tables(REPO / "results")
    assert {"demo", "headline"} <= set(tables)
    readme = texts[REPO / "README.md"]
    assert "<!-- results:demo -->" in readme and "<!-- results:headline -->" in readme
    for name, table in tables.items():
        where = [doc for doc, text in texts.items() if f"<!-- results:{name} -->" in text]
        assert where, f"table {name!r} of results/{table.experiment}/ is in no document"
        rendered = results.render_table(REPO / "results", table, where[0])
        assert any(f"Protocol: {text}." in rendered for text in PROTOCOLS.values()), name


def test_every_hparams_field_has_a_description_and_the_reference_lists_exactly_the_fields() -> None:
    from ece_plugin.method.hparams import ECEHyperParams

    fields = [f.name for f in dataclasses.fields(ECEHyperParams)]  # read now: fields come and go
    assert [f for f in fields if f not in results.HPARAM_DOC] == []
    assert [k for k in results.HPARAM_DOC if k not in fields] == []  # no description of a removed field
    listed = [line.split("`")[1] for line in results.render_hparams().splitlines()[2:]]
    assert listed == fields


def test_a_field_without_description_stops_the_hparams_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = dict(results.HPARAM_DOC)
    del doc["neuron_threshold"]
    monkeypatch.setattr(results, "HPARAM_DOC", doc)
    with pytest.raises(ResultsError, match="neuron_threshold"):
        results.render_hparams()


# ----- the renderer on a tiny results folder ---------------------------------------------------------------

ROWS = "setting,method,efficacy,efficacy_sem,n_edits,key\npre,Pre-edited,0.8,0.2,0,\nb,ECE-AS,91.5,,2000,k1\na,MEMIT,60.8,1.1,2000,k2\n"


def _tiny(tmp_path: Path, **table: object) -> Path:
    """A repository with results/run/ (rows.csv, other.csv, fig.png) and README.md asking for table 'main'."""
    folder = tmp_path / "results" / "run"
    folder.mkdir(parents=True)
    (folder / "rows.csv").write_text(ROWS)
    (folder / "other.csv").write_text("key,seconds\nk1,55.7\nk2,243.2\n")
    (folder / "fig.png").write_bytes(b"png")
    spec = {"caption": "Tiny run.", "columns": [["Method", "{method}"], ["Edits", "{n_edits:,}"],
                                                ["Eff.", "{efficacy} ± {efficacy_sem}", "{efficacy}"]]}
    spec.update(table)
    meta = {"title": "tiny", "protocol": "after_all", "commands": ["ece-plugin lifelong"], "tables": {"main": spec}}
    (folder / "experiment.json").write_text(json.dumps(meta))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n\n<!-- results:main -->\nold\n<!-- /results:main -->\n\ntail\n")
    return tmp_path


def test_the_renderer_fills_the_markers_with_the_table_its_protocol_and_figure(tmp_path: Path) -> None:
    repo = _tiny(tmp_path, where={"setting": ["pre", "a", "b"]}, order={"setting": ["pre", "a", "b"]},
                 figure="fig.png", join={"experiment": "run", "file": "other.csv", "on": "key", "prefix": "o_"})
    spec = json.loads((repo / "results/run/experiment.json").read_text())
    spec["tables"]["main"]["columns"].append(["s/batch", "{o_seconds}", "-"])
    (repo / "results/run/experiment.json").write_text(json.dumps(spec))
    assert results.render_all(repo, write=False) == [repo / "README.md"]
    assert results.main(["--repo", str(repo), "--check"]) == 1
    assert results.main(["--repo", str(repo)]) == 0
    text = (repo / "README.md").read_text()
    assert f"Tiny run. Protocol: {PROTOCOLS['after_all']}. Data: [`results/run/`](results/run/)." in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table == ["| Method | Edits | Eff. | s/batch |",
                     "| Pre-edited | 0 | 0.8 ± 0.2 | - |",  # no join match: the literal fallback
                     "| MEMIT | 2,000 | 60.8 ± 1.1 | 243.2 |",  # ordered a before b
                     "| ECE-AS | 2,000 | 91.5 | 55.7 |"]  # no standard error: the next template
    assert "![Tiny run](results/run/fig.png)" in text and text.endswith("<!-- /results:main -->\n\ntail\n")
    assert results.main(["--repo", str(repo), "--check"]) == 0
    assert results.render_all(repo, write=False) == []


def test_a_table_may_state_another_protocol_than_its_experiment(tmp_path: Path) -> None:
    repo = _tiny(tmp_path, protocol="immediate")
    results.render_all(repo)
    assert f"Protocol: {PROTOCOLS['immediate']}." in (repo / "README.md").read_text()


@pytest.mark.parametrize(("change", "message"), [
    ({"protocol": "sometimes"}, "protocol 'sometimes'"),
    ({"columns": [["x", "{nope}"]]}, r"no column \['nope'\]"),
    ({"where": {"setting": ["none"]}}, "no rows selected"),
    ({"where": {"colour": ["red"]}}, "'colour'"),
    ({"figure": "missing.png"}, "missing.png"),
    ({"file": "absent.csv"}, "absent.csv"),
])
def test_bad_results_are_refused_naming_the_problem_before_anything_is_written(
        tmp_path: Path, change: dict[str, object], message: str) -> None:
    repo = _tiny(tmp_path, **change)
    before = (repo / "README.md").read_text()
    with pytest.raises(ResultsError, match=message):
        results.render_all(repo)
    assert results.main(["--repo", str(repo)]) == 2
    assert (repo / "README.md").read_text() == before


@pytest.mark.parametrize(("text", "message"), [
    ("<!-- results:nothing -->\n<!-- /results:nothing -->\n", "no table 'nothing'"),
    ("<!-- results:main -->\nno close\n", "without their"),
])
def test_bad_markers_are_refused_naming_the_document(tmp_path: Path, text: str, message: str) -> None:
    repo = _tiny(tmp_path)
    (repo / "docs" / "page.md").write_text(text)
    with pytest.raises(ResultsError, match=message):
        results.render_all(repo)


def test_a_table_name_declared_twice_is_refused(tmp_path: Path) -> None:
    repo = _tiny(tmp_path)
    twin = repo / "results" / "twin"
    twin.mkdir()
    (twin / "experiment.json").write_text((repo / "results/run/experiment.json").read_text())
    with pytest.raises(ResultsError, match="declared twice"):
        results.load_tables(repo / "results")


# ----- adding a lifelong run ---------------------------------------------------------------------------------

def _checkpoint(n: int, eff: float, immediate: bool) -> dict[str, object]:
    cell = {"mean": eff, "sem": 0.01}
    summary = {k: cell for k in ("efficacy", "generalization", "specificity", "score")}
    later = {k: {"mean": eff - 0.05, "sem": 0.01} for k in summary}  # the immediate protocol's, 5 points lower
    return {"n_edits": n, "edits": summary, "immediate": later if immediate else None, "first_batch": summary,
            "retention": {"retention_accuracy": 0.5}, "perplexity": {"wiki.test": {"perplexity": 250.0}},
            "fluency": 4.2, "seconds_per_batch": 3.0, "state_bytes": 2**20}


def _lifelong_run(tmp_path: Path) -> Path:
    """A run folder whose lifelong.csv is written by the lifelong study's own row writer."""
    from ece_plugin.lab.study.common import write_csv
    from ece_plugin.lab.study.lifelong import flat_row

    run = tmp_path / "run"
    run.mkdir()
    rows = [flat_row("Pre-edited", _checkpoint(0, 0.01, False), "counterfact")]
    rows += [flat_row("ECE-AS [neuron_threshold=1.0, clustering=False]", _checkpoint(n, e, True), "counterfact")
             for n, e in ((100, 0.95), (200, 0.9))]
    write_csv(run / "lifelong.csv", rows)
    return run


def _empty_experiment(tmp_path: Path) -> tuple[Path, Path]:
    """An experiment folder without rows (its experiment.json only) and a lifelong run to add to it."""
    folder = _tiny(tmp_path) / "results" / "run"
    (folder / "rows.csv").unlink()
    return folder, _lifelong_run(tmp_path)


def _write_columns(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    path.write_text(results._csv_text([columns] + [[r[c] for c in columns] for r in rows]))


def test_a_lifelong_run_is_added_in_percent_with_both_protocols_and_never_twice(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)
    assert results.add_lifelong(run, folder, {"setting": "sequential"}) == (5, 3)
    final = results.read_rows(folder / "rows.csv")
    assert [(r["method"], r["n_edits"], r["protocol"], r["efficacy"]) for r in final] == [
        ("Pre-edited", "0", "after_all", "1.0"), ("ECE-AS", "200", "after_all", "90.0"),
        ("ECE-AS", "200", "immediate", "85.0")]
    edited = final[1]
    assert (edited["neuron_threshold"], edited["clustering"], edited["setting"]) == ("1.0", "False", "sequential")
    assert [r["protocol_label"] for r in final[1:]] == ["scored after all", "scored immediately"]
    assert (edited["retention_accuracy"], edited["perplexity"], edited["state_mib"]) == ("50.0", "250.00", "1.00")
    assert edited["fluency"] == "420.0"  # n-gram entropy x 100, the unit of every table's Flu. column
    assert len(results.read_rows(folder / "checkpoints.csv")) == 5
    before = (folder / "rows.csv").read_text()
    with pytest.raises(ResultsError, match="--force"):
        results.add_lifelong(run, folder, {"setting": "sequential"})
    assert (folder / "rows.csv").read_text() == before
    results.add_lifelong(run, folder, {"setting": "sequential"}, force=True)
    assert (folder / "rows.csv").read_text() == before


def test_each_checkpoint_carries_its_edit_time_over_that_of_as_many_first_batches(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)
    label = "ECE-AS [neuron_threshold=1.0, clustering=False]"
    (run / "lifelong.json").write_text(json.dumps(
        {"config": {"batch_size": 50}, "methods": [{"method": label, "batch_seconds": [2.0, 3.0, 2.0, 5.0]}]}))
    results.add_lifelong(run, folder, {"setting": "sequential"})
    got = {(r["n_edits"], r["protocol"]): r["edit_time_vs_first"] for r in results.read_rows(folder / "checkpoints.csv")}
    assert got[("0", "after_all")] == ""  # the unedited model made no edit
    assert got[("100", "after_all")] == got[("100", "immediate")] == "1.25"  # (2 + 3) / (2 x 2)
    assert got[("200", "after_all")] == "1.50"  # (2 + 3 + 2 + 5) / (4 x 2)


def _timing_run(tmp_path: Path) -> Path:
    """A bench --timing run folder: ECE, its layer-replay-off variant, EasyEdit's MEMIT and one that could not run."""
    def method(name: str, seconds: float, ratio: float, steps: object) -> dict[str, object]:
        return {"method": name, "available": True, "median_seconds_per_batch": seconds,
                "seconds_per_batch_by_round": [[seconds], [seconds + 1.0, seconds + 3.0]], "ratio_to_ece": ratio,
                "quality": {"efficacy": 0.99, "generalization": 0.87, "specificity": 0.95, "score": 0.93},
                "peak_memory": {"process_max_rss_mib": 1901.4}, "z_steps": steps}
    z = {"z_steps_mean": 41.06, "z_steps_max": 50.0, "z_step_budget": 50.0, "z_converged": 0.93}
    none = {"z_steps_mean": None, "z_steps_max": None, "z_step_budget": None, "z_converged": None}
    report = {"z_steps_per_edit": 50, "methods": [
        method("ECE-AS", 40.0, 1.0, z), method("ECE-AS (layer replay off)", 70.0, 1.75, z),
        method("MEMIT", 360.0, 9.0, none),
        {"method": "AlphaEdit", "available": False, "median_seconds_per_batch": None, "reason": "no EasyEdit"}]}
    run = tmp_path / "bench"
    run.mkdir()
    (run / "timing.json").write_text(json.dumps({"config": {}, "report": report}))
    return run


def test_a_timing_run_is_added_with_its_ratios_and_z_steps_and_never_twice(tmp_path: Path) -> None:
    folder, _ = _empty_experiment(tmp_path)
    run = _timing_run(tmp_path)
    fields = {"run": "beside the sequential setting", "setting": "sequential", "label": "ECE, sequential setting"}
    assert results.add_timing(run, folder, fields) == 3  # the method that could not run has no row
    rows = {r["bench_key"]: r for r in results.read_rows(folder / "rows.csv")}
    assert sorted(rows) == ["MEMIT-50", "sequential-50", "sequential-50-layer-replay-off"]
    ece, memit = rows["sequential-50"], rows["MEMIT-50"]
    assert (ece["label"], ece["implementation"], ece["seconds_per_batch"], ece["times_ece"]) == (
        "ECE, sequential setting", "this project", "40.00", "1.00")
    assert ece["rounds"] == "40.00, 42.00"  # each round's mean over its batches
    assert (ece["z_steps_mean"], ece["z_steps_max"], ece["z_converged"], ece["efficacy"]) == ("41.1", "50", "93.0", "99.00")
    assert rows["sequential-50-layer-replay-off"]["variant"] == "layer replay off"
    assert (memit["label"], memit["implementation"], memit["times_ece"], memit["z_steps_mean"]) == (
        "MEMIT (EasyEdit main)", "EasyEdit main, BaseEditor", "9.00", "")  # EasyEdit leaves no z trace
    assert (memit["peak_rss_mib"], memit["z_steps"], memit["run"]) == ("1901", "50", "beside the sequential setting")
    before = (folder / "rows.csv").read_text()
    with pytest.raises(ResultsError, match="--force"):
        results.add_timing(run, folder, fields)
    assert (folder / "rows.csv").read_text() == before
    results.add_timing(run, folder, fields, force=True)
    assert (folder / "rows.csv").read_text() == before


def test_a_folder_that_is_not_a_timing_run_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)  # a lifelong run: no timing.json
    with pytest.raises(ResultsError, match="timing.json: not a bench --timing result"):
        results.add_timing(run, folder, {"setting": "s"})
    assert not (folder / "rows.csv").exists()
    assert results.main(["--repo", str(tmp_path), "--add-timing", str(run), "--experiment", "run"]) == 2
    with pytest.raises(SystemExit):
        results.main(["--repo", str(tmp_path), "--add-timing", str(run)])  # no --experiment


def test_a_run_without_batch_times_leaves_the_edit_time_ratio_empty(tmp_path: Path) -> None:
    assert results.edit_time_vs_first(_lifelong_run(tmp_path)) == {}
    (tmp_path / "run" / "lifelong.json").write_text(json.dumps({"config": {"batch_size": 50},
                                                                "methods": [{"method": "M", "batch_seconds": []}]}))
    assert results.edit_time_vs_first(tmp_path / "run") == {}


def test_runs_of_one_sequence_share_their_pre_edit_row(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)
    results.add_lifelong(run, folder, {"setting": "a", "label": "A"})
    results.add_lifelong(run, folder, {"setting": "b", "label": "B"})  # the same unedited model: no clash
    final = results.read_rows(folder / "rows.csv")
    assert [(r["setting"], r["label"], r["method"]) for r in final if r["protocol"] == "after_all"] == [
        ("pre-edit", "Pre-edited", "Pre-edited"), ("a", "A", "ECE-AS"), ("b", "B", "ECE-AS")]
    flat = (run / "lifelong.csv").read_text().replace("0.01,", "0.02,", 1)  # another unedited model's score
    (run / "lifelong.csv").write_text(flat)
    with pytest.raises(ResultsError, match="--force"):
        results.add_lifelong(run, folder, {"setting": "c", "label": "C"})


def test_a_pre_edit_row_held_with_fewer_columns_is_still_shared(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)
    results.add_lifelong(run, folder, {"setting": "a", "label": "A"})
    for name in ("rows.csv", "checkpoints.csv"):  # an older experiment's file, written before some columns existed
        rows = results.read_rows(folder / name)
        kept = [c for c in rows[0] if c not in ("protocol_label", "edit_time_vs_first")]
        _write_columns(folder / name, kept, rows)
    results.add_lifelong(run, folder, {"setting": "b", "label": "B"})
    final = results.read_rows(folder / "rows.csv")
    assert [r["method"] for r in final if r["protocol"] == "after_all"] == ["Pre-edited", "ECE-AS", "ECE-AS"]
    assert final[0]["protocol_label"] == ""  # the held row gained the column, empty
    results.add_lifelong(run, folder, {"setting": "c", "label": "C"})  # and is still the one pre-edit row
    final = results.read_rows(folder / "rows.csv")
    assert [r["method"] for r in final if r["protocol"] == "after_all"] == ["Pre-edited"] + ["ECE-AS"] * 3


def test_adding_is_all_or_nothing_over_the_two_files(tmp_path: Path) -> None:
    folder, run = _empty_experiment(tmp_path)
    results.add_lifelong(run, folder, {"setting": "a", "label": "A"})
    rows = results.read_rows(folder / "checkpoints.csv")  # take the run's checkpoints out, keep its final rows
    _write_columns(folder / "checkpoints.csv", list(rows[0]), [r for r in rows if r["method"] == "Pre-edited"])
    before = {name: (folder / name).read_text() for name in ("rows.csv", "checkpoints.csv")}
    with pytest.raises(ResultsError, match="rows.csv: already holds"):
        results.add_lifelong(run, folder, {"setting": "a", "label": "A"})  # checkpoints.csv alone would take it
    assert {name: (folder / name).read_text() for name in before} == before


def test_a_wide_table_puts_the_two_protocols_of_a_run_side_by_side(tmp_path: Path) -> None:
    repo = _tiny(tmp_path)
    folder = repo / "results" / "run"
    (folder / "rows.csv").unlink()
    results.add_lifelong(_lifelong_run(tmp_path), folder, {"setting": "sequential"})
    spec = json.loads((folder / "experiment.json").read_text())
    spec["tables"]["main"] = {"wide": {"by": "protocol", "key": ["method"]}, "order": {"method": ["Pre-edited"]},
                              "columns": [["Method", "{method}"], ["Eff. after all", "{efficacy}"],
                                          ["Eff. immediate", "{immediate_efficacy}", "-"]]}
    (folder / "experiment.json").write_text(json.dumps(spec))
    results.render_all(repo)
    table = [line for line in (repo / "README.md").read_text().splitlines() if line.startswith("| ")]
    assert table == ["| Method | Eff. after all | Eff. immediate |",
                     "| Pre-edited | 1.0 | - |",  # no immediate row: the literal fallback
                     "| ECE-AS | 90.0 | 85.0 |"]
    spec["tables"]["main"]["wide"]["key"] = ["colour"]
    (folder / "experiment.json").write_text(json.dumps(spec))
    with pytest.raises(ResultsError, match="'wide' names column 'colour'"):
        results.render_all(repo)


def test_a_table_may_include_rows_of_another_experiment(tmp_path: Path) -> None:
    repo = _tiny(tmp_path, file=None, include=[{"experiment": "other", "where": {"method": ["MEMIT"]}},
                                              {"experiment": "run", "where": {"setting": ["b"]}}])
    other = repo / "results" / "other"
    other.mkdir()
    (other / "rows.csv").write_text("method,n_edits,efficacy,colour\nMEMIT,100,50.0,red\nROME,100,1.0,blue\n")
    (other / "experiment.json").write_text(json.dumps({"title": "o", "protocol": "after_all", "commands": [],
                                                       "tables": {}}))
    results.render_all(repo)
    table = [line for line in (repo / "README.md").read_text().splitlines() if line.startswith("| ")]
    assert table == ["| Method | Edits | Eff. |", "| MEMIT | 100 | 50.0 |", "| ECE-AS | 2,000 | 91.5 |"]
    spec = json.loads((repo / "results/run/experiment.json").read_text())
    spec["tables"]["main"]["include"] = [{"experiment": "missing"}]
    (repo / "results/run/experiment.json").write_text(json.dumps(spec))
    with pytest.raises(ResultsError, match="no such data file"):
        results.render_all(repo)


def test_adding_needs_a_lifelong_csv_and_an_experiment(tmp_path: Path) -> None:
    repo = _tiny(tmp_path)
    with pytest.raises(ResultsError, match="no such data file"):
        results.add_lifelong(tmp_path / "nowhere", repo / "results" / "run", {})
    with pytest.raises(ResultsError, match="no experiment.json"):
        results.add_lifelong(_lifelong_run(tmp_path), repo / "results" / "new", {})
    with pytest.raises(ResultsError, match="key=value"):
        results.method_and_overrides("ECE-AS [oops]")


# ----- the data agree with themselves ------------------------------------------------------------------------

LONG_FORM = [("lifelong-2000", "2000"), ("zsre-500", "500")]


@pytest.mark.parametrize(("experiment", "last"), LONG_FORM)
def test_the_last_checkpoint_of_a_curve_is_the_final_row(experiment: str, last: str) -> None:
    folder = REPO / "results" / experiment
    final = {(r["setting"], r["method"]): r for r in results.read_rows(folder / "rows.csv")}
    checked = 0
    for point in results.read_rows(folder / "checkpoints.csv"):
        if point["n_edits"] == last and point["metric"] in ("efficacy", "generalization", "specificity"):
            assert float(final[point["setting"], point["method"]][point["metric"]]) == float(point["value"]), point
            checked += 1
    assert checked >= 8


def test_the_capacity_checkpoints_agree_with_each_runs_final_table() -> None:
    folder = REPO / "results" / "capacity"
    final = {(r["setting"], r["sequence"].replace(",", ""), r["n_edits"]): r
             for r in results.read_rows(folder / "runs.csv") if r["method"] != "Pre-edited" and r["dataset"] == "counterfact"}
    points = [p for p in results.read_rows(folder / "checkpoints.csv")
              if (p["setting"], p["sequence"].replace(",", ""), p["n_edits"]) in final]
    assert len(points) >= 6
    for p in points:
        row = final[p["setting"], p["sequence"].replace(",", ""), p["n_edits"]]
        assert [row[k] for k in ("efficacy", "generalization", "specificity")] == \
            [p[k] for k in ("efficacy", "generalization", "specificity")], p


# ----- figures drawn from the data ------------------------------------------------------------------------------

CHECKPOINTS = """setting,label,method,n_edits,protocol,efficacy,perplexity
pre,Pre-edited,Pre-edited,0,after_all,0.8,243.0
ece,"ECE, recommended",ECE-AS,500,after_all,98.0,260.0
ece,"ECE, recommended",ECE-AS,500,immediate,99.0,260.0
ece,"ECE, recommended",ECE-AS,1000,after_all,95.0,290.0
ece,"ECE, recommended",ECE-AS,1000,immediate,97.5,290.0
memit,MEMIT,MEMIT,500,after_all,90.0,400.0
memit,MEMIT,MEMIT,500,immediate,93.0,400.0
"""


def _with_figure(tmp_path: Path, **change: object) -> Path:
    repo = _tiny(tmp_path)
    folder = repo / "results" / "run"
    (folder / "checkpoints.csv").write_text(CHECKPOINTS)
    meta = json.loads((folder / "experiment.json").read_text())
    figure = {"file": "checkpoints.csv", "series": "{label}", "reference": {"setting": ["pre"]},
              "panels": [["efficacy", "ES (%)"], ["perplexity", "PPL", "log"]], "title": "Tiny curves"}
    figure.update(change)
    meta["figures"] = {"curves.png": figure}
    meta["tables"]["main"]["figure"] = "curves.png"
    (folder / "experiment.json").write_text(json.dumps(meta))
    return repo


def test_a_figure_is_drawn_from_the_checkpoints_and_its_data_file_says_what_it_shows(tmp_path: Path) -> None:
    repo = _with_figure(tmp_path)
    png, data_file = repo / "results/run/curves.png", repo / "results/run/curves.data.json"
    assert results.main(["--repo", str(repo), "--check"]) == 1 and not png.exists()  # a check writes nothing
    assert results.main(["--repo", str(repo)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Tiny run](results/run/curves.png)" in (repo / "README.md").read_text()
    data = json.loads(data_file.read_text())
    assert data["reference"] == {"efficacy": 0.8, "perplexity": 243.0}  # the unedited model: a line, not a series
    ece, memit = data["series"]
    assert ece["label"] == "ECE, recommended" and memit["label"] == "MEMIT"
    assert ece["protocols"]["after_all"]["efficacy"] == [[500.0, 98.0], [1000.0, 95.0]]
    assert ece["protocols"]["immediate"]["efficacy"] == [[500.0, 99.0], [1000.0, 97.5]]
    # perplexity does not depend on the protocol: drawn once
    assert ece["protocols"]["after_all"]["perplexity"] == [[500.0, 260.0], [1000.0, 290.0]]
    assert "perplexity" not in ece["protocols"]["immediate"]
    assert results.main(["--repo", str(repo), "--check"]) == 0
    drawn = png.stat().st_mtime_ns
    assert results.render_all(repo) == [] and png.stat().st_mtime_ns == drawn  # up to date: not redrawn


def test_a_figure_whose_data_changed_is_out_of_date_until_redrawn(tmp_path: Path) -> None:
    repo = _with_figure(tmp_path)
    results.render_all(repo)
    csv_path = repo / "results/run/checkpoints.csv"
    csv_path.write_text(csv_path.read_text().replace("95.0", "94.0"))
    assert results.render_all(repo, write=False) == [repo / "results/run/curves.png"]
    assert results.main(["--repo", str(repo), "--check"]) == 1
    results.render_all(repo)
    assert [[1000.0, 94.0]] == [p for p in json.loads((repo / "results/run/curves.data.json").read_text())
                                ["series"][0]["protocols"]["after_all"]["efficacy"] if p[0] == 1000.0]


@pytest.mark.parametrize(("change", "message"), [
    ({"panels": [["colour", "Colour"]]}, "no column 'colour'"),
    ({"series": "{nope}"}, r"no column \['nope'\]"),
    ({"where": {"setting": ["none"]}}, "no rows selected"),
    ({"file": "absent.csv"}, "absent.csv"),
])
def test_a_bad_figure_is_refused_naming_the_problem_before_anything_is_written(
        tmp_path: Path, change: dict[str, object], message: str) -> None:
    repo = _with_figure(tmp_path, **change)
    before = (repo / "README.md").read_text()
    with pytest.raises(ResultsError, match=message):
        results.render_all(repo)
    assert (repo / "README.md").read_text() == before and not (repo / "results/run/curves.png").exists()


def test_every_declared_figure_of_the_results_is_drawn_from_its_data() -> None:
    figures = results.load_figures(REPO / "results")
    assert {"curves-counterfact.png", "curves-zsre.png"} <= {f.name for f in figures}
    assert results.stale_figures(REPO / "results") == []
