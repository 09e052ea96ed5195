"""EasyEdit main's lifelong editors (ULTRAEDIT, SPHERE, EMMET, ...) as project methods: their testbed hparams files
load into EasyEdit's own classes, and each one edits the small bundled testbed through EasyEdit main's BaseEditor
for two sequential batches (the model changes, the second batch builds on the first, the targets get likelier)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ece_plugin import easyedit as ee

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "testbed-llama"
COUNTERFACT = REPO / "data" / "counterfact" / "counterfact-edit.json"
SCALE2 = "testbed-llama-scale2"
VERSION = ee.easyedit_version()
needs_main = pytest.mark.skipif(
    VERSION != ee.EASYEDIT_MAIN,
    reason=f"needs EasyEdit main (easyeditor here: {VERSION or 'none'}): these editors exist only there; "
    "`make test` runs this file in .venv-main",
)

#: What the small testbed (4 layers, MLP 1536, statistics of layer 0 bundled) needs instead of the scale testbed's
#: values: layer 0 only, its z read at the last layer, its bundled statistics corpus.
LOCATE_SMALL = {"model_name": "./testbed/testbed-llama", "layers": [0], "v_loss_layer": 3,
                "mom2_dataset": "wikitext-2-raw", "stats_dir": str(REPO / "data" / "stats")}
SMALL = {
    "EMMET": LOCATE_SMALL,
    "PMET": LOCATE_SMALL,
    "SPHERE": LOCATE_SMALL,
    "ULTRAEDIT": {"model_name": "./testbed/testbed-llama",
                  "inner_params": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]},
}
#: The lifelong editors wired into the method table and how BaseEditor runs each on EasyEdit main.
WIRED = {"ULTRAEDIT": "BaseEditor.batch_edit", "EMMET": "BaseEditor.batch_edit", "SPHERE": "BaseEditor.edit",
         "PMET": "BaseEditor.batch_edit"}


def _records(n: int) -> list[dict[str, Any]]:
    from ece_plugin.evaluation.data import load_records

    return [r.to_request() for r in load_records(COUNTERFACT, limit=n)]


def _target_logprob(model: torch.nn.Module, tok: Any, requests: list[dict[str, Any]]) -> float:
    """Mean over requests of log p(target_new | prompt), summed over the target's tokens."""
    total = 0.0
    for request in requests:
        prompt = tok(request["prompt"], return_tensors="pt").input_ids
        target = tok(" " + request["target_new"].strip(), add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([prompt, target], dim=1)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, prompt.shape[1] - 1 : -1].float(), dim=-1)
        total += float(logprobs.gather(1, target[0].unsqueeze(1)).sum())
    return total / len(requests)


@pytest.mark.parametrize("alg", sorted(ee.BASELINES))
def test_every_baseline_has_a_scale_testbed_hparams_file(alg: str) -> None:
    path = REPO / "hparams" / alg / f"{SCALE2}.yaml"
    assert path.is_file(), path


@pytest.mark.easyeditor
@needs_main
@pytest.mark.parametrize("alg", ["EMMET", "PMET", "SPHERE", "ULTRAEDIT", "WISE", "GRACE"])
def test_scale_testbed_hparams_build_easyedit_classes(alg: str) -> None:
    """Each file gives EasyEdit main's own hparams class; methods with layers edit the layers ECE edits."""
    hp = ee.baseline_hparams(alg, REPO / "hparams" / alg / f"{SCALE2}.yaml")
    assert type(hp).__name__ == ee.BASELINES[alg][0]
    names = ee.baseline_weight_names(alg, hp)
    if hasattr(hp, "layers"):
        assert hp.layers == [0, 1, 2, 3]
        assert names == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(4)]
    elif alg == "ULTRAEDIT":
        assert {int(n.split(".")[2]) for n in names} == {0, 1, 2, 3}
    else:  # WISE and GRACE edit one layer: the last of ECE's
        assert names == ["model.layers.3.mlp.down_proj.weight"]


@pytest.mark.easyeditor
@needs_main
def test_wise_act_margin_must_have_three_values() -> None:
    with pytest.raises(ValueError, match="act_margin"):
        ee.baseline_hparams("WISE", REPO / "hparams" / "WISE" / f"{SCALE2}.yaml", act_margin=[1.0, 2.0])


def test_method_table_knows_the_lifelong_editors() -> None:
    from ece_plugin.lab.study.baselines import StudyError
    from ece_plugin.lab.study.methods import build_methods
    from ece_plugin.method.hparams import ECEHyperParams

    ece = ECEHyperParams.from_hparams(REPO / "hparams" / "ECE" / f"{SCALE2}.yaml")
    paths = {alg: REPO / "hparams" / alg / f"{SCALE2}.yaml" for alg in ee.BASELINES}
    methods = build_methods(["ULTRAEDIT", "SPHERE", "SPHERE-batched", "MEMIT", "GRACE", "WISE"], ece, paths)
    assert [m.name for m in methods] == ["ULTRAEDIT (EasyEdit)", "SPHERE (EasyEdit)",
                                         "SPHERE (EasyEdit, batched apply)", "MEMIT", "GRACE (EasyEdit)", "WISE (EasyEdit)"]
    assert [m.via for m in methods] == ["auto", "auto", "apply", "auto", "auto", "auto"]
    assert type(methods[-2]).__name__ == "GraceMethod"  # it sets where GRACE's adapter reads
    assert type(methods[-1]).__name__ == "WiseMethod"  # one adapter, rows routed alone, loc prompts
    assert methods[-1].loc_corpus.ds_name == "factworld"  # the statistics corpus of the ECE hparams
    with pytest.raises(StudyError, match="unknown method 'NAS'"):
        build_methods(["NAS"], ece, paths)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.easyeditor
@needs_main
@pytest.mark.parametrize("alg", sorted(WIRED))
def test_lifelong_editor_edits_two_sequential_batches_through_base_editor(
    alg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.baselines import EasyEditMethod
    from ece_plugin.lab.study.common import load_model_and_tokenizer, snapshot_weights

    monkeypatch.chdir(tmp_path)  # BaseEditor writes logs/ into the working directory
    seed_everything(0)  # EasyEdit samples its context templates: the same ones whatever ran before this test
    model, tok = load_model_and_tokenizer(TESTBED, device="cpu")
    method = EasyEditMethod(alg, REPO / "hparams" / alg / f"{SCALE2}.yaml", via="BaseEditor",
                            overrides=dict(SMALL[alg]))
    assert method.availability(model) == (True, "")
    names = method.edited_weight_names(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    method.prepare(model, tok)
    method.reset(model)
    requests = _records(4)
    first, second = requests[:2], requests[2:]
    w0 = snapshot_weights(model, names)
    before_first = _target_logprob(model, tok, first)
    outcome = method.edit_batch(model, tok, first)
    w1 = snapshot_weights(model, names)
    after_first = _target_logprob(model, tok, first)
    method.edit_batch(model, tok, second)
    w2 = snapshot_weights(model, names)

    assert outcome.via == WIRED[alg] and outcome.seconds > 0
    assert any(not torch.equal(w0[n], w1[n]) for n in names)  # the first batch changed the model
    assert any(not torch.equal(w1[n], w2[n]) for n in names)  # the second batch changed it again ...
    assert any(not torch.equal(w0[n], w2[n]) for n in names)  # ... on top of the first (not restored)
    assert after_first > before_first, (before_first, after_first)  # the edited targets got likelier
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # ULTRAEDIT's freezing undone
    assert {p.name for p in tmp_path.iterdir()} <= {"logs"}  # SPHERE's P went to a private file


@pytest.mark.easyeditor
@needs_main
def test_wise_is_refused_by_the_plain_class_and_runs_as_wise_method() -> None:
    """Through the plain EasyEdit class WISE would forget each edit at the next call (EasyEdit's text WISE builds a
    new adapter unless its hparams say sequential_edit) and fail on batched scoring: that class refuses it, naming
    the one that runs it (tests/test_wise.py)."""
    from ece_plugin.lab.study.baselines import EasyEditMethod
    from ece_plugin.lab.study.wise import WiseMethod

    model = torch.nn.Linear(2, 2)
    path = REPO / "hparams" / "WISE" / f"{SCALE2}.yaml"
    ok, reason = EasyEditMethod("WISE", path).availability(model)
    assert not ok and "WiseMethod" in reason and len(reason) < 300  # one line
    assert WiseMethod("WISE", path, loc_prompts=["An unrelated sentence here."]).availability(model) == (True, "")
    merging = WiseMethod("WISE", path, loc_prompts=["An unrelated sentence here."], overrides={"retrieve": False})
    ok, reason = merging.availability(model)
    assert not ok and "retrieve: true" in reason


def test_edited_weight_names_from_each_hparams_spelling() -> None:
    from types import SimpleNamespace

    inner = SimpleNamespace(inner_params=["model.layers[3].mlp.down_proj.weight", "model.layers.0.mlp.up_proj"])
    assert ee.baseline_weight_names("WISE", inner) == ["model.layers.3.mlp.down_proj.weight",
                                                       "model.layers.0.mlp.up_proj.weight"]
    pmet = SimpleNamespace(rewrite_module_tmps=["a.{}.o", "a.{}.d"], rewrite_module_tmp="a.{}.d", layers=[1, 2])
    assert ee.baseline_weight_names("PMET", pmet) == ["a.1.o.weight", "a.2.o.weight", "a.1.d.weight", "a.2.d.weight"]
    locate = SimpleNamespace(rewrite_module_tmp="a.{}.d", layers=[0])
    assert ee.baseline_weight_names("SPHERE", locate) == ["a.0.d.weight"]


@pytest.mark.parametrize(("configured", "n", "used"), [(10, 100, 10), (10, 4, 4), (10, 15, 5), (10, 7, 7), (3, 7, 1)])
def test_ultraedit_sub_batch_divides_the_batch(configured: int, n: int, used: int) -> None:
    """ULTRAEDIT drops the requests past the last whole sub-batch (all of them when the sub-batch is larger than
    the batch), so the largest divisor of the batch up to the configured size is used."""
    from types import SimpleNamespace

    from ece_plugin.lab.study.baselines import EasyEditMethod

    method = EasyEditMethod("ULTRAEDIT", REPO / "hparams" / "ULTRAEDIT" / f"{SCALE2}.yaml")
    method._hparams = SimpleNamespace(batch_size_once=configured)
    target = SimpleNamespace(batch_size_once=configured)
    method._fit_ultraedit_sub_batch(target, n)
    assert target.batch_size_once == used
