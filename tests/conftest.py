"""Shared fixtures: a word-level tokenizer, tiny Llama / GPT-2 models, ECE hparams, and a fake statistics cache.

The tokenizer is word-level with Metaspace pre-tokenization (every word is one token "▁word", a leading space is
kept on decode), so subjects and targets tokenize cleanly and MEMIT's "prompt + decode(target[:-1])" works.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import pytest
import torch
from torch import nn

from ece_plugin.method.hparams import ECEHyperParams

WORDS = (
    "the a of is in was and to city capital country language speaks born located plays sport team "
    "Paris London Rome Berlin Madrid Tokyo France England Italy Germany Spain Japan French English Italian "
    "German Spanish Japanese Eiffel Tower Colosseum Big Ben Danny Green Marie Curie Lionel Messi soccer "
    "basketball tennis chess New York Toronto Canada works at for plays. Therefore Because I You The It "
    "river mountain famous known home native"
).split()

CORPUS = [
    "Paris is the capital of France",
    "London is the capital of England",
    "Rome is the capital of Italy",
    "The Eiffel Tower is located in Paris",
    "The Colosseum is located in Rome",
    "Danny Green plays basketball",
    "Lionel Messi plays soccer",
    "Marie Curie was born in Poland",
    "Berlin is the capital of Germany and a famous city",
    "Tokyo is the capital of Japan",
]

FACTS = [  # subjects end the prompt, so a tiny random model can be steered to the target at that token
    {
        "prompt": "The capital of {}",
        "subject": "France",
        "target_new": "Rome",
        "ground_truth": "Paris",
        "case_id": 0,
    },
    {
        "prompt": "The sport of Danny Green",
        "subject": "Danny Green",
        "target_new": "chess",
        "ground_truth": "basketball",
        "case_id": 1,
    },
    {
        "prompt": "The city of the Eiffel Tower",
        "subject": "Eiffel Tower",
        "target_new": {"str": "Tokyo"},
        "ground_truth": "Paris",
        "case_id": 2,
    },
    {
        "prompt": "The language of Lionel Messi",
        "subject": "Lionel Messi",
        "target_new": "German",
        "ground_truth": "Spanish",
        "case_id": 3,
    },
]


def make_tokenizer(bos: bool = True) -> Any:
    """The word-level tokenizer; ``bos=False`` adds no BOS token (as GPT-2's), so a prompt can start with its
    subject's last token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault("▁" + w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    t.decoder = decoders.Replace("▁", " ")
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Any:
    """``ece_plugin.lab.cli.main`` points the root logger at the stderr of its test (basicConfig, force=True), a capture
    stream closed when that test ends: give every test the root handlers it found, so that no later test logs
    into a closed stream ("--- Logging error ---" in its stderr)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _easyedit_line_in_report(record_testsuite_property: Any) -> None:
    """Record, in the JUnit report (`make test` writes one per environment), which EasyEdit line, transformers and
    torch this suite ran under; .ci/test_summary.py prints them. A no-op without --junitxml."""
    from pathlib import Path

    import transformers

    from ece_plugin import easyedit

    line = easyedit.easyedit_version()
    record_testsuite_property("easyedit_line", line or "none")
    record_testsuite_property("transformers", transformers.__version__)
    record_testsuite_property("torch", torch.__version__)
    if line is not None:
        package = easyedit.import_easyedit("easyeditor")
        record_testsuite_property("easyeditor_path", str(Path(str(package.__file__)).resolve().parent.parent))


@pytest.fixture(scope="session")
def tok() -> Any:
    return make_tokenizer()


def make_llama(
    vocab_size: int, hidden: int = 32, d_ff: int = 48, layers: int = 3, seed: int = 0
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(
    vocab_size: int, hidden: int = 32, d_ff: int = 64, layers: int = 3, seed: int = 0, **config_kwargs: Any
) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        **config_kwargs,
        vocab_size=vocab_size,
        n_embd=hidden,
        n_inner=d_ff,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama(tok: Any) -> nn.Module:
    return make_llama(len(tok))


@pytest.fixture
def gpt2(tok: Any) -> nn.Module:
    return make_gpt2(len(tok))


LLAMA_TMPS = dict(
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp",
    attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm",
    lm_head_module="lm_head",
)
GPT2_TMPS = dict(
    rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
    layer_module_tmp="transformer.h.{}",
    mlp_module_tmp="transformer.h.{}.mlp",
    attn_module_tmp="transformer.h.{}.attn",
    ln_f_module="transformer.ln_f",
    lm_head_module="transformer.wte",
)


def make_hparams(family: str = "llama", **overrides: Any) -> ECEHyperParams:
    values: dict[str, Any] = dict(
        model_name=f"tiny-{family}",
        layers=[0, 1],
        attribution="AS",
        neuron_threshold=0.8,
        clustering=True,
        n_clusters=None,
        cluster_ratio=0.5,
        v_num_grad_steps=20,
        shared_grad_steps=15,
        per_edit_grad_steps=5,
        v_lr=0.5,
        v_loss_layer=-1,
        v_weight_decay=0.5,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
        context_template_length_params=[],
        mom2_update_weight=10.0,
        mom2_n_samples=100,
        device="cpu",
    )
    values.update(LLAMA_TMPS if family == "llama" else GPT2_TMPS)
    values.update(overrides)
    return ECEHyperParams(**values)


def second_moment(model: nn.Module, tok: Any, layer_name: str, lines: Sequence[str] = CORPUS) -> torch.Tensor:
    """E[k k^T] of the input of ``layer_name`` over all non-pad tokens of ``lines`` (float32, CPU)."""
    module = model.get_submodule(layer_name)
    got: list[torch.Tensor] = []
    enc = tok(list(lines), padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()

    def hook(_m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach()[mask].double())

    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        h.remove()
    k = torch.cat(got, 0)
    return (k.t() @ k / k.shape[0]).float()


class FakeStatistics:
    """The StatisticsCache interface over :func:`second_moment` (computed once per layer name)."""

    def __init__(self) -> None:
        self.moments: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[str, int]] = []

    def second_moment(self, model: nn.Module, tok: Any, layer_name: str, hparams: Any) -> torch.Tensor:
        if layer_name not in self.moments:
            self.moments[layer_name] = second_moment(model, tok, layer_name)
        return self.moments[layer_name]

    def masked(
        self,
        model: nn.Module,
        tok: Any,
        layer_name: str,
        hparams: Any,
        idx: torch.Tensor,
        device: Union[str, torch.device],
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        self.calls.append((layer_name, int(idx.numel())))
        c0 = self.second_moment(model, tok, layer_name, hparams)
        idx = idx.cpu()
        return c0[idx][:, idx].to(device=device, dtype=dtype)


def fake_session(model: nn.Module, hparams: Optional[ECEHyperParams] = None) -> Any:
    """A fresh EditSession on ``model`` whose statistics are :class:`FakeStatistics`."""
    from ece_plugin.method.state import get_session, reset_session

    reset_session(model)
    session = get_session(model, hparams)
    session.statistics = FakeStatistics()  # type: ignore[assignment]
    return session


def target_prob(model: nn.Module, tok: Any, prompt: str, target: str) -> float:
    """P(target tokens | prompt) under ``model`` (product over the target's tokens)."""
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    total = sum(float(lp[len(p_ids) - 1 + j, t]) for j, t in enumerate(t_ids))
    return float(torch.exp(torch.tensor(total)))


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interrupt_second_batch(monkeypatch: pytest.MonkeyPatch, method_class: Any) -> Any:
    """Make ``method_class.edit_batch`` raise KeyboardInterrupt on its second call; returns the original."""
    original = method_class.edit_batch
    calls = {"n": 0}

    def interrupted(self: Any, model: Any, tok: Any, requests: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, model, tok, requests)

    monkeypatch.setattr(method_class, "edit_batch", interrupted)
    return original


def lifelong_rows(out: Path) -> list[dict[str, Any]]:
    """The measured rows of every method of the lifelong run in ``out`` (each available), without their
    timings, which differ between a whole run and a resumed one."""
    data = json.loads((out / "lifelong.json").read_text())
    assert all(m["available"] for m in data["methods"]), data["methods"]
    found = [row for m in data["methods"] for row in m["rows"]]
    for row in found:
        row.pop("seconds_per_batch")
    return found
