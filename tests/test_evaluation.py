"""CounterFact / zsRE metrics, fluency and consistency on stub models with known logits and on a tiny Llama."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ece_plugin.evaluation import (
    ConsistencyResources,
    EvaluationError,
    GenerationConfig,
    compute_n_gram_entropy,
    evaluate_counterfact,
    evaluate_records,
    evaluate_zsre,
    generate_texts,
    metric_kind,
    n_gram_entropy,
    score_continuations,
    token_accuracy,
)
from ece_plugin.evaluation.data import EditRecord, bundled_data_path, load_counterfact
from ece_plugin.evaluation.fluency import word_tokenize
from ece_plugin.evaluation.scoring import encode_continuation

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]


# ---------------------------------------------------------------------------------------------- fixtures
def char_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character; optionally prepends <s> like Llama tokenizers."""
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE (no BOS) trained on a few sentences."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The mother tongue of Danielle Darrieux is French", "Paris is the capital of France"] * 20
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


class BigramStub(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.table[input_ids]

    def set(self, tok: Any, current: str, following: str, value: float) -> None:
        self.table[tok.convert_tokens_to_ids(current), tok.convert_tokens_to_ids(following)] = value


def record(prompt: str, subject: str, new: str, true: Optional[str] = None, **kw: Any) -> EditRecord:
    kind = kw.pop("kind", "plain")
    return EditRecord(
        case_id=kw.pop("case_id", 0),
        kind=kind,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        **kw,
    )


def _log_softmax_at(row: torch.Tensor, index: int) -> float:
    return float(torch.log_softmax(row, dim=-1)[index])


# ---------------------------------------------------------------------------------------------- scoring
def test_target_tokens_with_and_without_bos_are_the_same() -> None:
    with_bos, without_bos = char_tokenizer(bos=True), char_tokenizer(bos=False)
    ids_b, n_b = encode_continuation(with_bos, "ab", "xy")
    ids_n, n_n = encode_continuation(without_bos, "ab", "xy")
    assert ids_b[0] == 1 and ids_n[0] != 1
    assert n_b == n_n + 1  # BOS counted once, in the prompt
    assert ids_b[n_b:] == ids_n[n_n:] == with_bos.convert_tokens_to_ids([" ", "x", "y"])

    model = BigramStub(len(with_bos))
    model.set(with_bos, " ", "x", 2.0)
    nll_b = score_continuations(model, with_bos, ["ab"], ["xy"])[0].nll
    nll_n = score_continuations(model, without_bos, ["ab"], ["xy"])[0].nll
    assert nll_b == pytest.approx(nll_n, abs=1e-6)


def test_byte_level_bpe_target_tokens_match_space_prefixed_target() -> None:
    tok = byte_bpe_tokenizer()
    ids, n_prompt = encode_continuation(tok, "The mother tongue of Danielle Darrieux is", "French")
    assert ids[n_prompt:] == tok(" French")["input_ids"]


def test_exact_nll_on_stub_logits() -> None:
    tok = char_tokenizer()
    vocab = len(tok)
    model = BigramStub(vocab)
    model.set(tok, " ", "x", 3.0)
    (score,) = score_continuations(model, tok, ["ab"], ["x"])
    # target tokens: ' ' after 'b' (uniform row) and 'x' after ' ' (logit 3 among zeros)
    expected = (math.log(vocab) + (math.log(vocab - 1 + math.exp(3.0)) - 3.0)) / 2
    assert score.nll == pytest.approx(expected, rel=1e-6)
    assert score.n_tokens == 2


def test_counterfact_nll_comparison_picks_the_right_side() -> None:
    tok = char_tokenizer()
    model = BigramStub(len(tok))
    rec = record(
        "Ann plays",
        "Ann",
        "x",
        "y",
        paraphrase_prompts=["Ann, who plays"],
        neighborhood_prompts=["Bob plays", "Cy plays"],
        neighborhood_answers=["y", "y"],
    )
    model.set(tok, " ", "x", 3.0)  # every prompt now prefers the new target
    (case,) = evaluate_counterfact(model, tok, [rec], generation=False)
    assert case["efficacy"] == 1.0 and case["generalization"] == 1.0 and case["specificity"] == 0.0
    p_new = math.exp(-case["details"]["rewrite_prompts_probs"][0]["target_new"])
    p_true = math.exp(-case["details"]["rewrite_prompts_probs"][0]["target_true"])
    assert case["efficacy_magnitude"] == pytest.approx(p_new - p_true)
    assert case["specificity_magnitude"] == pytest.approx(p_true - p_new)
    assert case["fluency"] is None and case["consistency"] is None

    model.set(tok, " ", "y", 5.0)  # now the true target wins everywhere
    (case,) = evaluate_counterfact(model, tok, [rec], generation=False)
    assert case["efficacy"] == 0.0 and case["generalization"] == 0.0 and case["specificity"] == 1.0
    assert case["efficacy_magnitude"] < 0 < case["specificity_magnitude"]


def test_left_padding_tokenizer_gives_same_scores_and_is_restored() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    prompts, targets = ["Ann plays the", "B is", "Cyrano de Bergerac was born in"], ["piano", "x", "Paris"]
    right = [s.nll for s in score_continuations(model, tok, prompts, targets, batch_size=3)]
    tok.padding_side = "left"
    left = [s.nll for s in score_continuations(model, tok, prompts, targets, batch_size=3)]
    assert tok.padding_side == "left"
    assert left == pytest.approx(right, abs=1e-6)


def test_batched_scoring_equals_one_by_one_on_tiny_llama() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    prompts = ["Ann plays the", "B is", "Cyrano de Bergerac was born in", "Danielle speaks"]
    targets = ["piano", "x", "Paris", "French"]
    one = score_continuations(model, tok, prompts, targets, batch_size=1)
    many = score_continuations(model, tok, prompts, targets, batch_size=4)
    assert [s.nll for s in many] == pytest.approx([s.nll for s in one], abs=1e-5)
    assert [s.predicted_ids for s in many] == [s.predicted_ids for s in one]


def test_empty_target_and_mismatched_lengths_raise() -> None:
    tok = char_tokenizer()
    with pytest.raises(EvaluationError, match="empty target"):
        encode_continuation(tok, "ab", " ")
    with pytest.raises(EvaluationError, match="2 prompts but 1 targets"):
        score_continuations(BigramStub(len(tok)), tok, ["a", "b"], ["x"])


# ---------------------------------------------------------------------------------------------- zsRE
def _zsre_stub(tok: PreTrainedTokenizerFast) -> BigramStub:
    model = BigramStub(len(tok))
    model.set(tok, "b", " ", 1.0)  # ' ' follows 'b'
    model.set(tok, " ", "x", 1.0)  # 'x' follows ' '
    model.set(tok, "x", "z", 1.0)  # 'z' (not 'y') follows 'x'
    return model


def test_token_accuracy_exact_fraction() -> None:
    tok = char_tokenizer()
    model = _zsre_stub(tok)
    # targets ' ', 'x', 'y' predicted after 'b', ' ', 'x': correct, correct, wrong
    assert token_accuracy(model, tok, ["ab"], ["xy"]) == [pytest.approx(2 / 3)]
    assert token_accuracy(model, tok, ["ab"], ["xz"]) == [pytest.approx(1.0)]
    assert token_accuracy(model, tok, ["ac"], ["xz"]) == [pytest.approx(2 / 3)]  # ' ' after 'c' is wrong


def test_evaluate_zsre_metrics_and_locality_agreement() -> None:
    tok = char_tokenizer()
    model = _zsre_stub(tok)
    rec = record(
        "ab",
        "a",
        "xy",
        "q",
        kind="zsre",
        paraphrase_prompts=["cb", "cd"],
        neighborhood_prompts=["nq question: d"],
        neighborhood_answers=["xz"],
    )
    (pre,) = evaluate_zsre(model, tok, [rec])
    assert pre["efficacy"] == pytest.approx(2 / 3)
    assert pre["generalization"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # mean over paraphrases
    # neighbourhood prompt is 'nq question: d?': ' ' after '?' wrong, 'x' and 'z' right
    assert pre["specificity"] == pytest.approx(2 / 3)
    assert pre["locality_agreement"] is None

    model.set(tok, "x", "y", 2.0)  # the "edit": now 'y' follows 'x'
    (post,) = evaluate_zsre(model, tok, [rec], reference=[pre])
    assert post["efficacy"] == pytest.approx(1.0)
    assert post["specificity"] == pytest.approx(1 / 3)
    # predictions on the 3 neighbourhood target positions: same, same, changed ('z' -> 'y')
    assert post["locality_agreement"] == pytest.approx(2 / 3)


def test_metric_kind_dispatch() -> None:
    tok = char_tokenizer()
    model = _zsre_stub(tok)
    no_truth = record("ab", "a", "xy")
    assert metric_kind([no_truth]) == "zsre"
    assert metric_kind([record("ab", "a", "xy", "q")]) == "counterfact"
    (case,) = evaluate_records(model, tok, [no_truth])
    assert case["efficacy"] == pytest.approx(2 / 3)
    with pytest.raises(EvaluationError, match="different kinds"):
        metric_kind([no_truth, record("ab", "a", "xy", "q", kind="zsre", case_id=1)])
    with pytest.raises(EvaluationError, match="has no target_true"):
        evaluate_counterfact(model, tok, [no_truth], generation=False)


# ---------------------------------------------------------------------------------------------- fluency
def test_n_gram_entropy_hand_computed() -> None:
    # tokens a b a b: bigrams ab x2, ba x1 -> H2 = log2(3) - 2/3; trigrams aba, bab -> H3 = 1
    h2 = math.log2(3) - 2 / 3
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert compute_n_gram_entropy("a b a b") == pytest.approx(expected)
    assert compute_n_gram_entropy("the the the the the the") == 0.0
    varied = "Paris is the capital of France, and Rome is the capital of Italy."
    assert compute_n_gram_entropy(varied) > compute_n_gram_entropy("the cat the cat the cat the cat")
    assert n_gram_entropy(["a b a b", "x x x"]) == pytest.approx(expected / 2)
    assert compute_n_gram_entropy("a b a b", agg="geom") == pytest.approx(math.sqrt(2 / 3 * h2 * 4 / 3))


def test_word_tokenize_matches_nltk_treebank_on_sentences() -> None:
    nltk_tokenize = pytest.importorskip("nltk.tokenize")
    sentences = [
        "He didn't say it's John's, did he?",
        "The population was 3,500 in 1999; it grew to 4.5 million.",
        "Danielle Darrieux's mother tongue is French.",
        "A well-known fact: they'll go (maybe) and we've seen it!",
    ]
    for sentence in sentences:
        assert word_tokenize(sentence) == nltk_tokenize.NLTKWordTokenizer().tokenize(sentence), sentence


def test_generate_texts_greedy_deterministic_and_mode_restored() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    model.train()
    prompts = ["Ann plays the", "B"]
    config = GenerationConfig(max_new_tokens=6)
    first = generate_texts(model, tok, prompts, config)
    assert model.training
    assert generate_texts(model, tok, prompts, config) == first
    for prompt, text in zip(prompts, first):
        assert text.startswith(prompt) and 0 < len(text) - len(prompt) <= 6
    only_new = generate_texts(model, tok, prompts, GenerationConfig(max_new_tokens=6, include_prompt=False))
    assert [p + t for p, t in zip(prompts, only_new)] == first
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, seed=3)
    assert generate_texts(model, tok, prompts, sampled) == generate_texts(model, tok, prompts, sampled)


# ---------------------------------------------------------------------------------------------- consistency
def _write_consistency_files(tmp_path: Path) -> tuple[dict[str, int], np.ndarray]:
    vocab = {"piano": 0, "music": 1, "plays": 2, "football": 3, "concert": 4}
    idf = np.array([2.0, 1.5, 1.0, 2.5, 3.0])
    snippets = [
        {
            "relation_id": "P1303",
            "target_id": "Q5994",
            "samples": [{"name": "Someone", "text": "She plays piano music at a concert."}],
        }
    ]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets), encoding="utf-8")
    np.save(tmp_path / "idf.npy", idf)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return vocab, idf


def test_tfidf_similarity_matches_scikit_learn(tmp_path: Path) -> None:
    text_mod = pytest.importorskip("sklearn.feature_extraction.text")
    vocab, idf = _write_consistency_files(tmp_path)
    resources = ConsistencyResources.from_dir(tmp_path)
    vec = text_mod.TfidfVectorizer(vocabulary=vocab)
    vec.fit(["piano"])
    vec.idf_ = idf
    a, b = "Piano piano music, plays football!", "A concert of piano music."
    enc = vec.transform([a, b]).toarray()
    expected = float(enc[0] @ enc[1] / np.linalg.norm(enc[0]) / np.linalg.norm(enc[1]))
    assert resources.similarity(a, b) == pytest.approx(expected)
    assert resources.consistency([a], "P1303", "Q5994") == pytest.approx(
        resources.similarity(a, "She plays piano music at a concert.")
    )
    assert resources.consistency([a], "P1303", "Q0") is None


def test_counterfact_consistency_only_with_resources_and_ids(tmp_path: Path) -> None:
    _write_consistency_files(tmp_path)
    resources = ConsistencyResources.from_dir(tmp_path)
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    rome = record(
        "Ann plays the",
        "Ann",
        "piano",
        "guitar",
        kind="counterfact",
        generation_prompts=["Ann is known for"],
        meta={"relation_id": "P1303", "target_new_id": "Q5994"},
    )
    no_ids = record("Bob plays the", "Bob", "piano", "guitar", kind="counterfact", case_id=1)
    config = GenerationConfig(max_new_tokens=5)
    with_res = evaluate_counterfact(model, tok, [rome, no_ids], generation=config, consistency=resources)
    assert with_res[0]["consistency"] is not None and 0.0 <= with_res[0]["consistency"] <= 1.0
    assert with_res[1]["consistency"] is None
    without = evaluate_counterfact(model, tok, [rome], generation=config)
    assert without[0]["consistency"] is None
    assert without[0]["fluency"] == pytest.approx(n_gram_entropy(without[0]["details"]["generated_texts"]))


def test_counterfact_on_bundled_rome_records_is_self_consistent() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    records = load_counterfact(bundled_data_path("counterfact-rome"), limit=2)
    cases = evaluate_counterfact(model, tok, records, generation=GenerationConfig(max_new_tokens=4))
    for rec, case in zip(records, cases):
        details = case["details"]
        assert len(details["paraphrase_prompts_probs"]) == len(rec.paraphrase_prompts) == 2
        assert len(details["neighborhood_prompts_probs"]) == len(rec.neighborhood_prompts) == 10
        assert len(details["generated_texts"]) == len(rec.generation_prompts)
        nb = details["neighborhood_prompts_probs"]
        assert case["specificity"] == pytest.approx(np.mean([p["target_true"] < p["target_new"] for p in nb]))
        rw = details["rewrite_prompts_probs"][0]
        assert case["efficacy"] == float(rw["target_new"] < rw["target_true"])
    json.dumps(cases)  # JSON-serialisable
