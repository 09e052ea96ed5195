"""Generation metrics of CounterFact: fluency (n-gram entropy) and consistency (reference score).

Fluency follows ROME/MEMIT's ``n_gram_entropy``: for each generated text, the entropies (bits) of its
word 2-gram and 3-gram frequency distributions are weighted by 2/3 and 4/3 and averaged (``agg='arith'``,
or the geometric mean with ``agg='geom'``); a case's fluency is the mean over its texts. ROME splits words
with ``nltk.word_tokenize``, which needs NLTK's downloadable ``punkt`` data; :func:`word_tokenize` here is a
dependency-free Penn-Treebank-style splitter (words, numbers, clitics such as ``'s``/``n't``, each
punctuation mark) that gives the same tokens on ordinary English text.

Consistency (ROME's "reference score") is the TF-IDF cosine similarity between the concatenated generated
texts and the concatenated Wikipedia snippets about other subjects sharing the new attribute
(``attribute_snippets.json``), with the IDF table and vocabulary ROME ships (``idf.npy``,
``tfidf_vocab.json``). It is computed only when those three files are supplied
(:class:`ConsistencyResources`); otherwise it is unavailable (None).

Generation is greedy by default (``GenerationConfig.do_sample=False``); ROME samples with top-k 5, which
``GenerationConfig(do_sample=True, top_k=5)`` reproduces (seeded, without touching the global RNG state).
As in ROME, the measured text includes the prompt (``include_prompt=True``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .scoring import EvaluationError, model_device, pad_token_id

logger = logging.getLogger(__name__)

CONSISTENCY_FILES = ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
CONSISTENCY_UNAVAILABLE = "n/a (needs attribute_snippets.json, idf.npy, tfidf_vocab.json)"

_WORD_RE = re.compile(
    r"""
    \.\.\.                                   # ellipsis
    | \d+(?:[.,:]\d+)+                       # numbers with separators: 3.14, 1,000, 12:30
    | [^\W_]+(?=n't\b)                       # stem before n't (do|n't)
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b                  # clitics
    | [^\W_]+(?:-[^\W_]+)*                   # words, hyphenated words
    | \S                                     # any other single character (punctuation)
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into Penn-Treebank-like word tokens (see the module docstring)."""
    return _WORD_RE.findall(text)


def ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``tokens`` (0.0 when there is no n-gram)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return float(-sum((c / total) * math.log2(c / total) for c in counts.values()))


def compute_n_gram_entropy(
    text: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
    agg: str = "arith",
) -> float:
    """ROME's weighted n-gram entropy of one text: mean (or geometric mean) of ``weights[i] * H_{ns[i]}``."""
    if len(ns) != len(weights):
        raise ValueError(f"{len(ns)} n-gram orders but {len(weights)} weights")
    if agg not in ("arith", "geom"):
        raise ValueError(f"agg must be 'arith' or 'geom', got {agg!r}")
    tokens = word_tokenize(text)
    weighted = [w * ngram_entropy_bits(tokens, n) for n, w in zip(ns, weights)]
    if agg == "arith":
        return float(np.mean(weighted))
    if any(v <= 0 for v in weighted):
        return 0.0
    return float(np.exp(np.mean(np.log(weighted))))


def n_gram_entropy(texts: Sequence[str], agg: str = "arith") -> float:
    """Mean (or geometric mean) over ``texts`` of :func:`compute_n_gram_entropy`."""
    if not texts:
        raise ValueError("n_gram_entropy needs at least one text")
    values = [compute_n_gram_entropy(t, agg=agg) for t in texts]
    if agg == "arith":
        return float(np.mean(values))
    if any(v <= 0 for v in values):
        return 0.0
    return float(np.exp(np.mean(np.log(values))))


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationConfig:
    """How texts are generated for the fluency/consistency metrics."""

    max_new_tokens: int = 50
    do_sample: bool = False
    top_k: int = 5
    seed: int = 0
    batch_size: int = 16
    include_prompt: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model: torch.nn.Module, tok: Any, prompts: Sequence[str], config: Optional[GenerationConfig] = None
) -> list[str]:
    """Generate one continuation per prompt (left-padded batches built here; the tokenizer is untouched)."""
    config = config or GenerationConfig()
    device = model_device(model)
    pad = pad_token_id(tok)
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), config.batch_size):
            chunk = list(prompts[start : start + config.batch_size])
            texts.extend(_generate_chunk(model, tok, chunk, config, pad, device))
    finally:
        model.train(was_training)
    return texts


def _generate_chunk(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    config: GenerationConfig,
    pad: int,
    device: torch.device,
) -> list[str]:
    encoded = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        if not ids:
            raise EvaluationError(f"generation prompt {prompt!r} has no tokens")
        encoded.append([int(i) for i in ids])
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    kwargs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "max_new_tokens": config.max_new_tokens,
        "pad_token_id": pad,
        "do_sample": config.do_sample,
    }
    if config.do_sample:
        kwargs["top_k"] = config.top_k
    else:  # silence "temperature/top_p set but do_sample=False" warnings from the model's generation config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        output = model.generate(**kwargs)  # type: ignore[operator]
    texts = []
    for row, prompt in enumerate(prompts):
        continuation = tok.decode(output[row, width:].tolist(), skip_special_tokens=True)
        texts.append(_clean(prompt + continuation if config.include_prompt else continuation))
    return texts


# ---------------------------------------------------------------------------------------------- consistency
_TFIDF_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn TfidfVectorizer's default token_pattern


@dataclass
class ConsistencyResources:
    """ROME's attribute snippets and TF-IDF statistics for the consistency (reference score) metric."""

    snippets: dict[str, dict[str, list[dict[str, Any]]]]
    idf: np.ndarray
    vocab: dict[str, int]

    @classmethod
    def load(
        cls,
        snippets_path: Union[str, Path],
        idf_path: Union[str, Path],
        vocab_path: Union[str, Path],
    ) -> ConsistencyResources:
        """Read ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json``."""
        for path in (snippets_path, idf_path, vocab_path):
            if not Path(path).is_file():
                raise FileNotFoundError(f"consistency resource not found: {path}")
        with open(snippets_path, encoding="utf-8") as f:
            raw = json.load(f)
        grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for i, entry in enumerate(raw):
            try:
                rid, tid, samples = str(entry["relation_id"]), str(entry["target_id"]), entry["samples"]
            except (KeyError, TypeError) as exc:
                raise EvaluationError(
                    f"{snippets_path}: entry {i} lacks relation_id/target_id/samples"
                ) from exc
            grouped[rid][tid].extend(samples)
        snippets = {rid: dict(targets) for rid, targets in grouped.items()}
        idf = np.load(idf_path)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = {str(k): int(v) for k, v in json.load(f).items()}
        if vocab and max(vocab.values()) >= len(idf):
            raise EvaluationError(
                f"{vocab_path}: vocabulary index {max(vocab.values())} >= {len(idf)} IDF entries"
            )
        return cls(snippets=snippets, idf=idf, vocab=vocab)

    @classmethod
    def from_dir(cls, directory: Union[str, Path]) -> ConsistencyResources:
        """Load the three files from one folder."""
        d = Path(directory)
        return cls.load(*(d / name for name in CONSISTENCY_FILES))

    def reference_texts(self, relation_id: str, target_id: str) -> list[str]:
        return [s["text"] for s in self.snippets.get(relation_id, {}).get(target_id, [])]

    def tfidf_vector(self, text: str) -> np.ndarray:
        """L2-normalised TF-IDF vector (raw counts times IDF), as scikit-learn's TfidfVectorizer computes."""
        vec = np.zeros(len(self.idf), dtype=np.float64)
        for word in _TFIDF_TOKEN_RE.findall(text.lower()):
            index = self.vocab.get(word)
            if index is not None:
                vec[index] += 1.0
        vec *= self.idf
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def similarity(self, text_a: str, text_b: str) -> float:
        """TF-IDF cosine similarity of two texts (0.0 when either has no known word)."""
        return float(np.dot(self.tfidf_vector(text_a), self.tfidf_vector(text_b)))

    def consistency(self, generated: Sequence[str], relation_id: str, target_id: str) -> Optional[float]:
        """Reference score of one case, or None when there are no snippets for (relation, new target)."""
        references = self.reference_texts(relation_id, target_id)
        if not references:
            return None
        return self.similarity(" ".join(generated), " ".join(references))
