"""Covariance statistics ``C0 = E[k k^T]`` of MLP keys, from a local corpus, cached in EasyEdit's layout.

The keys ``k`` are the input of the MLP down/out projection ``hparams.rewrite_module_tmp.format(layer)``
(Llama ``mlp.down_proj``, an ``nn.Linear``; GPT-2 ``mlp.c_proj``, a ``Conv1D``): the ``d_ff``-dimensional
hidden activations. The second moment is averaged over every (non-padding) token of the corpus.

Corpus: the statistics set ``mom2_dataset`` names, and nothing else.

* ``mom2_corpus`` set: that text file, or the ``*.txt`` / ``*.raw`` files of that folder in sorted order, cached
  under the name ``mom2_dataset`` gives it, except EasyEdit's own corpus names (``wikipedia``, ``wikitext``:
  :data:`EASYEDIT_DATASETS`), which a local text is never filed under (EasyEdit would read it as theirs): then
  under the file's stem or the folder's name.
* ``mom2_dataset: wikitext-2-raw``: the bundled WikiText-2 (``data/wikitext-2-raw/wiki.valid.raw`` then
  ``wiki.test.raw``), :data:`BUNDLED_CORPORA`.
* ``<model folder>/<mom2_dataset>.txt`` when the model folder holds one (a testbed's corpus, ``ece-plugin
  stats-corpus``).
* Else (``wikipedia``, EasyEdit's default) ECE cannot compute the set itself: it reads the cache file EasyEdit
  computed or shipped, and without one stops with :class:`StatisticsUnavailableError`, which says where the file
  goes and how to supply it. Only ``mom2_fallback_corpus`` (a bundled corpus name or a path) makes it compute
  from another corpus, and that result is cached under the FALLBACK's name and sample count, so that no reader,
  EasyEdit's MEMIT and AlphaEdit included, takes it for the set asked for.

A text unit is one line with at least :data:`MIN_LINE_CHARS` characters that is not a WikiText heading
(``= Title =``). Each unit is tokenised (with the tokenizer's special tokens) and cut into chunks of at most
``min(model context length, MAX_CHUNK_TOKENS)`` tokens.

Samples. ``mom2_n_samples`` counts SAMPLES, as in EasyEdit's ``layer_stats``: there a sample is one
dataset text truncated to the model's context length; here it is one chunk (a token sequence of at most
256 tokens). The sums run over every token of the first ``n_samples`` chunks; ``mom2.count`` is the
number of TOKENS. A corpus with fewer chunks than ``mom2_n_samples`` is an error naming how many it holds; only
with ``mom2_fallback_corpus`` set is every chunk used, and the file is then named after the chunks used
(``..._mom2_<used>.npz``, ``sample_size`` = used), never after the count asked for.

Precision. Each batch's ``K^T K`` is computed in float32 (float64 when ``mom2_dtype`` is float64) on the
module's device and added to a float64 running sum, so that long corpora add up without drift while the
products stay fast on accelerators with slow float64. The result is returned as float32.

Cache layout (identical to EasyEdit's ``models/rome/layer_stats.py`` + ``util/runningstats.py``):

* EasyEdit main: ``{stats_dir}/{basename(_name_or_path)}/{ds_name}_stats/{layer_name}_{dtype}_mom2_{n}.npz``
* easyeditor 0.0.1.dev0: the same with ``_name_or_path.replace('/', '_')`` as the model folder.

Keys: ``mom2.constructor``, ``mom2.count`` (tokens), ``mom2.mom2`` (the SUM of k k^T, in ``dtype``;
float16/bfloat16 are stored as float32 because the sum overflows half precision), ``sample_size`` (the
requested ``n``, checked by EasyEdit's loader), and ``ece.metadata`` (JSON: model fingerprint, layer,
d_ff, corpus, the statistics set it is filed under (``stats_set``), chunks and tokens used, and what was asked
for: ``requested_ds_name``, ``requested_n_samples``, ``fallback``). EasyEdit's loader reads only the ``mom2.`` keys and
``sample_size``, so the extra key is harmless. Both paths are written (a hard link, or a copy, for the
second), each atomically (temporary file + ``os.replace``), so EasyEdit's own ROME, MEMIT and AlphaEdit
find the same statistics offline.

A file whose metadata names another model (config hash, hidden size, embeddings), another layer, another
shape, sample count, corpus or statistics set is refused with :class:`StatisticsMismatchError` (so is a file an
earlier version wrote under a name its corpus was not: ``wikipedia_stats`` computed from WikiText-2); a file
written by EasyEdit itself (no ECE metadata) is accepted after the shape and sample-count checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import atomic
from .architecture import StopForward, input_device
from .finite import count_nonfinite, describe_nonfinite

logger = logging.getLogger(__name__)

MAX_CHUNK_TOKENS = 256
MIN_LINE_CHARS = 20
CHUNK_BATCH_SIZE = 16
METADATA_KEY = "ece.metadata"
METADATA_FORMAT = "ece-plugin-mom2/2"
#: The bundled corpus: its statistics-set name (``mom2_dataset``) and the label its cache metadata carries.
BUNDLED_CORPUS_NAME = "wikitext-2-raw"
BUNDLED_CORPUS_LABEL = "bundled:wikitext-2-raw"
_BUNDLED_FILES = ("wiki.valid.raw", "wiki.test.raw")
#: Corpora that come with ece-plugin, by statistics-set name: (folder under data/, files in order).
BUNDLED_CORPORA = {BUNDLED_CORPUS_NAME: ("wikitext-2-raw", _BUNDLED_FILES)}
#: Statistics-set names EasyEdit's ``layer_stats`` computes from its own Hugging Face datasets (Wikipedia
#: 20200501.en, WikiText-103): ECE never files anything it computed under them.
EASYEDIT_DATASETS = ("wikipedia", "wikitext")
_CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"
_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "n_inner",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "activation_function",
    "hidden_act",
)


class StatisticsError(ValueError):
    """Statistics cannot be computed or read (bad corpus, unknown module, unreadable cache)."""


class StatisticsMismatchError(StatisticsError):
    """A cache file exists but belongs to another model, layer, shape, sample count or corpus."""


class StatisticsUnavailableError(StatisticsError):
    """The statistics asked for (corpus, sample count) are neither cached nor computable here."""


# --------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StatsSpec:
    """What statistics to compute and where to cache them (read from any EasyEdit-style hparams)."""

    n_samples: int = 100000
    ds_name: str = "wikipedia"
    stats_dir: str = "./data/stats"
    dtype: str = "float32"
    corpus: Optional[str] = None  # None -> the corpus ds_name names (bundled, model folder) or a cache file
    fallback: Optional[str] = None  # a corpus to use, under its own name, when ds_name's cannot be had
    max_chunk_tokens: int = MAX_CHUNK_TOKENS
    batch_size: int = CHUNK_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise StatisticsError(f"mom2_n_samples: must be >= 1, got {self.n_samples}")
        if self.dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise StatisticsError(f"mom2_dtype: unsupported dtype {self.dtype!r}")
        if self.max_chunk_tokens < 2 or self.batch_size < 1:
            raise StatisticsError("max_chunk_tokens must be >= 2 and batch_size >= 1")

    @classmethod
    def from_hparams(cls, hparams: Any, **overrides: Any) -> StatsSpec:
        """Read ``mom2_n_samples``, ``mom2_dataset``, ``stats_dir``, ``mom2_dtype``, ``mom2_corpus``,
        ``mom2_fallback_corpus``."""
        values: dict[str, Any] = {
            "n_samples": int(getattr(hparams, "mom2_n_samples", cls.n_samples)),
            "ds_name": str(getattr(hparams, "mom2_dataset", cls.ds_name)),
            "stats_dir": str(getattr(hparams, "stats_dir", cls.stats_dir)),
            "dtype": str(getattr(hparams, "mom2_dtype", cls.dtype)),
            "corpus": getattr(hparams, "mom2_corpus", None),
            "fallback": getattr(hparams, "mom2_fallback_corpus", None),
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class LayerStatistics:
    """The accumulated second moment of one layer's keys."""

    layer_name: str
    mom2_sum: torch.Tensor  # d_ff x d_ff float64 on CPU: sum of k k^T
    count: int  # tokens
    n_chunks: int  # samples actually used
    metadata: dict[str, Any] = field(default_factory=dict)

    def moment(self) -> torch.Tensor:
        """E[k k^T] as float32 on CPU."""
        if self.count <= 0:
            raise StatisticsError(f"{self.layer_name}: no tokens were seen")
        return (self.mom2_sum.double() / self.count).float()


# --------------------------------------------------------------------------------------- fingerprint
def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Stable facts about a model's architecture (same under transformers 4.x and 5.x)."""
    config = getattr(model, "config", None)
    facts: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (int, float, str, bool)):
            facts[key] = value
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    name = str(getattr(config, "_name_or_path", "") or "")
    return {
        "name_or_path": name,
        "model_type": facts.get("model_type"),
        "hidden_size": facts.get("hidden_size"),
        "num_hidden_layers": facts.get("num_hidden_layers"),
        "config_hash": digest,
    }


def embedding_fingerprint(model: nn.Module, rows: int = 4, cols: int = 16) -> list[list[float]]:
    """A few input-embedding values: tells checkpoints of one architecture apart (never edited by ECE)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    block = weight.detach()[:rows, :cols].float().cpu()
    return [[float(x) for x in row] for row in block]


def module_input_dim(module: nn.Module) -> int:
    """The input (key) dimension of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    if type(module).__name__ == "Conv1D":
        nx = getattr(module, "nx", None)
        if nx is not None:
            return int(nx)
        conv_weight = getattr(module, "weight", None)
        if isinstance(conv_weight, torch.Tensor):
            return int(conv_weight.shape[0])  # Conv1D weight: [in, out]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[-1])
    raise StatisticsError(f"cannot tell the input dimension of module {type(module).__name__}")


def _get_module(model: nn.Module, layer_name: str) -> nn.Module:
    try:
        return model.get_submodule(layer_name)
    except AttributeError as exc:
        raise StatisticsError(
            f"module {layer_name!r} not found in {type(model).__name__}; check rewrite_module_tmp"
        ) from exc


# ----------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class StatsPaths:
    """Where EasyEdit main and easyeditor 0.0.1.dev0 look for one layer's statistics."""

    main: Path
    pypi: Path

    def all(self) -> list[Path]:
        return [self.main] if self.main == self.pypi else [self.main, self.pypi]


def easyedit_stats_paths(
    stats_dir: Union[str, Path], name_or_path: str, ds_name: str, layer_name: str, dtype: str, n_samples: int
) -> StatsPaths:
    """EasyEdit's cache file names for ``layer_stats(..., to_collect=['mom2'], sample_size=n)``."""
    tail = f"{ds_name}_stats/{layer_name}_{dtype}_mom2_{n_samples}.npz"
    main_name = name_or_path.rsplit("/")[-1]  # EasyEdit main: the last path component
    pypi_name = name_or_path.replace("/", "_")  # easyeditor 0.0.1.dev0: the whole name
    base = Path(stats_dir)
    return StatsPaths(main=base / main_name / tail, pypi=base / pypi_name / tail)


def stats_paths_for(model: nn.Module, layer_name: str, spec: StatsSpec) -> StatsPaths:
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        raise StatisticsError(
            "model.config._name_or_path is empty: the statistics cache is named after it; "
            "set model.config._name_or_path (e.g. to the model's folder)"
        )
    return easyedit_stats_paths(spec.stats_dir, name, spec.ds_name, layer_name, spec.dtype, spec.n_samples)


# ---------------------------------------------------------------------------------------------- corpus
def bundled_corpus_dir() -> Path:
    """``data/wikitext-2-raw`` of the repository."""
    from ..resources import repo_path

    return repo_path("data", "wikitext-2-raw")


def corpus_files(corpus: Optional[str]) -> tuple[str, list[Path]]:
    """The label (stored in the cache metadata) and the files of a corpus."""
    if corpus is None:
        base = bundled_corpus_dir()
        files = [base / name for name in _BUNDLED_FILES]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise StatisticsError(f"bundled WikiText-2 corpus missing: {missing}; set mom2_corpus")
        return BUNDLED_CORPUS_LABEL, files
    path = Path(corpus).expanduser()
    if path.is_file():
        return str(path.resolve()), [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".raw"))
        if not files:
            raise StatisticsError(f"mom2_corpus: folder {path} holds no .txt or .raw files")
        return str(path.resolve()), files
    raise StatisticsError(f"mom2_corpus: {corpus} is neither a file nor a folder")


def model_corpus_file(model: Optional[nn.Module], ds_name: str) -> Optional[Path]:
    """``<model folder>/<ds_name>.txt`` when the model was loaded from a folder holding it (never for EasyEdit's
    own set names, :data:`EASYEDIT_DATASETS`)."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name or ds_name in EASYEDIT_DATASETS or "/" in ds_name:
        return None
    path = Path(name) / f"{ds_name}.txt"
    return path if path.is_file() else None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


MODEL_CORPUS_PREFIX = "model:"  # label of a corpus file in the model's folder: model:<dir>/<name>.txt@sha256:...


@dataclass(frozen=True)
class Corpus:
    """A corpus statistics can be computed from, and the statistics-set name its cache files carry."""

    name: str  # {name}_stats in the cache path
    label: str  # what the cache metadata records (bundled name, absolute path, model-folder file + digest)
    files: tuple[Path, ...]
    fallback: bool = False  # a stand-in the user allowed for a set that could not be had


def _bundled_corpus(name: str) -> Corpus:
    folder, names = BUNDLED_CORPORA[name]
    from ..resources import repo_path

    files = tuple(repo_path("data", folder, n) for n in names)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise StatisticsError(f"bundled corpus {name!r} missing: {missing}; reinstall ece-plugin or set mom2_corpus")
    return Corpus(name, f"bundled:{name}", files)


def local_corpus(spec: StatsSpec, model: Optional[nn.Module] = None) -> Optional[Corpus]:
    """The corpus ``spec`` names when it can be read here (``mom2_corpus``, a bundled set, a model-folder
    file); None for a set only EasyEdit computes (``wikipedia``)."""
    if spec.corpus is not None:
        label, files = corpus_files(spec.corpus)
        return Corpus(_local_name(spec.ds_name, Path(spec.corpus).expanduser()), label, tuple(files))
    if spec.ds_name in BUNDLED_CORPORA:
        return _bundled_corpus(spec.ds_name)
    own = model_corpus_file(model, spec.ds_name)
    if own is not None:
        label = f"{MODEL_CORPUS_PREFIX}{own.parent.name}/{own.name}@sha256:{_file_digest(own)}"
        return Corpus(spec.ds_name, label, (own,))
    return None


def _local_name(ds_name: str, path: Path) -> str:
    """The set name statistics from the local corpus ``path`` are filed under: ``mom2_dataset``, unless that is
    one of EasyEdit's own corpora (``wikipedia``, the default): then the file's stem or the folder's name, so
    that EasyEdit's MEMIT and AlphaEdit never read a local text as their Wikipedia."""
    if ds_name not in EASYEDIT_DATASETS:
        return ds_name
    name = path.stem if path.is_file() else path.name
    return f"{name}-local" if name in EASYEDIT_DATASETS or not name else name


def fallback_corpus(value: str) -> Corpus:
    """The corpus ``mom2_fallback_corpus`` names: a bundled set (``wikitext-2-raw``) or a text file / folder,
    filed under the bundled name or the file's stem / folder's name."""
    if value in BUNDLED_CORPORA:
        return dataclasses.replace(_bundled_corpus(value), fallback=True)
    path = Path(value).expanduser()
    if not path.exists():
        raise StatisticsError(
            f"mom2_fallback_corpus: {value!r} is neither a bundled corpus ({sorted(BUNDLED_CORPORA)}) nor a "
            "file or folder"
        )
    name = _local_name("wikipedia", path)
    label, files = corpus_files(value)
    return Corpus(name, label, tuple(files), fallback=True)


def unavailable_message(spec: StatsSpec, where: Path) -> str:
    """What is missing for ``spec`` and the three ways to supply it."""
    return (
        f"no statistics for mom2_dataset {spec.ds_name!r} with mom2_n_samples {spec.n_samples} (expected at "
        f"{where}), and ece-plugin cannot compute {spec.ds_name!r} itself. Supply them: put EasyEdit's "
        "precomputed file there (or run EasyEdit's MEMIT once with this stats_dir); or compute them from a local "
        "corpus with mom2_corpus: <text file or folder> and mom2_dataset: <its name> (mom2_dataset: "
        f"{BUNDLED_CORPUS_NAME} for the bundled WikiText-2); or accept a stand-in, cached under its own name, "
        f"with mom2_fallback_corpus: {BUNDLED_CORPUS_NAME}"
    )


def choose_corpus(spec: StatsSpec, model: Optional[nn.Module] = None, where: Optional[Path] = None) -> Corpus:
    """The corpus statistics for ``spec`` are computed from: its own, else the fallback the user allowed, else
    :class:`StatisticsUnavailableError`."""
    own = local_corpus(spec, model)
    if own is not None:
        return own
    if spec.fallback:
        return fallback_corpus(spec.fallback)
    target = where if where is not None else Path(spec.stats_dir) / "<model>" / f"{spec.ds_name}_stats"
    raise StatisticsUnavailableError(unavailable_message(spec, target))


def resolve_corpus(spec: StatsSpec, model: Optional[nn.Module] = None) -> tuple[str, list[Path]]:
    """The label (stored in the cache metadata) and files of the corpus ``spec`` is computed from on ``model``
    (:func:`choose_corpus`)."""
    corpus = choose_corpus(spec, model)
    return corpus.label, list(corpus.files)


def iter_corpus_lines(files: Sequence[Path], min_chars: int = MIN_LINE_CHARS) -> Iterator[str]:
    """Text units: lines with at least ``min_chars`` characters that are not WikiText headings."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                text = line.strip()
                if len(text) < min_chars or (text.startswith("=") and text.endswith("=")):
                    continue
                yield text


def model_max_length(model: nn.Module, cap: int = MAX_CHUNK_TOKENS) -> int:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def iter_chunks(tok: Any, lines: Iterator[str], max_len: int, block: int = 256) -> Iterator[list[int]]:
    """Token chunks of at most ``max_len`` tokens, tokenising ``block`` lines at a time."""
    buffer: list[str] = []

    def flush() -> Iterator[list[int]]:
        ids_list = tok(buffer, add_special_tokens=True)["input_ids"]
        for ids in ids_list:
            for start in range(0, len(ids), max_len):
                piece = list(ids[start : start + max_len])
                if piece:
                    yield piece

    for line in lines:
        buffer.append(line)
        if len(buffer) >= block:
            yield from flush()
            buffer = []
    if buffer:
        yield from flush()


def collect_chunks(
    tok: Any, spec: StatsSpec, max_len: int, model: Optional[nn.Module] = None, corpus: Optional[Corpus] = None
) -> tuple[str, list[list[int]]]:
    """The label and the first ``n_samples`` chunks of the corpus (``corpus``, else :func:`choose_corpus`). A
    corpus holding fewer is an error, unless it is the user's fallback: then every chunk is used."""
    if corpus is None:
        corpus = choose_corpus(spec, model)
    chunks: list[list[int]] = []
    for chunk in iter_chunks(tok, iter_corpus_lines(corpus.files), max_len):
        chunks.append(chunk)
        if len(chunks) >= spec.n_samples:
            break
    if not chunks:
        raise StatisticsError(f"corpus {corpus.label} yielded no text (lines need >= {MIN_LINE_CHARS} characters)")
    if len(chunks) < spec.n_samples:
        tokens = sum(len(c) for c in chunks)
        if not (corpus.fallback or spec.fallback):
            raise StatisticsUnavailableError(
                f"corpus {corpus.label} holds {len(chunks)} samples (chunks of <= {max_len} tokens; {tokens} tokens), "
                f"fewer than mom2_n_samples {spec.n_samples}: set mom2_n_samples to {len(chunks)} or less, supply "
                "a larger corpus (mom2_corpus), or set mom2_fallback_corpus to use every chunk (the cache is then "
                "named after the samples used)"
            )
        logger.warning(
            "corpus %s holds %d samples (%d tokens), fewer than mom2_n_samples=%d: using all of them, as "
            "mom2_fallback_corpus allows; cached as mom2_%d",
            corpus.label, len(chunks), tokens, spec.n_samples, len(chunks),
        )
    return corpus.label, chunks


# ------------------------------------------------------------------------------------------- computing
def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _batches(chunks: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Length-sorted batches (less padding); the sums do not depend on the order."""
    order = sorted(chunks, key=len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class KeyMoments:
    """The running ``sum(k k^T)`` and token count of each named module's input over the corpus's batches.

    Forward pre-hooks on the modules add each batch's unpadded keys: the product in ``product_dtype`` (float32
    unless the statistics ask for float64), the running sum in float64, so that millions of tokens add up without
    float32 drift. The forward stops once every module has been read.
    """

    def __init__(self, names: Sequence[str], product_dtype: torch.dtype) -> None:
        self.names = list(names)
        self.product_dtype = product_dtype
        self.sums: dict[str, Optional[torch.Tensor]] = dict.fromkeys(self.names)
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)
        self._seen: set[str] = set()
        self._mask: Optional[torch.Tensor] = None

    def hook(self, name: str) -> Any:
        def add_keys(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.add(name, args[0])

        return add_keys

    def add(self, name: str, x: torch.Tensor) -> None:
        assert self._mask is not None, "KeyMoments.add outside a batch"
        feats = x[self._mask.to(x.device)].reshape(-1, x.shape[-1]).to(self.product_dtype)
        acc = self.sums[name]
        if acc is None:
            acc = self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        acc += (feats.T @ feats).to(torch.float64)
        self.counts[name] += int(feats.shape[0])
        self._seen.add(name)
        if len(self._seen) == len(self.names):
            raise StopForward

    def run_batch(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> None:
        """One forward of a padded batch (``mask`` marks its tokens); every module must have been read."""
        self._mask = mask
        self._seen.clear()
        try:
            model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
        except StopForward:
            pass
        missing = sorted(set(self.names) - self._seen)
        if missing:
            raise StatisticsError(f"modules {missing} were not called by the forward")

    def total(self, name: str) -> torch.Tensor:
        acc = self.sums[name]
        assert acc is not None, f"{name}: no batch was read"
        return acc


def _padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with ``pad`` and the mask of the real tokens."""
    width = max(len(c) for c in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, chunk in enumerate(batch):
        ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        mask[row, : len(chunk)] = True
    return ids, mask


def accumulate_key_moments(
    model: nn.Module, tok: Any, modules: dict[str, nn.Module], chunks: list[list[int]], spec: StatsSpec,
    progress: bool = True,
) -> KeyMoments:
    """One pass over ``chunks`` in length-sorted batches, with every module of ``modules`` read by a hook."""
    moments = KeyMoments(list(modules), torch.float64 if spec.dtype == "float64" else torch.float32)
    handles = [m.register_forward_pre_hook(moments.hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    device, pad = input_device(model), _pad_id(tok)
    try:
        with torch.no_grad():
            for batch in tqdm(_batches(chunks, spec.batch_size), desc=f"E[kk^T] {len(modules)} layer(s)",
                              disable=not progress):
                moments.run_batch(model, *_padded(batch, pad), device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return moments


def compute_statistics(
    model: nn.Module,
    tok: Any,
    layer_names: Sequence[str],
    spec: Union[StatsSpec, Any],
    *,
    write: bool = True,
    progress: bool = True,
) -> dict[str, LayerStatistics]:
    """Accumulate sum(k k^T) for several layers in ONE pass over the corpus; optionally cache each layer.

    ``spec`` is a :class:`StatsSpec` or any EasyEdit-style hparams object (ECE, ROME, MEMIT, AlphaEdit):
    this is how the CLI seeds the caches EasyEdit's own baselines read.
    """
    if not isinstance(spec, StatsSpec):
        spec = StatsSpec.from_hparams(spec)
    names = list(dict.fromkeys(layer_names))
    if not names:
        raise StatisticsError("compute_statistics: no layer names given")
    modules = {name: _get_module(model, name) for name in names}
    max_len = model_max_length(model, spec.max_chunk_tokens)
    corpus = choose_corpus(spec, model, stats_paths_for(model, names[0], spec).main)
    label, chunks = collect_chunks(tok, spec, max_len, model, corpus)
    filed = filed_spec(spec, corpus, len(chunks))
    moments = accumulate_key_moments(model, tok, modules, chunks, spec, progress)

    model_fp, emb = model_fingerprint(model), embedding_fingerprint(model)

    def metadata(name: str) -> dict[str, Any]:
        return {
            "format": METADATA_FORMAT,
            "model": model_fp,
            "embedding": emb,
            "layer_name": name,
            "d_ff": module_input_dim(modules[name]),
            "n_samples": filed.n_samples,
            "n_chunks": len(chunks),
            "n_tokens": moments.counts[name],
            "max_chunk_tokens": max_len,
            "corpus": label,
            "dtype": spec.dtype,
            "ds_name": filed.ds_name,
            "stats_set": filed.ds_name,
            "requested_ds_name": spec.ds_name,
            "requested_n_samples": spec.n_samples,
            "fallback": filed != spec,
        }

    results: dict[str, LayerStatistics] = {}
    for name in names:
        acc = moments.total(name)
        if count_nonfinite(acc):
            raise StatisticsError(
                f"{name}: the statistics computed from {label} are not finite ({describe_nonfinite(acc)}): the "
                "model's activations overflow; use another dtype"
            )
        results[name] = LayerStatistics(name, acc.cpu(), moments.counts[name], len(chunks), metadata(name))
    if write:  # only once every layer is finite: all or nothing
        for name, stats in results.items():
            write_stats_file(stats_paths_for(model, name, filed), stats, filed)
    return results


def filed_spec(spec: StatsSpec, corpus: Corpus, n_chunks: int) -> StatsSpec:
    """The statistics set and sample count a result from ``corpus`` is filed under: the corpus's own name and
    the chunks actually used (the request's when nothing fell back)."""
    return dataclasses.replace(spec, ds_name=corpus.name, n_samples=min(n_chunks, spec.n_samples))


# ------------------------------------------------------------------------------------------ npz files
def _storage_dtype(dtype: str) -> Any:
    return np.float64 if dtype == "float64" else np.float32


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link"
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                fout.write(fin.read())
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def stored_sum(mom2_sum: torch.Tensor, dtype: str) -> np.ndarray:
    """The sum of k k^T as the cache file stores it (``mom2_dtype``; float32 for half precision)."""
    return mom2_sum.double().numpy().astype(_storage_dtype(dtype))


def moment_from_sum(mom2_sum: torch.Tensor, count: int) -> torch.Tensor:
    """E[k k^T] (float32) from a stored sum: the one formula for statistics just computed and read back."""
    return (mom2_sum.double() / count).float()


def write_stats_file(paths: StatsPaths, stats: LayerStatistics, spec: StatsSpec) -> None:
    """Write EasyEdit main's file, then the 0.0.1.dev0 name as a hard link (or copy) of it."""
    arrays = {
        "mom2.constructor": np.array(_CONSTRUCTOR),
        "mom2.count": np.array(int(stats.count)),
        "mom2.mom2": stored_sum(stats.mom2_sum, spec.dtype),
        "sample_size": np.array(int(spec.n_samples)),
        METADATA_KEY: np.array(json.dumps(stats.metadata, sort_keys=True)),
    }
    _atomic_npz(paths.main, arrays)
    if paths.pypi != paths.main:
        _link_or_copy(paths.main, paths.pypi)
    logger.info("wrote statistics %s (%d tokens)", paths.main, stats.count)


def read_stats_file(path: Path) -> tuple[torch.Tensor, int, int, Optional[dict[str, Any]]]:
    """(sum of k k^T as float64, token count, sample_size, ECE metadata or None)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            needed = {"mom2.mom2", "mom2.count", "sample_size"}
            if not needed <= keys:
                raise StatisticsError(f"{path}: not an EasyEdit mom2 file (missing {sorted(needed - keys)})")
            mom2 = torch.from_numpy(np.asarray(data["mom2.mom2"]).astype(np.float64, copy=False))  # np.load's own array
            count = int(data["mom2.count"])
            sample_size = int(data["sample_size"])
            meta = json.loads(str(data[METADATA_KEY])) if METADATA_KEY in keys else None
    except StatisticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise BadZipFile, EOFError, zlib.error, ...
        raise StatisticsError(
            f"{path}: unreadable statistics file ({type(exc).__name__}: {exc}); delete it to recompute"
        ) from exc
    if count_nonfinite(mom2):
        raise StatisticsError(f"{path}: mom2.mom2 is not finite: {describe_nonfinite(mom2)}; delete it to recompute")
    return mom2, count, sample_size, meta


def read_stats_header(path: Path) -> tuple[tuple[int, ...], int, Optional[dict[str, Any]]]:
    """(shape of the stored sum, sample_size, ECE metadata or None) without reading the d_ff x d_ff matrix."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mom2.mom2", "sample_size"} <= keys:
                raise StatisticsError(f"{path}: not an EasyEdit mom2 file")
            sample_size = int(data["sample_size"])
            meta = json.loads(str(data[METADATA_KEY])) if METADATA_KEY in keys else None
        with zipfile.ZipFile(path) as archive, archive.open("mom2.mom2.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape = tuple(int(n) for n in read_header(member)[0])
    except StatisticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise BadZipFile, EOFError, KeyError, ...
        raise StatisticsError(
            f"{path}: unreadable statistics file ({type(exc).__name__}: {exc}); delete it to recompute"
        ) from exc
    return shape, sample_size, meta


def check_stats_file(
    path: Path,
    model: nn.Module,
    layer_name: str,
    spec: StatsSpec,
    d_ff: int,
    shape: tuple[int, ...],
    sample_size: int,
    meta: Optional[dict[str, Any]],
    corpus: Optional[str] = None,
) -> None:
    """Refuse a cache written for another model, layer, shape, sample count or corpus (``corpus``: the label it
    must carry; default: the one ``spec`` resolves to on ``model``)."""
    problems: list[str] = []
    if tuple(shape) != (d_ff, d_ff):
        problems.append(f"shape {tuple(shape)} != ({d_ff}, {d_ff})")
    if sample_size != spec.n_samples:
        problems.append(f"sample_size {sample_size} != mom2_n_samples {spec.n_samples}")
    if meta is not None:
        fp = model_fingerprint(model)
        theirs = meta.get("model", {})
        for key in ("config_hash", "hidden_size", "num_hidden_layers", "model_type"):
            if theirs.get(key) != fp.get(key):
                problems.append(f"model {key} {theirs.get(key)!r} != {fp.get(key)!r}")
        if meta.get("layer_name") != layer_name:
            problems.append(f"layer {meta.get('layer_name')!r} != {layer_name!r}")
        if meta.get("d_ff") != d_ff:
            problems.append(f"d_ff {meta.get('d_ff')} != {d_ff}")
        if corpus is None:
            own = local_corpus(spec, model)
            corpus = own.label if own is not None else None
        if corpus is not None and meta.get("corpus") != corpus:
            problems.append(f"corpus {meta.get('corpus')!r} != {corpus!r}")
        problems.extend(_filing_problems(meta, spec, sample_size))
        ours = embedding_fingerprint(model)
        stored = meta.get("embedding") or []
        if ours and stored:
            a, b = torch.tensor(ours), torch.tensor(stored)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-3):
                problems.append("input embeddings differ (another checkpoint of this architecture)")
    if problems:
        raise StatisticsMismatchError(
            f"statistics cache {path} does not match this model/request: {'; '.join(problems)}. "
            "Delete the file, or use another stats_dir / mom2_dataset name."
        )


def _filing_problems(meta: dict[str, Any], spec: StatsSpec, sample_size: int) -> list[str]:
    """Is an ECE-written file filed under what it was computed from (set name, sample count)? Files of
    ``ece-plugin-mom2/1`` carry no ``stats_set``: one computed from the bundled WikiText-2 under another name, or
    from fewer chunks than its name says, was a silent fallback and is refused."""
    problems: list[str] = []
    label = str(meta.get("corpus", ""))
    filed_as = meta.get("stats_set")
    if filed_as is None:  # format 1
        if label == BUNDLED_CORPUS_LABEL and spec.ds_name != BUNDLED_CORPUS_NAME:
            problems.append(
                f"computed from {label}, not from {spec.ds_name!r} (filed under another corpus's name by an "
                "earlier ece-plugin)"
            )
    elif filed_as != spec.ds_name:
        problems.append(f"statistics set {filed_as!r} != mom2_dataset {spec.ds_name!r}")
    used = meta.get("n_chunks")
    if isinstance(used, int) and used < sample_size:
        problems.append(f"computed from {used} samples, not the {sample_size} its name says")
    return problems


# ----------------------------------------------------------------------------------------------- cache
def _read_cached(
    model: nn.Module,
    layer_name: str,
    spec: StatsSpec,
    d_ff: int,
    paths: Sequence[Path],
    fallback: Optional[Corpus] = None,
) -> Optional[torch.Tensor]:
    """E[k k^T] from the first of ``paths`` that exists, after checking it (against the set and corpus
    ``fallback`` names when given); None when none exists."""
    for path in paths:
        if not path.is_file():
            continue
        mom2, count, sample_size, meta = read_stats_file(path)
        if fallback is not None:
            corpus = fallback
            filed = dataclasses.replace(spec, ds_name=corpus.name, n_samples=sample_size)
            check_stats_file(path, model, layer_name, filed, d_ff, tuple(mom2.shape), sample_size, meta, corpus.label)
        else:
            check_stats_file(path, model, layer_name, spec, d_ff, tuple(mom2.shape), sample_size, meta)
        if count <= 0:
            raise StatisticsError(f"{path}: mom2.count is {count}")
        logger.info("loaded statistics %s%s", path, " (the fallback corpus)" if fallback else "")
        return moment_from_sum(mom2, count)
    return None


def fallback_files(model: nn.Module, layer_name: str, spec: StatsSpec, corpus: Corpus) -> list[Path]:
    """Cache files of ``corpus``'s set for this layer computed for this request (the sample count asked for, or
    all the corpus holds when fewer), found by reading each header's metadata."""
    found: list[Path] = []
    filed = dataclasses.replace(spec, ds_name=corpus.name)
    for folder in dict.fromkeys(p.parent for p in stats_paths_for(model, layer_name, filed).all()):
        for path in sorted(folder.glob(f"{layer_name}_{spec.dtype}_mom2_*.npz")):
            try:
                _, sample_size, meta = read_stats_header(path)
            except StatisticsError:
                continue
            if meta is None or meta.get("corpus") != corpus.label:
                continue
            if sample_size == spec.n_samples or meta.get("requested_n_samples") == spec.n_samples:
                found.append(path)
    return found


class StatisticsCache:
    """Per-session holder of E[k k^T] per layer (float32, CPU) and the last masked block per layer."""

    def __init__(self) -> None:
        self._moments: dict[tuple[str, StatsSpec], torch.Tensor] = {}
        self._masked: dict[str, tuple[torch.Tensor, torch.device, torch.dtype, torch.Tensor]] = {}

    def clear(self) -> None:
        self._moments.clear()
        self._masked.clear()

    def __len__(self) -> int:
        return len(self._moments)

    def second_moment(self, model: nn.Module, tok: Any, layer_name: str, hparams: Any) -> torch.Tensor:
        """E[k k^T] (d_ff x d_ff, float32, CPU) of the input of module ``layer_name``.

        Read from EasyEdit's cache file when present (after checking it belongs to this model), else
        computed from the corpus and written there.
        """
        spec = hparams if isinstance(hparams, StatsSpec) else StatsSpec.from_hparams(hparams)
        key = (layer_name, spec)
        if key in self._moments:
            return self._moments[key]
        d_ff = module_input_dim(_get_module(model, layer_name))
        own = local_corpus(spec, model)
        named = dataclasses.replace(spec, ds_name=own.name) if own is not None else spec  # the name it is filed under
        moment = _read_cached(model, layer_name, named, d_ff, stats_paths_for(model, layer_name, named).all())
        if moment is None and spec.fallback:  # a stand-in computed earlier for this request
            corpus = choose_corpus(spec, model)
            found = fallback_files(model, layer_name, spec, corpus)
            moment = _read_cached(model, layer_name, spec, d_ff, found, corpus)
        if moment is None:
            stats = compute_statistics(model, tok, [layer_name], spec, write=True)[layer_name]
            if stats.count <= 0:
                raise StatisticsError(f"{layer_name}: no tokens were seen")
            # rounded as the cache file stores it, so the same edit gives the same weights next time
            moment = moment_from_sum(torch.from_numpy(stored_sum(stats.mom2_sum, spec.dtype)), stats.count)
        self._moments[key] = moment
        return moment

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
        """``C0[idx][:, idx]`` on ``device`` in ``dtype``; the last block per layer is kept."""
        device = torch.device(device)
        idx_cpu = torch.as_tensor(idx, dtype=torch.long).cpu()
        last = self._masked.get(layer_name)
        if last is not None and last[1] == device and last[2] == dtype and torch.equal(last[0], idx_cpu):
            return last[3]
        c0 = self.second_moment(model, tok, layer_name, hparams)
        block = c0.index_select(0, idx_cpu).index_select(1, idx_cpu).to(device=device, dtype=dtype)
        self._masked[layer_name] = (idx_cpu.clone(), device, dtype, block)
        return block
