"""The statistics corpus of a testbed: its own kind of text, about facts no evaluation scores.

MEMIT-family methods protect what a model knows through ``C0 = E[k k^T]`` over text like the model's pretraining
text (Wikipedia for GPT-J or Llama). A testbed's pretraining text is mostly fact sentences (90 % of its
sequences) and only 10 % WikiText-2, so WikiText-2 alone describes the keys of the text it knows poorly. This
module samples the testbed's own text distribution (the same sampler, templates, prefixes and WikiText share, read
from its manifest) over a *held-out* fact world: CounterFact records from ``counterfact_offset`` on (past every
record the testbed trained on and the never-trained records that pre-edit checks read) and the zsRE records it
did not train on, with their true answers. So the covariance sees the testbed's kind of text without seeing any
fact an edit, a paraphrase, a neighbourhood prompt or a retention probe scores.

The corpus is a text file in the model directory, ``<model>/<name>.txt`` (one sampled sequence per line); hparams
select it with ``mom2_dataset: <name>`` (:func:`ece_plugin.method.statistics.corpus_files`), which EasyEdit's own
ROME / MEMIT / AlphaEdit also read as the name of their statistics folder, so every method on the testbed gets the
same statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ...method import atomic
from .builder import MANIFEST_NAME, REPO_ROOT
from .facts import SamplerConfig, SequenceSampler, TestbedDataError, build_fact_world

logger = logging.getLogger(__name__)

DEFAULT_NAME = "factworld"
DEFAULT_COUNTERFACT_OFFSET = 7000  # past the trained records and the never-trained checks at 5000-5199
TEXT_CHARS = 200  # the length the builder's tokenizer corpus samples (about one training sequence)


@dataclass(frozen=True)
class CorpusConfig:
    """What :func:`statistics_corpus` samples."""

    n_texts: int = 3000
    seed: int = 1
    counterfact_offset: int = DEFAULT_COUNTERFACT_OFFSET


def _data_path(value: Optional[str]) -> Optional[Path]:
    """A manifest path: as written when it exists from here, else relative to the repository."""
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def read_manifest_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise TestbedDataError(f"{model_dir} has no {MANIFEST_NAME}: a statistics corpus needs a testbed's manifest")
    return dict(json.loads(path.read_text(encoding="utf-8"))["config"])


def statistics_corpus(model_dir: Path, config: CorpusConfig = CorpusConfig()) -> list[str]:
    """``config.n_texts`` sequences of the testbed's text distribution over its held-out fact world."""
    c = read_manifest_config(model_dir)
    if config.n_texts < 1:
        raise TestbedDataError(f"n_texts must be >= 1, got {config.n_texts}")
    trained = int(c["n_records"])
    if config.counterfact_offset < trained:
        raise TestbedDataError(
            f"counterfact_offset {config.counterfact_offset} would include records the testbed trained on "
            f"(0-{trained - 1})"
        )
    counterfact = _data_path(c["counterfact_path"])
    assert counterfact is not None
    n_available = len(json.loads(counterfact.read_text(encoding="utf-8"))) - config.counterfact_offset
    if n_available < 1:
        raise TestbedDataError(f"{counterfact} has no records from {config.counterfact_offset} on")
    zsre = _data_path(c.get("zsre_path"))
    zsre_trained = int(c.get("n_zsre") or 0)
    n_zsre = len(json.loads(zsre.read_text(encoding="utf-8"))) - zsre_trained if zsre and zsre.is_file() else 0
    world = build_fact_world(
        counterfact_path=counterfact,
        n_records=min(trained, n_available),
        counterfact_val_path=None,
        n_val_records=0,
        rome_format_path=_data_path(c.get("rome_format_path")),
        zsre_path=zsre if n_zsre > 0 else None,
        n_zsre=max(n_zsre, 0),
        wiki_paths=[p for p in (_data_path(w) for w in c["wiki_paths"]) if p is not None],
        zsre_relations=bool(c.get("zsre_relations", False)),
        counterfact_offset=config.counterfact_offset,
        zsre_offset=zsre_trained,
    )
    # the manifest stores the sampler's fields (older manifests lack the newer ones, which keep their defaults)
    stored = {f.name: c["sampler"][f.name] for f in dataclasses.fields(SamplerConfig) if f.name in c["sampler"]}
    stored["prefix_words"] = tuple(stored.get("prefix_words", SamplerConfig.prefix_words))
    sampler_config = SamplerConfig(**stored)
    sampler = SequenceSampler(world, sampler_config, seed=config.seed)
    return [" ".join(text.split()) for text in sampler.texts(config.n_texts, TEXT_CHARS)]


def corpus_path(model_dir: Path, name: str = DEFAULT_NAME) -> Path:
    return Path(model_dir) / f"{name}.txt"


def write_statistics_corpus(
    model_dir: Path, name: str = DEFAULT_NAME, config: CorpusConfig = CorpusConfig(), force: bool = False
) -> Path:
    """Write the corpus to ``<model>/<name>.txt`` atomically. An existing different file is kept (and an error
    raised) unless ``force``; an identical one is left as it is."""
    if not name or "/" in name or name == "wikipedia":
        raise TestbedDataError(f"corpus name {name!r}: a plain file name other than 'wikipedia' is needed")
    text = "\n".join(statistics_corpus(model_dir, config)) + "\n"
    path = corpus_path(model_dir, name)
    if path.is_file():
        if path.read_text(encoding="utf-8") == text:
            logger.info("%s is already this corpus", path)
            return path
        if not force:
            raise TestbedDataError(f"{path} exists with other text; pass --force to replace it")
    atomic.write_text(path, text)
    logger.info("statistics corpus: %d texts, %d characters in %s", config.n_texts, len(text), path)
    return path
