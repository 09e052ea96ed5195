"""Covariance statistics ``C0 = E[k k^T]`` of MLP keys, from a local corpus, cached in EasyEdit's layout.

The keys ``k`` are the input of the MLP down/out projection ``hparams.rewrite_module_tmp.format(layer)``
(Llama ``mlp.down_proj``, an ``nn.Linear``; GPT-2 ``mlp.c_proj``, a ``Conv1D``): the ``d_ff``-dimensional
hidden activations. The second moment is averaged over every (non-padding) token of the corpus.

Corpus. ``hparams.mom2_corpus`` when set: a text file, or a folder whose ``*.txt`` / ``*.raw`` files are read in
sorted order. Else the model's own corpus ``<model folder>/<mom2_dataset>.txt`` when the model folder holds one
(a testbed's statistics corpus, ``ece-plugin stats-corpus``; EasyEdit's ROME / MEMIT / AlphaEdit name their cache
folder after ``mom2_dataset`` too, so they read the same statistics). Else the bundled WikiText-2
(``data/wikitext-2-raw/wiki.valid.raw`` then ``wiki.test.raw``), standing in for EasyEdit's Wikipedia. A text
unit is one line with at least :data:`MIN_LINE_CHARS` characters that is not a WikiText heading (``= Title =``). Each unit is tokenised (with the tokenizer's special tokens) and cut into chunks
of at most ``min(model context length, MAX_CHUNK_TOKENS)`` tokens.

Samples. ``mom2_n_samples`` counts SAMPLES, as in EasyEdit's ``layer_stats``: there a sample is one
dataset text truncated to the model's context length; here it is one chunk (a token sequence of at most
256 tokens). The sums run over every token of the first ``n_samples`` chunks; ``mom2.count`` is the
number of TOKENS. WikiText-2 (valid + test) holds a few thousand chunks, far fewer than EasyEdit's default
100,000 Wikipedia articles: when the corpus runs out, every chunk is used, a warning says so, and the
cache metadata records the chunks and tokens actually seen. The file name keeps the requested
``n_samples`` so that EasyEdit finds the file under the name it computes.

Precision. Each batch's ``K^T K`` is computed in float32 (float64 when ``mom2_dtype`` is float64) on the
module's device and added to a float64 running sum, so that long corpora add up without drift while the
products stay fast on accelerators with slow float64. The result is returned as float32.

Cache layout (identical to EasyEdit's ``models/rome/layer_stats.py`` + ``util/runningstats.py``):

* EasyEdit main: ``{stats_dir}/{basename(_name_or_path)}/{ds_name}_stats/{layer_name}_{dtype}_mom2_{n}.npz``
* easyeditor 0.0.1.dev0: the same with ``_name_or_path.replace('/', '_')`` as the model folder.

Keys: ``mom2.constructor``, ``mom2.count`` (tokens), ``mom2.mom2`` (the SUM of k k^T, in ``dtype``;
float16/bfloat16 are stored as float32 because the sum overflows half precision), ``sample_size`` (the
requested ``n``, checked by EasyEdit's loader), and ``ece.metadata`` (JSON: model fingerprint, layer,
d_ff, corpus, chunks and tokens used). EasyEdit's loader reads only the ``mom2.`` keys and
``sample_size``, so the extra key is harmless. Both paths are written (a hard link, or a copy, for the
second), each atomically (temporary file + ``os.replace``), so EasyEdit's own ROME, MEMIT and AlphaEdit
find the same statistics offline.

A file whose metadata names another model (config hash, hidden size, embeddings), another layer, another
shape, sample count or corpus is refused with :class:`StatisticsMismatchError`; a file written by
EasyEdit itself (no ECE metadata) is accepted after the shape and sample-count checks.
"""

from __future__ import annotations

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
from .architecture import StopForward
from .finite import count_nonfinite, describe_nonfinite

logger = logging.getLogger(__name__)

MAX_CHUNK_TOKENS = 256
MIN_LINE_CHARS = 20
CHUNK_BATCH_SIZE = 16
METADATA_KEY = "ece.metadata"
METADATA_FORMAT = "ece-plugin-mom2/1"
BUNDLED_CORPUS_LABEL = "bundled:wikitext-2-raw"
_BUNDLED_FILES = ("wiki.valid.raw", "wiki.test.raw")
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


# --------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StatsSpec:
    """What statistics to compute and where to cache them (read from any EasyEdit-style hparams)."""

    n_samples: int = 100000
    ds_name: str = "wikipedia"
    stats_dir: str = "./data/stats"
    dtype: str = "float32"
    corpus: Optional[str] = None  # None -> the bundled WikiText-2
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
        """Read ``mom2_n_samples``, ``mom2_dataset``, ``stats_dir``, ``mom2_dtype``, ``mom2_corpus``."""
        values: dict[str, Any] = {
            "n_samples": int(getattr(hparams, "mom2_n_samples", cls.n_samples)),
            "ds_name": str(getattr(hparams, "mom2_dataset", cls.ds_name)),
            "stats_dir": str(getattr(hparams, "stats_dir", cls.stats_dir)),
            "dtype": str(getattr(hparams, "mom2_dtype", cls.dtype)),
            "corpus": getattr(hparams, "mom2_corpus", None),
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
    """``<model folder>/<ds_name>.txt`` when the model was loaded from a folder holding it (never for 'wikipedia')."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name or ds_name == "wikipedia" or "/" in ds_name:
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


def resolve_corpus(spec: StatsSpec, model: Optional[nn.Module] = None) -> tuple[str, list[Path]]:
    """The label (stored in the cache metadata) and files of the corpus ``spec`` asks for on ``model``."""
    if spec.corpus is None:
        own = model_corpus_file(model, spec.ds_name)
        if own is not None:
            return f"{MODEL_CORPUS_PREFIX}{own.parent.name}/{own.name}@sha256:{_file_digest(own)}", [own]
    return corpus_files(spec.corpus)


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
    tok: Any, spec: StatsSpec, max_len: int, model: Optional[nn.Module] = None
) -> tuple[str, list[list[int]]]:
    label, files = resolve_corpus(spec, model)
    chunks: list[list[int]] = []
    for chunk in iter_chunks(tok, iter_corpus_lines(files), max_len):
        chunks.append(chunk)
        if len(chunks) >= spec.n_samples:
            break
    if not chunks:
        raise StatisticsError(f"corpus {label} yielded no text (lines need >= {MIN_LINE_CHARS} characters)")
    if len(chunks) < spec.n_samples:
        logger.warning(
            "corpus %s holds %d chunks of <= %d tokens, fewer than mom2_n_samples=%d: using all of them",
            label,
            len(chunks),
            max_len,
            spec.n_samples,
        )
    return label, chunks


# ------------------------------------------------------------------------------------------- computing
def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _input_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def _batches(chunks: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Length-sorted batches (less padding); the sums do not depend on the order."""
    order = sorted(chunks, key=len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
    dims = {name: module_input_dim(m) for name, m in modules.items()}
    max_len = model_max_length(model, spec.max_chunk_tokens)
    label, chunks = collect_chunks(tok, spec, max_len, model)

    # per-batch products in float32 (fast everywhere; float64 when mom2_dtype asks for it), running sums
    # over batches in float64, so that millions of tokens add up without float32 drift
    product_dtype = torch.float64 if spec.dtype == "float64" else torch.float32
    sums: dict[str, Optional[torch.Tensor]] = dict.fromkeys(names)
    counts = dict.fromkeys(names, 0)
    seen: set[str] = set()
    current_mask: list[torch.Tensor] = []

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = current_mask[0].to(x.device)
            feats = x[mask].reshape(-1, x.shape[-1]).to(product_dtype)
            acc = sums[name]
            if acc is None:
                acc = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                sums[name] = acc
            acc += (feats.T @ feats).to(torch.float64)
            counts[name] += int(feats.shape[0])
            seen.add(name)
            if len(seen) == len(names):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    device = _input_device(model)
    pad = _pad_id(tok)
    batches = _batches(chunks, spec.batch_size)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"E[kk^T] {len(names)} layer(s)", disable=not progress):
                width = max(len(c) for c in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for row, chunk in enumerate(batch):
                    ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
                    mask[row, : len(chunk)] = True
                current_mask[:] = [mask]
                seen.clear()
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
                except StopForward:
                    pass
                if len(seen) != len(names):
                    raise StatisticsError(f"modules {sorted(set(names) - seen)} were not called by the forward")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    fp = model_fingerprint(model)
    emb = embedding_fingerprint(model)
    results: dict[str, LayerStatistics] = {}
    for name in names:
        acc = sums[name]
        assert acc is not None
        if count_nonfinite(acc):
            raise StatisticsError(
                f"{name}: the statistics computed from {label} are not finite ({describe_nonfinite(acc)}): the "
                "model's activations overflow; use another dtype"
            )
        meta = {
            "format": METADATA_FORMAT,
            "model": fp,
            "embedding": emb,
            "layer_name": name,
            "d_ff": dims[name],
            "n_samples": spec.n_samples,
            "n_chunks": len(chunks),
            "n_tokens": counts[name],
            "max_chunk_tokens": max_len,
            "corpus": label,
            "dtype": spec.dtype,
            "ds_name": spec.ds_name,
        }
        stats = LayerStatistics(name, acc.cpu(), counts[name], len(chunks), meta)
        results[name] = stats
        if write:
            write_stats_file(stats_paths_for(model, name, spec), stats, spec)
    return results


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
            mom2 = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64).copy())
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
        label = corpus if corpus is not None else resolve_corpus(spec, model)[0]
        if meta.get("corpus") != label:
            problems.append(f"corpus {meta.get('corpus')!r} != {label!r}")
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


# ----------------------------------------------------------------------------------------------- cache
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
        paths = stats_paths_for(model, layer_name, spec)
        moment: Optional[torch.Tensor] = None
        for path in paths.all():
            if path.is_file():
                mom2, count, sample_size, meta = read_stats_file(path)
                check_stats_file(path, model, layer_name, spec, d_ff, tuple(mom2.shape), sample_size, meta)
                if count <= 0:
                    raise StatisticsError(f"{path}: mom2.count is {count}")
                moment = moment_from_sum(mom2, count)
                logger.info("loaded statistics %s", path)
                break
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
