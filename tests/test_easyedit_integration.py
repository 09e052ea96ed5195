"""ECE inside EasyEdit: registration, batchability, restore semantics, BaseEditor end to end; EasyEdit's own ROME,
MEMIT and AlphaEdit through BaseEditor on the bundled testbed; examples/run_ECE_editing.py.

`make test` runs this file in both environments: `.venv` (PyPI easyeditor 0.0.1.dev0, which hard-codes CUDA, so
its end-to-end test is marked ``cuda``) and `.venv-main` (EasyEdit main on the import path from EASYEDIT_MAIN,
on a CPU). The tests that need EasyEdit main skip, saying so, where it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ece_plugin import easyedit as ee
from ece_plugin.method.hparams import ECEHyperParams

VERSION = ee.easyedit_version()
needs_easyeditor = pytest.mark.skipif(VERSION is None, reason="easyeditor is not importable")
needs_main = pytest.mark.skipif(
    VERSION != ee.EASYEDIT_MAIN,
    reason=f"needs EasyEdit main (easyeditor here: {VERSION or 'none'}); `make test` puts it on .venv-main's path "
    "from EASYEDIT_MAIN (default ../shared/easyedit-main/src, else a clone of github.com/zjunlp/EasyEdit)",
)
REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed" / "testbed-llama"
COUNTERFACT = REPO / "data" / "counterfact" / "counterfact-edit.json"

LLAMA_TMPS = dict(
    rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm", lm_head_module="lm_head",
)
GPT2_TMPS = dict(
    rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
    mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
    ln_f_module="transformer.ln_f", lm_head_module="transformer.wte",
)
CORPUS_LINES = [
    "Paris is the capital of France and a famous city on the river",
    "London is the capital of England and home of Big Ben",
    "The Colosseum is located in Rome the capital of Italy",
    "Lionel Messi plays soccer and Danny Green plays basketball",
    "Tokyo is the capital of Japan and Berlin is the capital of Germany",
] * 4
PROMPTS = ["The Eiffel Tower is located in", "Danny Green plays", "Lionel Messi plays", "Tokyo is the capital of"]
SUBJECTS = ["Eiffel Tower", "Danny Green", "Lionel Messi", "Tokyo"]
TARGETS = ["Rome", "soccer", "chess", "Spain"]
TRUTHS = ["Paris", "basketball", "soccer", "Japan"]


# ----------------------------------------------------------------------------------- registration
@pytest.mark.easyeditor
@needs_easyeditor
def test_register_puts_ece_into_the_editors_alg_dict_and_is_idempotent() -> None:
    from ece_plugin import apply_ece_to_model

    alg_dict = ee.import_easyedit("easyeditor.util.alg_dict").ALG_DICT
    editor_module = ee.import_easyedit("easyeditor.editors.editor")
    assert editor_module.ALG_DICT is alg_dict  # the object BaseEditor reads
    assert alg_dict["ECE"] is apply_ece_to_model  # importing ece_plugin registered it
    batch_editor = ee.import_easyedit("easyeditor.editors.batch_editor").BatchEditor
    wrapped = batch_editor.is_batchable_method
    size = len(alg_dict)
    assert ee.register() is True
    assert ee.register() is True
    assert batch_editor.is_batchable_method is wrapped  # no second wrapper
    assert len(alg_dict) == size
    assert batch_editor.is_batchable_method("ECE")
    assert batch_editor.is_batchable_method("MEMIT") and not batch_editor.is_batchable_method("ROME")
    assert editor_module.BatchEditor.is_batchable_method("ECE")
    assert ee.is_registered()


def test_register_is_a_silent_noop_without_easyeditor(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(ee.importlib.util, "find_spec",
                        lambda name, *a: None if name == "easyeditor" else real(name, *a))
    assert ee.easyedit_version() is None
    assert ee.register() is False
    assert ee.is_registered() is False
    ok, why = ee.can_run_on("cpu")
    assert not ok and "not importable" in why
    with pytest.raises(ee.EasyEditUnavailableError, match="MEMIT baseline needs easyeditor"):
        ee.baseline_hparams("MEMIT", {})


@pytest.mark.easyeditor
@needs_easyeditor
def test_can_run_on_follows_the_easyedit_line() -> None:
    ok, why = ee.can_run_on("cpu")
    if VERSION == ee.EASYEDIT_PYPI:
        assert not ok and "cuda" in why
    else:
        assert ok and "main" in why


def test_weights_copy_contract() -> None:
    main, pypi = ee.EASYEDIT_MAIN, ee.EASYEDIT_PYPI
    # main: the copy always (its edit() passes keep_original_weight=False and ignores it)
    assert ee.wants_weights_copy(True, {"keep_original_weight": False}, main) is True
    assert ee.wants_weights_copy(True, {}, main) is True
    # 0.0.1.dev0: the copy only with keep_original_weight=True, so that edits accumulate by default
    assert ee.wants_weights_copy(True, {"keep_original_weight": False}, pypi) is False
    assert ee.wants_weights_copy(True, {"keep_original_weight": True}, pypi) is True
    assert ee.wants_weights_copy(False, {"keep_original_weight": True}, pypi) is False
    assert ee.wants_weights_copy(True, {}) is True  # a direct call (no EasyEdit flag) gets its copy


@pytest.mark.easyeditor
@needs_main
def test_main_restores_ece_weights_copy_by_the_default_path() -> None:
    utils = ee.import_easyedit("easyeditor.editors.utils")
    for name in ("CALLABLE_RESTORE_ALGS", "PEFT_RESTORE_ALGS", "KEEP_EDITED_MODEL_ALGS"):
        assert "ECE" not in getattr(utils, name)
    layer = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(layer)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight += 1.0
    editor = SimpleNamespace(alg_name="ECE", model=model)
    utils.restore_after_edit(editor, model, {"0.weight": original})
    assert torch.equal(layer.weight, original)


# -------------------------------------------------------------------------------- baseline hparams
MEMIT_CONFIG: dict[str, Any] = dict(
    alg_name="MEMIT", model_name="tiny-llama", stats_dir="./data/stats", device="cpu", layers=[0, 1],
    layer_selection="all", fact_token="subject_last", v_num_grad_steps=5, v_lr=0.5, v_loss_layer=2,
    v_weight_decay=0.5, clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=True,
    mom2_update_weight="1.5e4", mom2_dataset="wikipedia", mom2_n_samples=100, mom2_dtype="float32",
    max_length=40, batch_size=2, model_parallel=False, **LLAMA_TMPS,
)


@pytest.mark.easyeditor
@needs_easyeditor
def test_baseline_hparams_from_yaml(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "memit.yaml"
    path.write_text(yaml.safe_dump(MEMIT_CONFIG))
    hp = ee.baseline_hparams("MEMIT", path, stats_dir=str(tmp_path / "stats"))
    assert type(hp).__name__ == "MEMITHyperParams"
    assert hp.mom2_update_weight == 15000.0 and hp.stats_dir == str(tmp_path / "stats")
    assert callable(ee.baseline_apply("MEMIT"))
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['bogus'\]"):
        ee.baseline_hparams("MEMIT", {**MEMIT_CONFIG, "bogus": 1})
    with pytest.raises(ValueError, match="not 'MEMIT'"):
        ee.baseline_hparams("MEMIT", {**MEMIT_CONFIG, "alg_name": "ROME"})
    with pytest.raises(KeyError, match="unknown baseline"):
        ee.baseline_hparams("XYZ", {})
    if VERSION == ee.EASYEDIT_PYPI:
        with pytest.raises(ee.EasyEditUnavailableError, match="AlphaEditHyperParams"):
            ee.baseline_hparams("AlphaEdit", {})


# ----------------------------------------------------------------------------------- end to end
def _save_tiny_llama(tok: Any, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)


def _ece_hparams(tmp_path: Path, model_dir: Path, batch_size: int, family: str = "llama") -> ECEHyperParams:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS_LINES) + "\n")
    return ECEHyperParams(
        model_name=str(model_dir), layers=[0, 1], device="cpu", batch_size=batch_size,
        shared_grad_steps=8, per_edit_grad_steps=4, v_lr=0.5, clamp_norm_factor=4.0, cluster_ratio=0.5,
        context_template_length_params=[], mom2_update_weight=10.0, mom2_n_samples=20,
        mom2_dataset="tinytext", mom2_corpus=str(corpus), stats_dir=str(tmp_path / "stats"),
        **(LLAMA_TMPS if family == "llama" else GPT2_TMPS),
    )


def _target_prob(model: Any, tok: Any, prompt: str, target: str) -> float:
    """P(first token of the target | prompt)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    target_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits[0, -1].float()
    return float(torch.softmax(logits, -1)[target_id])


def _w_out(editor: Any, layer: int) -> torch.Tensor:
    return editor.model.get_parameter(f"model.layers.{layer}.mlp.down_proj.weight").detach().clone()


@pytest.mark.easyeditor
@needs_main
def test_main_edit_restores_unless_sequential(tmp_path: Path, tok: Any) -> None:
    from ece_plugin.method.state import get_session

    base_editor = ee.import_easyedit("easyeditor").BaseEditor
    model_dir = tmp_path / "tiny-llama"
    _save_tiny_llama(tok, model_dir)
    editor = base_editor.from_hparams(_ece_hparams(tmp_path, model_dir, batch_size=1))
    before = [_w_out(editor, 0), _w_out(editor, 1)]
    p_before = [_target_prob(editor.model, editor.tok, p, t) for p, t in zip(PROMPTS[:2], TARGETS[:2])]

    metrics, _, weights_copy = editor.edit(
        prompts=PROMPTS[:2], target_new=TARGETS[:2], ground_truth=TRUTHS[:2], subject=SUBJECTS[:2],
        sequential_edit=False, verbose=False,
    )
    assert len(metrics) == 2 and all("post" in m for m in metrics)
    assert set(weights_copy) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert torch.equal(_w_out(editor, 0), before[0]) and torch.equal(_w_out(editor, 1), before[1])
    state = get_session(editor.model).state
    assert state.reconcile(editor.model) == "discarded-restored" and state.n_edits == 0
    stats = list((tmp_path / "stats" / "tiny-llama" / "tinytext_stats").glob("*.npz"))
    assert len(stats) == 2  # one statistics file per edited layer, in EasyEdit main's layout

    metrics, _, _ = editor.edit(
        prompts=PROMPTS[:2], target_new=TARGETS[:2], ground_truth=TRUTHS[:2], subject=SUBJECTS[:2],
        sequential_edit=True, verbose=False,
    )
    assert not torch.equal(_w_out(editor, 1), before[1])  # edits kept
    assert state.reconcile(editor.model) == "committed" and state.n_edits == 2
    assert len(metrics) == 2
    for prompt, target, p0 in zip(PROMPTS[:2], TARGETS[:2], p_before):
        assert _target_prob(editor.model, editor.tok, prompt, target) > 2 * p0  # the edits moved the model


@pytest.mark.easyeditor
@needs_main
def test_main_batch_edit_restores_per_chunk_unless_sequential(tmp_path: Path, tok: Any) -> None:
    from ece_plugin.method.state import get_session

    base_editor = ee.import_easyedit("easyeditor").BaseEditor
    model_dir = tmp_path / "tiny-llama"
    _save_tiny_llama(tok, model_dir)
    editor = base_editor.from_hparams(_ece_hparams(tmp_path, model_dir, batch_size=2))
    before = _w_out(editor, 1)
    metrics, _, _ = editor.batch_edit(
        prompts=PROMPTS, target_new=TARGETS, ground_truth=TRUTHS, subject=SUBJECTS, sequential_edit=False,
        verbose=False,
    )
    assert len(metrics) == 4
    assert torch.equal(_w_out(editor, 1), before)
    state = get_session(editor.model).state
    assert state.reconcile(editor.model) == "discarded-restored" and state.n_edits == 0

    editor.batch_edit(
        prompts=PROMPTS, target_new=TARGETS, ground_truth=TRUTHS, subject=SUBJECTS, sequential_edit=True,
        verbose=False,
    )
    assert not torch.equal(_w_out(editor, 1), before)
    assert state.reconcile(editor.model) == "committed"
    assert state.n_edits == 4  # two chunks of two, both carried
    assert get_session(editor.model).last_trace is not None


def _save_tiny_gpt2(directory: Path) -> Any:
    """A GPT-2 folder that easyeditor 0.0.1.dev0's GPT2Tokenizer (vocab.json + merges.txt) can load."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    directory.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS_LINES + PROMPTS + TARGETS, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(directory))
    tok = GPT2TokenizerFast(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"))
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_inner=64, n_layer=3, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return tok


@pytest.mark.easyeditor
@pytest.mark.cuda
def test_pypi_edits_accumulate_unless_keep_original_weight(tmp_path: Path) -> None:
    if VERSION != ee.EASYEDIT_PYPI:
        pytest.skip("needs easyeditor 0.0.1.dev0 (PyPI)")
    ok, why = ee.can_run_on(0)
    if not ok:
        pytest.skip(why)
    from ece_plugin.method.state import get_session

    base_editor = ee.import_easyedit("easyeditor").BaseEditor
    model_dir = tmp_path / "tiny-gpt2"
    _save_tiny_gpt2(model_dir)
    hp = _ece_hparams(tmp_path, model_dir, batch_size=2, family="gpt2")
    hp.device = 0
    editor = base_editor.from_hparams(hp)
    name = "transformer.h.1.mlp.c_proj.weight"
    before = editor.model.get_parameter(name).detach().clone()
    editor.batch_edit(prompts=PROMPTS[:2], target_new=TARGETS[:2], ground_truth=TRUTHS[:2],
                      subject=SUBJECTS[:2], keep_original_weight=True, verbose=False)
    assert torch.equal(editor.model.get_parameter(name), before)  # restored from the returned copy
    state = get_session(editor.model).state
    assert state.reconcile(editor.model) == "discarded-restored"
    editor.batch_edit(prompts=PROMPTS[:2], target_new=TARGETS[:2], ground_truth=TRUTHS[:2],
                      subject=SUBJECTS[:2], keep_original_weight=False, verbose=False)
    assert not torch.equal(editor.model.get_parameter(name), before)  # empty copy: the edit stays
    assert state.reconcile(editor.model) == "committed" and state.n_edits == 2


# ----------------------------------------------------------------------------------- baselines via BaseEditor
def test_easyedit_tokenizer_mirrors_base_editor_setup() -> None:
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, padding_side="left")
    llama = ee.easyedit_tokenizer(tok, "./testbed/testbed-llama")
    assert (llama.pad_token_id, llama.padding_side) == (2, "right")
    gpt2 = ee.easyedit_tokenizer(tok, "gpt2-xl")
    assert (gpt2.pad_token_id, gpt2.padding_side) == (2, "left")
    assert (tok.pad_token_id, tok.padding_side) == (0, "left")  # the caller's tokenizer is untouched


def test_base_editor_kwargs_from_requests() -> None:
    from ece_plugin.lab.study.baselines import _base_editor_kwargs

    requests = [
        {"prompt": "P1", "subject": "S1", "target_new": "T1", "ground_truth": "G1", "rephrase_prompt": "R1",
         "locality_prompt": "L1", "locality_ground_truth": "A1"},
        {"prompt": "P2", "subject": "S2", "target_new": "T2", "ground_truth": None, "rephrase_prompt": None,
         "locality_prompt": None, "locality_ground_truth": None},
    ]
    kwargs = _base_editor_kwargs(requests)
    assert kwargs["prompts"] == ["P1", "P2"] and kwargs["subject"] == ["S1", "S2"]
    assert kwargs["ground_truth"] == ["G1", None] and kwargs["rephrase_prompts"] == ["R1", None]
    assert kwargs["locality_inputs"] == {"neighborhood": {"prompt": ["L1", None], "ground_truth": ["A1", None]}}
    assert "locality_inputs" not in _base_editor_kwargs(requests[1:])


@pytest.mark.easyeditor
@pytest.mark.skipif(VERSION != ee.EASYEDIT_PYPI, reason="checks easyeditor 0.0.1.dev0's BaseEditor")
def test_pypi_base_editor_cannot_keep_edits_so_baselines_use_the_apply_function() -> None:
    from ece_plugin.lab.study.baselines import EasyEditMethod, StudyError

    assert not ee.base_editor_keeps_edits()
    assert not EasyEditMethod("MEMIT", Path("x.yaml")).uses_base_editor()
    with pytest.raises(StudyError, match="restores the weights after every batch"):
        EasyEditMethod("MEMIT", Path("x.yaml"), via="BaseEditor").uses_base_editor()


@pytest.mark.easyeditor
@needs_main
def test_main_base_editor_keeps_edits() -> None:
    assert ee.base_editor_keeps_edits()


# ------------------------------------------------------------ EasyEdit main on the bundled testbed, shipped hparams
def test_makefile_pins_the_snapshot_commit() -> None:
    """The Makefile's fallback clone of EasyEdit main is the commit of the snapshot CI tests against."""
    pinned = re.search(r"^EASYEDIT_MAIN_COMMIT := ([0-9a-f]{40})$", (REPO / "Makefile").read_text(), re.M)
    assert pinned is not None
    snapshot = REPO.parent / "shared" / "easyedit-main" / "src" / "SNAPSHOT"
    if not snapshot.is_file():
        pytest.skip(f"no EasyEdit main snapshot at {snapshot}")
    assert pinned.group(1) in snapshot.read_text()


@pytest.mark.easyeditor
@needs_main
@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "AlphaEdit"])
def test_main_baselines_through_base_editor_on_the_testbed(
    alg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EasyEdit's own ROME / MEMIT / AlphaEdit, built from hparams/<alg>/testbed-llama.yaml, edit the shipped
    testbed through EasyEdit main's BaseEditor (sequential_edit=True) with the bundled statistics cache."""
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.lab.study.baselines import EasyEditMethod
    from ece_plugin.lab.study.common import load_model_and_tokenizer, snapshot_weights
    from ece_plugin.lab.study.runner import run_method

    monkeypatch.chdir(tmp_path)  # EasyEdit writes into the working directory (AlphaEdit's P); keep it here
    model, tok = load_model_and_tokenizer(TESTBED, device="cpu")
    records = load_records(COUNTERFACT, limit=4)
    method = EasyEditMethod(alg, REPO / "hparams" / alg / "testbed-llama.yaml", via="BaseEditor",
                            overrides={"stats_dir": str(REPO / "data" / "stats")})
    assert method.availability(model) == (True, "")
    names = method.edited_weight_names(model)
    before = snapshot_weights(model, names)
    seen: list[bool] = []
    real = method.edit_batch

    def edit_batch(model: Any, tok: Any, requests: Any) -> Any:
        outcome = real(model, tok, requests)
        seen.append(any(not torch.equal(model.get_parameter(n), before[n]) for n in names))
        return outcome

    monkeypatch.setattr(method, "edit_batch", edit_batch)
    run = run_method(method, model, tok, records, batch_size=4, eval_kwargs={"generation": False}, progress=False)
    assert run.available, run.reason
    assert run.via == ("BaseEditor.edit" if alg == "ROME" else "BaseEditor.batch_edit")
    assert seen == [True]  # BaseEditor kept the batch's edit (sequential_edit=True) ...
    assert all(torch.equal(model.get_parameter(n), before[n]) for n in names)  # ... and the run restored it
    summary = run.result.summary
    assert summary["efficacy"]["n"] == 4 and run.result.pre_summary["efficacy"]["mean"] == 0.0
    assert summary["efficacy"]["mean"] >= 0.75, summary  # the testbed's known pre-edit facts were rewritten
    assert run.batch_seconds and run.batch_seconds[0] > 0
    assert not list(tmp_path.rglob("null_space_project.pt"))  # AlphaEdit's P went to a private file
    assert {p.name for p in tmp_path.iterdir()} <= {"logs"}  # BaseEditor's own logs/run.log, results.json


@pytest.mark.easyeditor
@needs_main
def test_main_layer_stats_reads_the_bundled_statistics() -> None:
    """EasyEdit main's own layer_stats finds the testbed's statistics cache (no corpus pass, no download)."""
    from ece_plugin.lab.study.common import load_model_and_tokenizer

    layer_stats = ee.import_easyedit("easyeditor.models.rome.layer_stats").layer_stats
    model, tok = load_model_and_tokenizer(TESTBED, device="cpu")
    layer = "model.layers.0.mlp.down_proj"
    stats_dir = REPO / "data" / "stats"
    npz = stats_dir / "testbed-llama" / "wikitext-2-raw_stats" / f"{layer}_float32_mom2_1000.npz"

    class HP:  # what EasyEdit's get_cov passes along
        device = "cpu"

    stat = layer_stats(model, tok, layer, str(stats_dir), "wikitext-2-raw", to_collect=["mom2"], sample_size=1000,
                       precision="float32", hparams=HP())
    with np.load(npz) as data:
        expected = torch.from_numpy(data["mom2.mom2"] / float(data["mom2.count"]))
    torch.testing.assert_close(stat.mom2.moment().double(), expected.double(), rtol=1e-6, atol=1e-8)


@pytest.mark.easyeditor
@needs_main
def test_run_ece_editing_example_end_to_end(tmp_path: Path) -> None:
    """examples/run_ECE_editing.py with the shipped ECE hparams: ECE through BaseEditor on the testbed, sequential
    edits, EasyEdit's metrics written and summarised. It runs in a temporary folder (EasyEdit's summary_metrics
    writes ./logs there), so the hparams' paths, relative to the repository root, are made absolute."""
    import yaml

    config = yaml.safe_load((REPO / "hparams" / "ECE" / "testbed-llama.yaml").read_text())
    config.update(model_name=str(TESTBED), stats_dir=str(REPO / "data" / "stats"))
    hparams = tmp_path / "testbed-llama.yaml"
    hparams.write_text(yaml.safe_dump(config))
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(REPO / "examples" / "run_ECE_editing.py"), "--editing_method", "ECE", "--hparams_dir",
           str(hparams), "--data_dir", str(REPO / "data" / "counterfact"), "--data_type", "counterfact",
           "--ds_size", "3", "--sequential_edit", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert [f.name for f in files] == ["testbed-llama_ECE_N=3_Sequential=True.json"]
    metrics = json.loads(files[0].read_text())
    assert len(metrics) == 3 and all("pre" in m and "post" in m for m in metrics)
    post = [float(np.mean(m["post"]["rewrite_acc"])) for m in metrics]
    pre = [float(np.mean(m["pre"]["rewrite_acc"])) for m in metrics]
    assert sum(post) > sum(pre), (pre, post)
    assert "rewrite_acc" in proc.stdout  # EasyEdit's summary_metrics printed its table
