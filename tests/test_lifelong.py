"""``ece-plugin lifelong`` end to end on the bundled testbed (tiny budget), resume after an interrupt, and the
general-ability measures it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import interrupt_second_batch

from ece_plugin.evaluation import general
from ece_plugin.lab import cli
from ece_plugin.lab.study.baselines import ECEMethod
from ece_plugin.lab.study.common import StudyError
from ece_plugin.lab.study.lifelong import LifelongConfig

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "testbed-llama"
ZSRE = REPO / "data" / "zsre" / "zsre_mend_eval.json"

pytestmark = pytest.mark.skipif(not (TESTBED / "config.json").is_file(), reason="bundled testbed missing")


def _run(out: Path, *extra: str) -> int:
    return cli.main([
        "--log-level", "WARNING", "lifelong", "--model", str(TESTBED), "--device", "cpu", "--n-edits", "4",
        "--batch-size", "2", "--checkpoint-every", "2", "--methods", "ECE-AS", "--n-retention", "4",
        "--ppl-tokens", "256", "--n-fluency-prompts", "2", "--out", str(out), *extra,
    ])


def _rows(out: Path) -> list[dict[str, Any]]:
    data = json.loads((out / "lifelong.json").read_text())
    rows = [row for m in data["methods"] for row in m["rows"]]
    for row in rows:
        row.pop("seconds_per_batch")
    return rows


def test_lifelong_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole"
    assert _run(whole, "--keep-checkpoints") == 0
    data = json.loads((whole / "lifelong.json").read_text())
    assert data["protocol"] == "after_all" and data["kind"] == "counterfact"
    rows = data["methods"][0]["rows"]
    assert [r["n_edits"] for r in rows] == [2, 4]
    assert data["pre_edit"]["edits"]["efficacy"]["mean"] < 0.5  # the testbed knows its facts
    assert rows[-1]["edits"]["efficacy"]["mean"] > data["pre_edit"]["edits"]["efficacy"]["mean"]
    assert rows[-1]["retention"]["n"] == 4 and 0.0 <= rows[-1]["retention"]["retention_accuracy"] <= 1.0
    assert all(math.isfinite(p["perplexity"]) for p in rows[-1]["perplexity"].values())
    assert rows[-1]["state_bytes"] > 0
    growth = [r["weight_growth"] for r in rows]
    assert set(growth[-1]) == {"model.layers.0.mlp.down_proj.weight"}  # the testbed hparams' edited weight
    assert all(0.0 < g < 1.0 for g in growth[-1].values())
    assert "weight_growth_max" in (whole / "lifelong.csv").read_text().splitlines()[0]
    csv_lines = (whole / "lifelong.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 1 + 2  # header, pre-edit, two checkpoints
    assert "| ECE-AS | 4 |" in (whole / "lifelong.md").read_text()
    # both protocols: immediate (each batch right after its own edit) beside after all, in JSON, CSV and table
    assert data["protocols"] == {"after_all": "edits", "immediate": "immediate"}
    first, last = rows
    assert first["immediate"] == first["edits"]  # one batch edited: the same model scores the same records
    assert last["immediate"]["efficacy"]["n"] == 4 and last["edits"]["efficacy"]["n"] == 4
    header = csv_lines[0].split(",")
    assert {"immediate_efficacy", "immediate_efficacy_sem", "immediate_score"} <= set(header)
    assert "weight_growth_model.layers.0.mlp.down_proj" in header  # every edited weight's growth, plotted too
    assert (whole / "lifelong_weight_growth_layers.png").stat().st_size > 0
    table = (whole / "lifelong.md").read_text()
    assert "| ECE-AS | 4 | after all |" in table and "| ECE-AS | 4 | immediate |" in table
    assert (whole / "lifelong.png").stat().st_size > 0 and (whole / "lifelong_efficacy.png").is_file()
    # per-batch diagnostics of ECE's traces: first batch writes nothing that was written before
    diagnostics = data["methods"][0]["diagnostics"]
    assert len(diagnostics) == 2 and all(d["n_edits"] == 2 for d in diagnostics)
    assert diagnostics[0]["overlap"] == 0.0 and 0.0 <= diagnostics[1]["overlap"] <= 1.0
    assert all(d["z_reached"] in (0.0, 0.5, 1.0) and 0.0 <= d["z_clamped"] <= 1.0 for d in diagnostics)
    assert all(d["update_norm"] > 0 and d["layers"][0]["batch_set_size"] > 0 for d in diagnostics)
    assert len((whole / "lifelong_diagnostics.csv").read_text().splitlines()) == 1 + 2
    assert (whole / "lifelong_diagnostics.png").stat().st_size > 0

    # The same run interrupted in its second batch (after the first checkpoint), then resumed.
    cut = tmp_path / "cut"
    original = interrupt_second_batch(monkeypatch, ECEMethod)
    assert _run(cut, "--keep-checkpoints") == 130
    progress = json.loads(next((cut / "checkpoints").glob("*.progress.json")).read_text())
    assert progress["n_done"] == 2
    monkeypatch.setattr(ECEMethod, "edit_batch", original)
    assert cli.main(["--log-level", "WARNING", "lifelong", "--resume", str(cut)]) == 0
    assert _rows(cut) == _rows(whole)
    resumed = json.loads((cut / "lifelong.json").read_text())["methods"][0]["diagnostics"]
    assert resumed == diagnostics  # the overlap of batch 2 needs batch 1's neurons, kept in the progress file
    from safetensors.torch import load_file

    a = load_file(str(next((whole / "checkpoints").glob("*/weights.safetensors"))))
    b = load_file(str(next((cut / "checkpoints").glob("*/weights.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lifelong_zsre(tmp_path: Path) -> None:
    out = tmp_path / "zsre"
    assert _run(out, "--data", str(ZSRE), "--kind", "zsre") == 0
    data = json.loads((out / "lifelong.json").read_text())
    assert data["kind"] == "zsre"
    last = data["methods"][0]["rows"][-1]["edits"]
    assert set(last) >= {"efficacy", "generalization", "specificity"}
    assert "zsRE: 4 sequential edits" in (out / "lifelong.md").read_text()


def test_lifelong_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path / "a", "--checkpoint-every", "3") == 1
    assert "must be a multiple of --batch-size" in capsys.readouterr().err
    assert cli.main(["lifelong", "--resume", str(tmp_path)]) == 1
    assert "not a lifelong run folder" in capsys.readouterr().err
    with pytest.raises(StudyError, match="multiple"):
        LifelongConfig(n_edits=10, batch_size=4, checkpoint_every=6).validate()
    assert LifelongConfig(n_edits=10, batch_size=2, checkpoint_every=4).checkpoints() == [4, 8, 10]


def test_retention_overlap_is_checked_within_one_data_set() -> None:
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.lab.study.lifelong import Probes

    config = LifelongConfig(n_edits=4, batch_size=2, checkpoint_every=2)
    counterfact = load_records(REPO / "data" / "counterfact" / "counterfact-edit.json", limit=6)
    zsre = load_records(ZSRE, limit=6)
    assert {r.case_id for r in zsre} & {r.case_id for r in counterfact[:4]}  # the same numbers, other facts
    Probes(records=counterfact, retention_records=zsre, texts={}).prepare(None, config)
    with pytest.raises(StudyError, match=r"must never be edited; case_ids \[.*\] are in the edits"):
        Probes(records=counterfact, retention_records=counterfact[3:], texts={}).prepare(None, config)


def test_batch_diagnostics_from_a_trace() -> None:
    from ece_plugin.lab.study.diagnostics import batch_diagnostics, flat_diagnostics

    def trace(batch_set: list[int], reached: list[bool], delta: list[float]) -> dict[str, Any]:
        layer = {"layer": 2, "module": "m.2", "batch_set": batch_set, "edit_set_sizes": [2, 4],
                 "residual_norm": 3.0, "update_norm": 1.5}
        z = {"reached_target": reached, "delta_norm": delta, "h_norm": [2.0, 2.0], "final_loss": [0.1, 0.3]}
        return {"n_edits": 2, "z": z, "layers": [layer]}

    written: dict[str, set[int]] = {}
    first = batch_diagnostics(trace([1, 2, 3, 4], [True, False], [8.0, 1.0]), written, 4.0)
    assert first["z_reached"] == 0.5 and first["z_clamped"] == 0.5  # 8 / 2 = the clamp 4
    assert first["z_delta_ratio"] == pytest.approx(2.25) and first["z_final_loss"] == pytest.approx(0.2)
    assert first["overlap"] == 0.0 and first["layers"][0]["edit_set_size"] == 3.0
    second = batch_diagnostics(trace([3, 4, 5, 6, 7], [True, True], [1.0, 1.0]), written, 4.0)
    assert second["overlap"] == pytest.approx(2 / 5) and written == {"m.2": {1, 2, 3, 4, 5, 6, 7}}
    rows = flat_diagnostics("ECE-AS", [first, second])
    assert [r["edits_done"] for r in rows] == [2, 4] and rows[1]["layer2_overlap"] == pytest.approx(0.4)
    assert batch_diagnostics(trace([1], [True, True], [1.0, 1.0]), {}, None)["z_clamped"] is None


def test_weight_growth_is_the_relative_frobenius_distance_from_the_unedited_weight() -> None:
    from ece_plugin.lab.study.diagnostics import weight_growth

    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))  # ||W0|| = 5
    pristine = {"weight": layer.weight.detach().clone()}
    assert weight_growth(layer, pristine) == {"weight": 0.0}
    with torch.no_grad():
        layer.weight[0, 2] += 2.0
        layer.weight[1, 0] -= 1.0  # ||W - W0|| = sqrt(5)
    assert weight_growth(layer, pristine)["weight"] == pytest.approx(5**0.5 / 5)


def test_perplexity_matches_a_direct_computation() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TESTBED)
    model = AutoModelForCausalLM.from_pretrained(TESTBED, torch_dtype=torch.float32).eval()
    text = (REPO / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    windows = general.text_windows(tok, text, window=32, max_tokens=200)
    assert sum(len(w) - 1 for w in windows) == 200  # BOS + 32 tokens per window, 200 tokens in all
    assert all(w[0] == tok.bos_token_id for w in windows)
    got = general.perplexity(model, windows, pad=tok.pad_token_id, batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids).logits[0, :-1]
            nll -= float(torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).sum())
            n += len(w) - 1
    assert got["n_tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_retention_of_known_facts_before_editing() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ece_plugin.evaluation.data import load_records

    tok = AutoTokenizer.from_pretrained(TESTBED)
    model = AutoModelForCausalLM.from_pretrained(TESTBED, torch_dtype=torch.float32).eval()
    records = load_records(REPO / "data" / "counterfact" / "counterfact-edit.json", limit=20)
    result = general.retention(model, tok, general.retention_pairs(records))
    assert result["n"] == 20
    assert result["retention_preference"] == 1.0  # every trained fact beats its counterfactual
    assert result["retention_accuracy"] > 0.8


def _easyedit_main() -> bool:
    from ece_plugin import easyedit

    try:
        return easyedit.easyedit_version() == easyedit.EASYEDIT_MAIN
    except Exception:  # noqa: BLE001 - any failure to import easyeditor: not main
        return False


@pytest.mark.easyeditor
@pytest.mark.skipif(not _easyedit_main(), reason="needs EasyEdit main (BaseEditor on a CPU); `make test` runs it in .venv-main")
@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit"])
def test_lifelong_easyedit_baseline_resumes_exactly(alg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EasyEdit's MEMIT / AlphaEdit through BaseEditor: a run interrupted after its first checkpoint and resumed
    gives the rows and weights of the uninterrupted run (context templates and AlphaEdit's cache_c restored)."""
    from ece_plugin.lab.study.baselines import EasyEditMethod

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(whole, "--keep-checkpoints", "--methods", alg) == 0
    original = interrupt_second_batch(monkeypatch, EasyEditMethod)
    assert _run(cut, "--keep-checkpoints", "--methods", alg) == 130
    monkeypatch.setattr(EasyEditMethod, "edit_batch", original)
    assert cli.main(["--log-level", "WARNING", "lifelong", "--resume", str(cut)]) == 0
    assert _rows(cut) == _rows(whole)
    assert json.loads((whole / "lifelong.json").read_text())["methods"][0]["diagnostics"] == []  # no trace
    assert json.loads((cut / "lifelong.json").read_text())["methods"][0]["available"]


def test_ece_set_overrides_the_hparams_names_the_method_and_is_kept_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pk"
    assert _run(out, "--ece-set", "prompt_keys_weight=1", "--ece-set", "v_num_grad_steps=3",
                "--ece-set", "clustering=false") == 0
    data = json.loads((out / "lifelong.json").read_text())
    name = "ECE-AS [prompt_keys_weight=1, v_num_grad_steps=3, clustering=False]"
    assert [m["method"] for m in data["methods"]] == [name]
    assert f"| {name} | 4 |" in (out / "lifelong.md").read_text()
    stored = json.loads((out / "lifelong_config.json").read_text())
    assert stored["ece_set"] == ["prompt_keys_weight=1", "v_num_grad_steps=3", "clustering=false"]  # for --resume
    # the overrides reached the edits: every batch's z had a budget of 3 per-edit steps
    assert [d["z_step_budget"] for d in data["methods"][0]["diagnostics"]] == [3.0, 3.0]
    assert _run(tmp_path / "bad", "--ece-set", "no_such_key=1") == 1
    assert "--ece-set 'no_such_key=1': expected KEY=VALUE" in capsys.readouterr().err
    assert _run(tmp_path / "bad2", "--ece-set", "prompt_keys_weight=-2") == 1
    assert "prompt_keys_weight" in capsys.readouterr().err
