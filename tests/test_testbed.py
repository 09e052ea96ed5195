"""The fact-world testbed: builder (llama + gpt2), determinism, tokenizer BOS, manifest, fact world, probe;
and (slow) the shipped testbed's pre-edit figures and subject-recall probe."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ece_plugin.lab.testbed import (
    MANIFEST_NAME,
    SamplerConfig,
    TestbedConfig,
    TestbedConfigError,
    build_fact_world,
    build_testbed,
    counterfact_preedit,
    subject_recall_probe,
)
from ece_plugin.lab.testbed.facts import (
    SequenceSampler,
    TestbedDataError,
    cluster_relations,
    cluster_zsre_relations,
    load_json_records,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
WIKI_VALID = DATA / "wikitext-2-raw" / "wiki.valid.raw"
SHIPPED = REPO / "testbed" / "testbed-llama"
HPARAMS = REPO / "hparams"
# the edit layer every shipped testbed hparams file uses (one layer, the same for all methods)
SHIPPED_EDIT_LAYER = yaml.safe_load((HPARAMS / "MEMIT" / "testbed-llama.yaml").read_text())["layers"][0]


def tiny_config(output_dir: Path, architecture: str = "llama", seed: int = 0, steps: int = 3) -> TestbedConfig:
    return TestbedConfig(
        output_dir=output_dir,
        architecture=architecture,
        seed=seed,
        n_records=30,
        n_val_records=5,
        n_zsre=5,
        wiki_paths=(WIKI_VALID,),
        vocab_size=400,
        n_layers=2,
        hidden_size=32,
        intermediate_size=64,
        n_heads=2,
        max_length=32,
        steps=steps,
        batch_size=4,
        warmup_steps=1,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_testbed(tiny_config(tmp_path_factory.mktemp("tb") / "tiny-llama"))


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_tiny_llama_loads_as_hf_model_with_bos_adding_tokenizer(tiny_llama: Path) -> None:
    from transformers import LlamaForCausalLM

    model, tok = _load(tiny_llama)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.bos_token_id
    assert tok.padding_side == "right"
    assert "token_type_ids" not in tok("x")
    assert tok.decode(ids, skip_special_tokens=True) == "The mother tongue of Danielle Darrieux is"
    # EasyEdit strips a leading BOS from encoded targets; without special tokens none is added
    assert tok.encode(" French", add_special_tokens=False)[0] != tok.bos_token_id
    batch = tok(["a b c d", "a"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].tolist()[:2] == [1, 1] and batch["attention_mask"][1, -1] == 0
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_manifest_records_data_seed_config_and_training(tiny_llama: Path) -> None:
    manifest = json.loads((tiny_llama / MANIFEST_NAME).read_text())
    first = [r["case_id"] for r in json.loads(COUNTERFACT.read_text())[:30]]
    assert manifest["counterfact_case_ids"] == first
    assert len(manifest["counterfact_val_case_ids"]) == 5
    assert manifest["zsre_indices"] == [0, 1, 2, 3, 4]
    assert manifest["seed"] == 0
    assert manifest["architecture"] == "llama"
    assert manifest["config"]["n_layers"] == 2
    assert manifest["training"]["steps"] == 3
    assert manifest["training"]["final_loss"] > 0
    assert manifest["training"]["seconds"] >= 0
    paths = [f["path"] for f in manifest["data_files"]]
    assert "data/counterfact/counterfact-edit.json" in paths
    assert all(len(f["sha256"]) == 64 for f in manifest["data_files"])
    assert manifest["command"]
    assert manifest["relations"]


def test_tiny_gpt2_has_conv1d_and_loads(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    path = build_testbed(tiny_config(tmp_path / "tiny-gpt2", architecture="gpt2", steps=2))
    model, tok = _load(path)
    assert isinstance(model, GPT2LMHeadModel)
    c_proj = model.transformer.h[0].mlp.c_proj
    assert isinstance(c_proj, Conv1D)
    assert tuple(c_proj.weight.shape) == (64, 32)  # Conv1D: [d_ff, d_model]
    assert tok("Paris")["input_ids"][0] == tok.bos_token_id


def test_same_seed_same_weights_different_seed_different(tmp_path: Path) -> None:
    a = build_testbed(tiny_config(tmp_path / "a" / "tiny-llama", seed=3))
    b = build_testbed(tiny_config(tmp_path / "b" / "tiny-llama", seed=3))
    c = build_testbed(tiny_config(tmp_path / "c" / "tiny-llama", seed=4))
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_output_dir_must_name_the_family(tmp_path: Path) -> None:
    with pytest.raises(TestbedConfigError, match="must contain 'llama'"):
        build_testbed(tiny_config(tmp_path / "my-model"))
    with pytest.raises(TestbedConfigError, match="architecture"):
        tiny_config(tmp_path / "x-llama", architecture="bert").validate()


def test_bad_data_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(TestbedDataError, match="lacks keys"):
        load_json_records(bad, ("prompt", "subject"))
    with pytest.raises(TestbedDataError, match="not found"):
        load_json_records(tmp_path / "missing.json", ("prompt",))


def test_relation_clustering_groups_paraphrased_templates() -> None:
    records = json.loads(COUNTERFACT.read_text())
    rome = json.loads((DATA / "counterfact" / "counterfact-rome-format.json").read_text())
    template_relation, relations = cluster_relations(records, rome)
    assert template_relation["The mother tongue of {} is"] == template_relation["{} is a native speaker of"]
    assert template_relation["The capital of {} is"] == template_relation["{}'s capital city is"]
    assert template_relation["The mother tongue of {} is"] != template_relation["The capital of {} is"]
    assert 10 <= len(relations) <= 60


def test_fact_world_and_sampler_are_deterministic() -> None:
    world = build_fact_world(COUNTERFACT, 20, None, 0, DATA / "counterfact" / "counterfact-rome-format.json",
                             None, 0, [WIKI_VALID])
    assert len(world.facts) == 40  # each record: its fact and its neighbourhood fact
    first = world.facts[0]
    assert first.answer == "French" and "The mother tongue of Danielle Darrieux is" in first.prompts
    texts_a = list(SequenceSampler(world, SamplerConfig(), seed=1).texts(20, 200))
    texts_b = list(SequenceSampler(world, SamplerConfig(), seed=1).texts(20, 200))
    assert texts_a == texts_b
    assert any("French." in t for t in SequenceSampler(world, SamplerConfig(), seed=1).texts(200, 200))


ZSRE = DATA / "zsre" / "zsre_mend_eval.json"


def test_zsre_questions_cluster_into_relations() -> None:
    records = json.loads(ZSRE.read_text())
    template_relation, relations = cluster_zsre_relations(records)
    # a record's question and its rephrase are one relation; the same template in two records joins them
    assert template_relation["What war did {} fight in?"] == template_relation["In which war did {} fight?"]
    assert template_relation["What war did {} fight in?"] != template_relation["What voice type is {}?"]
    assert all(name.startswith("zsre-") for name in relations)
    assert sorted(t for ts in relations.values() for t in ts) == sorted(template_relation)
    assert 100 <= len(relations) < len(template_relation)


def test_zsre_relations_and_target_mentions_in_the_fact_world() -> None:
    rome = DATA / "counterfact" / "counterfact-rome-format.json"
    plain = build_fact_world(COUNTERFACT, 20, None, 0, rome, ZSRE, 30, [WIKI_VALID])
    grouped = build_fact_world(COUNTERFACT, 20, None, 0, rome, ZSRE, 30, [WIKI_VALID], zsre_relations=True)
    zsre_plain = [f for f in plain.facts if f.source == "zsre"]
    zsre_grouped = [f for f in grouped.facts if f.source == "zsre"]
    assert [f.relation for f in zsre_plain] == [None] * 30
    assert all(f.relation in grouped.relations for f in zsre_grouped)
    assert [(f.subject, f.answer, f.prompts) for f in zsre_plain] == [
        (f.subject, f.answer, f.prompts) for f in zsre_grouped]
    records = json.loads(ZSRE.read_text())[:30]
    alts = {r["alt"].strip() for r in records}  # some zsRE alts start with a space
    assert alts <= set(grouped.mentions) and "English" in grouped.mentions  # a CounterFact target_new
    assert len(grouped.mentions) == len(set(grouped.mentions))
    # mention_prob 0 (the default) draws nothing extra: the text stream is what it was before the option
    base = list(SequenceSampler(plain, SamplerConfig(), seed=3).texts(30, 200))
    world_no_mentions = build_fact_world(COUNTERFACT, 20, None, 0, rome, ZSRE, 30, [WIKI_VALID])
    world_no_mentions.mentions = []
    assert base == list(SequenceSampler(world_no_mentions, SamplerConfig(), seed=3).texts(30, 200))
    mixed = " ".join(SequenceSampler(plain, SamplerConfig(mention_prob=0.5), seed=3).texts(100, 200))
    assert sum(f" {alt}." in mixed for alt in alts) >= 10


def test_target_answers_are_facts_about_synthetic_subjects() -> None:
    rome = DATA / "counterfact" / "counterfact-rome-format.json"
    args = (COUNTERFACT, 20, None, 0, rome, ZSRE, 30, [WIKI_VALID])
    plain = build_fact_world(*args, zsre_relations=True)
    world = build_fact_world(*args, zsre_relations=True, target_answers=True)
    assert world.facts[: len(plain.facts)] == plain.facts  # the real facts are unchanged
    extra = world.facts[len(plain.facts):]
    assert extra and all(f.source == "target-answer" for f in extra)
    real_subjects = {f.subject for f in plain.facts}
    assert not {f.subject for f in extra} & real_subjects
    assert len({f.subject for f in extra}) == len(extra)
    for fact in extra:
        assert fact.relation in world.relations and fact.subject in fact.prompts[0]
    answers = {f.answer for f in extra}
    assert "English" in answers  # record 0's CounterFact target_new
    records = json.loads(ZSRE.read_text())[:30]
    assert sum(r["alt"].strip() in answers for r in records) >= 20
    again = build_fact_world(*args, zsre_relations=True, target_answers=True)
    assert again.facts == world.facts  # deterministic


def test_mention_prob_outside_unit_interval_is_refused(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "tb-llama")
    config.sampler = SamplerConfig(mention_prob=1.0)
    with pytest.raises(TestbedConfigError, match="mention_prob"):
        build_testbed(config)
    assert not (tmp_path / "tb-llama").exists()


def test_preedit_and_probe_run_on_tiny_model(tiny_llama: Path) -> None:
    model, tok = _load(tiny_llama)
    records = json.loads(COUNTERFACT.read_text())[:6]
    figures = counterfact_preedit(model, tok, records)
    assert figures.n == 6 and all(0 <= v <= 100 for v in (figures.efficacy, figures.paraphrase,
                                                          figures.neighborhood))
    before = [p.detach().clone() for p in model.parameters()]
    baseline = subject_recall_probe(model, tok, records, layer=1, steps=0)
    free = subject_recall_probe(model, tok, records, layer=1, steps=30, lr=1.0, position="last")
    assert free.n == 6 and 0 <= free.moved <= 100
    assert free.mean_target_prob > baseline.mean_target_prob  # the vector pushes towards the new object
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the probe edits nothing
    with pytest.raises(ValueError, match="layer"):
        subject_recall_probe(model, tok, records, layer=7)


# ----- the shipped testbed ----------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not (SHIPPED / MANIFEST_NAME).is_file(), reason=f"no shipped testbed at {SHIPPED}")


def _assert_knows_trained_facts(folder: Path, first: int, last: int) -> None:
    """Pre-edit ES <= 10, PS <= 20, NS >= 85 on the trained CounterFact records [first:last] (issue 6's targets)."""
    model, tok = _load(folder)
    trained = set(json.loads((folder / MANIFEST_NAME).read_text())["counterfact_case_ids"])
    records = [r for r in json.loads(COUNTERFACT.read_text()) if r["case_id"] in trained][first:last]
    figures = counterfact_preedit(model, tok, records)
    assert figures.efficacy <= 10.0 and figures.paraphrase <= 20.0 and figures.neighborhood >= 85.0, figures


def _assert_recalls_at(folder: Path, records: list[dict[str, Any]], layers: list[int]) -> None:
    """The subject-recall probe moves >= 90 % of ``records`` at each of ``layers``."""
    model, tok = _load(folder)
    for layer in layers:
        result = subject_recall_probe(model, tok, records, layer=layer, steps=100, lr=1.0)
        assert result.moved >= 90.0, result


def _assert_corpus_remade(folder: Path) -> None:
    from ece_plugin.lab.testbed.corpus import CorpusConfig, corpus_path, statistics_corpus

    shipped = corpus_path(folder, "factworld").read_text().splitlines()
    assert shipped == statistics_corpus(folder, CorpusConfig())  # remade exactly by `ece-plugin stats-corpus`


@shipped
@pytest.mark.slow
def test_shipped_testbed_knows_its_facts() -> None:
    _assert_knows_trained_facts(SHIPPED, 0, 200)


@shipped
@pytest.mark.slow
@pytest.mark.line_independent
def test_shipped_testbed_recalls_facts_from_the_subject() -> None:
    records = json.loads(COUNTERFACT.read_text())[:20]  # trained on (the first 2,000 are)
    _assert_recalls_at(SHIPPED, records, [SHIPPED_EDIT_LAYER])


def test_shipped_hparams_share_layers_and_z_budget() -> None:
    configs = {alg: yaml.safe_load((HPARAMS / alg / "testbed-llama.yaml").read_text())
               for alg in ("ECE", "MEMIT", "ROME", "AlphaEdit")}
    assert {tuple(c["layers"]) for c in configs.values()} == {(SHIPPED_EDIT_LAYER,)}
    assert {c["v_num_grad_steps"] for c in configs.values()} == {25}
    ece = configs["ECE"]
    assert ece["shared_grad_steps"] + ece["per_edit_grad_steps"] == ece["v_num_grad_steps"]


@shipped
def test_bundled_statistics_belong_to_the_shipped_testbed() -> None:
    from ece_plugin.method import statistics
    from ece_plugin.method.hparams import ECEHyperParams

    model, _ = _load(SHIPPED)
    hparams = ECEHyperParams.from_hparams(HPARAMS / "ECE" / "testbed-llama.yaml")
    hparams.stats_dir = str(REPO / "data" / "stats")
    spec = statistics.StatsSpec.from_hparams(hparams)
    name = hparams.rewrite_module_tmp.format(SHIPPED_EDIT_LAYER)
    path = statistics.stats_paths_for(model, name, spec).main  # EasyEdit main's layout, as shipped
    assert path.is_file(), path
    mom2, count, sample_size, meta = statistics.read_stats_file(path)
    d_ff = model.config.intermediate_size
    statistics.check_stats_file(path, model, name, spec, d_ff, tuple(mom2.shape), sample_size, meta)  # refuses another model's
    assert mom2.shape == (d_ff, d_ff) and count > 0


# ----- the scale testbed (issue 14) ------------------------------------------------------------------------

SCALE2 = REPO / "testbed" / "testbed-llama-scale2"  # the scale build: zsRE relations, target strings and answers
SCALE_LAYERS = [0, 1, 2, 3]
ZSRE = REPO / "data" / "zsre" / "zsre_mend_eval.json"


def _scale_folders() -> list[Any]:
    return [
        pytest.param(path, marks=pytest.mark.skipif(not (path / MANIFEST_NAME).is_file(), reason=f"no testbed at {path}"),
                     id=path.name)
        for path in (SCALE2,)
    ]


scale_folders = pytest.mark.parametrize("folder", _scale_folders())
scale2 = pytest.mark.skipif(not (SCALE2 / MANIFEST_NAME).is_file(), reason=f"no testbed at {SCALE2}")


@scale_folders
@pytest.mark.slow
def test_scale_testbed_knows_its_facts(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert len(manifest["counterfact_case_ids"]) >= 2000 and len(manifest["zsre_indices"]) >= 500
    _assert_knows_trained_facts(folder, 1800, 2000)


@scale_folders
@pytest.mark.slow
@pytest.mark.line_independent
def test_scale_testbed_recalls_counterfact_facts_at_every_edit_layer(folder: Path) -> None:
    _assert_recalls_at(folder, json.loads(COUNTERFACT.read_text())[:20], SCALE_LAYERS)


@scale2
@pytest.mark.slow
@pytest.mark.line_independent
def test_second_scale_testbed_recalls_zsre_facts_at_every_edit_layer() -> None:
    from ece_plugin.evaluation.data import load_zsre

    records = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new}
               for r in load_zsre(ZSRE, limit=10)]  # as `ece-plugin probe-testbed` reads zsRE records
    _assert_recalls_at(SCALE2, records, SCALE_LAYERS)


@pytest.mark.parametrize("name", ["testbed-llama-scale2"])
def test_scale_hparams_share_layers_and_z_budget_and_give_5_neurons_per_edit(name: str) -> None:
    configs = {alg: yaml.safe_load((HPARAMS / alg / f"{name}.yaml").read_text())
               for alg in ("ECE", "MEMIT", "AlphaEdit")}
    assert {tuple(c["layers"]) for c in configs.values()} == {tuple(SCALE_LAYERS)}
    assert {c["v_num_grad_steps"] for c in configs.values()} == {25}
    assert {c["mom2_update_weight"] for c in configs.values()} == {1000}
    assert {c["model_name"] for c in configs.values()} == {f"./testbed/{name}"}
    rome = yaml.safe_load((HPARAMS / "ROME" / f"{name}.yaml").read_text())
    assert len(rome["layers"]) == 1 and rome["layers"][0] in SCALE_LAYERS and rome["v_num_grad_steps"] == 25
    assert name in configs["AlphaEdit"]["P_loc"]  # its own null-space projection file
    folder = REPO / "testbed" / name
    if (folder / "config.json").is_file():
        d_ff = json.loads((folder / "config.json").read_text())["intermediate_size"]
        assert len(SCALE_LAYERS) * d_ff / 2000 >= 5.0  # edited neurons per edit at 2,000 edits


def _changed_keys(base: Path, variant: Path) -> dict[str, Any]:
    """The keys whose values differ between two hparams files, with the variant's values."""
    a, b = yaml.safe_load(base.read_text()), yaml.safe_load(variant.read_text())
    return {k: b.get(k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_zsre_editability_hparams_differ_from_the_sequential_ones_in_the_z_budget_only() -> None:
    """hparams/MEMIT/testbed-llama-scale2-zsre.yaml (issue 14's one-batch zsRE check) is the sequential MEMIT file
    with another z budget, and is never picked for the model by default."""
    from ece_plugin.lab.study.baselines import default_baseline_hparams

    changed = _changed_keys(HPARAMS / "MEMIT" / "testbed-llama-scale2.yaml",
                            HPARAMS / "MEMIT" / "testbed-llama-scale2-zsre.yaml")
    assert set(changed) == {"v_num_grad_steps", "v_lr"}
    assert (changed["v_num_grad_steps"], changed["v_lr"]) == (50, 0.25)
    picked = default_baseline_hparams(HPARAMS, "MEMIT", REPO / "testbed" / "testbed-llama-scale2")
    assert picked.name == "testbed-llama-scale2.yaml"


def test_sequential_ece_hparams_are_the_shipped_file_with_the_validated_departures() -> None:
    """hparams/ECE/testbed-llama-scale2-sequential.yaml (issue 15's best 2,000-edit setting) is the shipped file
    with the six keys the validation sequence chose, and loads as ECE hparams; default_baseline_hparams (the
    one-batch commands) never picks it."""
    from ece_plugin.lab.study.baselines import default_baseline_hparams
    from ece_plugin.method.hparams import ECEHyperParams

    paper = yaml.safe_load((HPARAMS / "ECE" / "testbed-llama-scale2.yaml").read_text())
    changed = _changed_keys(HPARAMS / "ECE" / "testbed-llama-scale2.yaml",
                            HPARAMS / "ECE" / "testbed-llama-scale2-sequential.yaml")
    assert changed == {"prompt_keys_weight": 1.0, "prompt_keys_decay": 0.8, "neuron_threshold": 1.0,
                       "clustering": False, "v_lr": 0.25, "v_num_grad_steps": 50}
    hp = ECEHyperParams.from_hparams(HPARAMS / "ECE" / "testbed-llama-scale2-sequential.yaml")
    overridden = ECEHyperParams.from_dict({**paper, **changed})
    assert hp == overridden  # the same as the --ece-set overrides of README.md's best rows
    picked = default_baseline_hparams(HPARAMS, "ECE", REPO / "testbed" / "testbed-llama-scale2")
    assert picked.name == "testbed-llama-scale2.yaml"


def test_the_sequential_commands_pick_the_recommended_setting_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    """lifelong and bench (sequential=True) take <model>-sequential.yaml where the model has one and log it; the
    one-batch commands keep the paper's form; a model without a sequential file gets its own file either way."""
    from ece_plugin.lab.cli.common import hparams_file

    scale = REPO / "testbed" / "testbed-llama-scale2"
    with caplog.at_level(logging.INFO, logger="ece_plugin.lab.cli"):
        picked = hparams_file(None, HPARAMS, "ECE", scale, sequential=True)
    assert picked == HPARAMS / "ECE" / "testbed-llama-scale2-sequential.yaml"
    assert "recommended sequential setting" in caplog.text
    assert hparams_file(None, HPARAMS, "ECE", scale) == HPARAMS / "ECE" / "testbed-llama-scale2.yaml"
    small = REPO / "testbed" / "testbed-llama"
    assert hparams_file(None, HPARAMS, "ECE", small, sequential=True) == HPARAMS / "ECE" / "testbed-llama.yaml"
    assert hparams_file(None, HPARAMS, "MEMIT", scale, sequential=True).name == "testbed-llama-scale2.yaml"
    explicit = hparams_file("testbed-llama-scale2", HPARAMS, "ECE", scale, sequential=True)
    assert explicit.name == "testbed-llama-scale2.yaml"  # --hparams always wins


@scale_folders
def test_scale_hparams_read_the_shipped_statistics_corpus(folder: Path) -> None:
    names = {yaml.safe_load((HPARAMS / alg / f"{folder.name}.yaml").read_text())["mom2_dataset"]
             for alg in ("ECE", "MEMIT", "AlphaEdit", "ROME")}
    assert names == {"factworld"}  # one C0 for every method
    _assert_corpus_remade(folder)


def test_statistics_corpus_samples_held_out_facts_only(tmp_path: Path) -> None:
    from ece_plugin.lab.testbed.corpus import CorpusConfig, statistics_corpus, write_statistics_corpus

    model = tmp_path / "testbed-llama"
    model.mkdir()
    (model / MANIFEST_NAME).write_text((SHIPPED / MANIFEST_NAME).read_text())
    trained = json.loads((SHIPPED / MANIFEST_NAME).read_text())["config"]
    records = json.loads(COUNTERFACT.read_text())
    config = CorpusConfig(n_texts=300, seed=3, counterfact_offset=7000)
    texts = statistics_corpus(model, config)
    assert len(texts) == 300 and all(t and "\n" not in t for t in texts)
    assert texts == statistics_corpus(model, config) != statistics_corpus(model, CorpusConfig(n_texts=300, seed=4))
    joined = "\n".join(texts)
    held_out = [r["subject"] for r in records[7000 : 7000 + trained["n_records"]]]
    assert sum(s in joined for s in held_out[:200]) >= 20  # the held-out world's facts are what it samples
    # the world behind it: CounterFact records 7000-8999 and the zsRE records the testbed did not train on
    world = build_fact_world(COUNTERFACT, 5, None, 0, None, ZSRE, 3, [WIKI_VALID], counterfact_offset=7000,
                             zsre_offset=trained["n_zsre"])
    assert world.counterfact_case_ids == [int(r["case_id"]) for r in records[7000:7005]]
    assert world.zsre_indices == [100, 101, 102]
    with pytest.raises(TestbedDataError, match="trained on"):
        statistics_corpus(model, CorpusConfig(counterfact_offset=trained["n_records"] - 1))
    path = write_statistics_corpus(model, "factworld", config)
    assert path == model / "factworld.txt" and path.read_text().splitlines() == texts
    assert write_statistics_corpus(model, "factworld", config) == path  # the same text: left as it is
    with pytest.raises(TestbedDataError, match="--force"):
        write_statistics_corpus(model, "factworld", CorpusConfig(n_texts=300, seed=4))
    assert path.read_text().splitlines() == texts  # nothing the user had is destroyed
    write_statistics_corpus(model, "factworld", CorpusConfig(n_texts=300, seed=4), force=True)
    assert path.read_text().splitlines() != texts
    with pytest.raises(TestbedDataError, match="wikipedia"):
        write_statistics_corpus(model, "wikipedia", config)


@pytest.mark.parametrize("name", ["testbed-llama", "testbed-llama-scale", "testbed-llama-scale2", "testbed-gpt2"])
def test_shipped_tokenizers_load_under_both_transformers_lines(name: str) -> None:
    """transformers 5 saves ``TokenizersBackend``, which 4.x cannot load; the builder writes the 4.x form."""
    folder = REPO / "testbed" / name
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"no testbed at {folder}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    assert (folder / "special_tokens_map.json").is_file()


def test_make_portable_rewrites_a_transformers_5_config(tmp_path: Path) -> None:
    from ece_plugin.lab.testbed.tokenizer import make_portable

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": None}))
    make_portable(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    assert config["bos_token"] == "<s>"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


# ----- the GPT-2 testbed (issue 14, point 5: the recipe carries to Conv1D weights and tied embeddings) --------

GPT2 = REPO / "testbed" / "testbed-gpt2"
gpt2_shipped = pytest.mark.skipif(not (GPT2 / MANIFEST_NAME).is_file(), reason=f"no testbed at {GPT2}")
GPT2_ALGS = ("ECE", "MEMIT", "ROME", "AlphaEdit")


def _gpt2_configs() -> dict[str, dict[str, Any]]:
    return {alg: yaml.safe_load((HPARAMS / alg / "testbed-gpt2.yaml").read_text()) for alg in GPT2_ALGS}


def test_gpt2_hparams_share_layers_and_z_budget_and_name_the_gpt2_modules() -> None:
    configs = _gpt2_configs()
    batch_layers = {tuple(configs[alg]["layers"]) for alg in ("ECE", "MEMIT", "AlphaEdit")}
    assert len(batch_layers) == 1
    assert len(configs["ROME"]["layers"]) == 1 and configs["ROME"]["layers"][0] in next(iter(batch_layers))
    assert len({c["v_num_grad_steps"] for c in configs.values()}) == 1  # one z budget for every method
    ece = configs["ECE"]
    assert ece["shared_grad_steps"] + ece["per_edit_grad_steps"] == ece["v_num_grad_steps"]
    assert {c["model_name"] for c in configs.values()} == {"./testbed/testbed-gpt2"}
    assert {c["rewrite_module_tmp"] for c in configs.values()} == {"transformer.h.{}.mlp.c_proj"}
    assert {c["lm_head_module"] for c in configs.values()} == {"transformer.wte"}  # tied embeddings
    assert {c["mom2_dataset"] for c in configs.values()} == {"factworld"}
    assert "testbed-gpt2" in configs["AlphaEdit"]["P_loc"]


@gpt2_shipped
def test_gpt2_testbed_is_a_conv1d_model_with_tied_embeddings_and_its_corpus() -> None:
    model, _ = _load(GPT2)
    assert model.config.model_type == "gpt2"
    assert type(model.transformer.h[0].mlp.c_proj).__name__ == "Conv1D"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    _assert_corpus_remade(GPT2)


@gpt2_shipped
@pytest.mark.slow
def test_gpt2_testbed_knows_its_facts() -> None:
    _assert_knows_trained_facts(GPT2, 0, 200)


@gpt2_shipped
@pytest.mark.slow
@pytest.mark.line_independent
def test_gpt2_testbed_recalls_facts_at_its_first_edit_layer() -> None:
    """Layer 0, the edit layer of every method, moves every probed fact (40 records: 100 %; testbed/README.md)."""
    _assert_recalls_at(GPT2, json.loads(COUNTERFACT.read_text())[:20], [_gpt2_configs()["MEMIT"]["layers"][0]])
