"""Compact, exactly reversible edit files (safetensors).

An edit file holds, for every weight matrix an edit changed (ECE's W_out of each edited layer), the
indices of the changed neurons (slices along the neuron axis: columns of an ``nn.Linear`` down
projection ``[d_model, d_ff]``, rows of a GPT-2 ``Conv1D`` ``[d_ff, d_model]``), their original values
and their new values, in the weight's own dtype. Putting an edit on (:func:`apply_edit_file`) writes the
new values; taking it off (:func:`revert_edit_file`) writes the originals back; both are bit-exact and
check first that the model is the one the file was made for (a fingerprint of its configuration and of
the edited weights' names and shapes, and a SHA-256 of every tensor of the model's state dict, the edited
weights both before and after the edit) and that it holds the expected values (the originals before
applying, the new values before reverting). A file without the whole-model fingerprint (older versions) is
still read, with a warning.

The file can also carry the sequential-editing state (tensors named ``state/...``) and JSON metadata
(hyperparameters, the edited records, free-form extras) in the safetensors header.

Layout
    ``<weight name>/indices`` int64 [n], ``<weight name>/original`` and ``<weight name>/edited``
    (the slices, neuron axis first: [n, other dim]); metadata key ``ece_plugin`` = JSON with
    ``format_version``, ``fingerprint``, ``weights`` ({name: {shape, dtype, neuron_axis, n_changed}}),
    ``hparams``, ``records``, ``extra``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..method import atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "ece_plugin"
STATE_PREFIX = "state/"
# Configuration keys that determine the architecture; names differ across families (GPT-2 vs Llama).
_STRUCTURAL_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "max_position_embeddings",
    "tie_word_embeddings",
)

PathLike = Union[str, os.PathLike]


class EditFileError(ValueError):
    """An edit file is malformed, is for another model, or does not match the model's current weights."""


@dataclass
class WeightEdit:
    """The changed neuron slices of one weight matrix."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    neuron_axis: int
    indices: torch.Tensor  # int64 [n]
    original: torch.Tensor  # [n, other] (neuron axis first)
    edited: torch.Tensor  # [n, other]

    @property
    def n_changed(self) -> int:
        return int(self.indices.numel())


@dataclass
class EditFile:
    """An edit file in memory: weight edits, optional sequential state tensors and metadata."""

    fingerprint: dict[str, Any]
    weights: dict[str, WeightEdit]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    hparams: Optional[dict[str, Any]] = None
    records: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (no tensors)."""
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "weights": {
                name: {
                    "shape": list(w.shape),
                    "dtype": str(w.dtype).replace("torch.", ""),
                    "neuron_axis": w.neuron_axis,
                    "n_changed": w.n_changed,
                    "digests": slice_digests(w),
                }
                for name, w in self.weights.items()
            },
            "n_state_tensors": len(self.state),
            "n_records": len(self.records),
        }


# ----------------------------------------------------------------------------- fingerprint
def neuron_axis_of(model: torch.nn.Module, weight_name: str) -> int:
    """Axis of ``weight_name`` that indexes neurons (MLP keys): 0 for GPT-2 ``Conv1D``, else 1."""
    module_name = weight_name.rsplit(".", 1)[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise EditFileError(f"the model has no module {module_name!r} (from weight {weight_name!r})") from exc
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        return 0
    return 1


def config_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the architecture-defining configuration values (stable across transformers versions)."""
    config = getattr(model, "config", None)
    if config is None:
        raise EditFileError("the model has no .config; cannot fingerprint it")
    values = {key: getattr(config, key, None) for key in _STRUCTURAL_CONFIG_KEYS}
    values = {k: v for k, v in values.items() if v is not None}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module, weight_names: Iterable[str]) -> dict[str, Any]:
    """Configuration hash plus the names and shapes of the given weights."""
    params = dict(model.named_parameters())
    shapes = {}
    for name in sorted(weight_names):
        if name not in params:
            raise EditFileError(f"the model has no parameter {name!r}")
        shapes[name] = list(params[name].shape)
    config = getattr(model, "config", None)
    return {
        "config_hash": config_hash(model),
        "model_type": getattr(config, "model_type", None),
        "weights": shapes,
    }


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (first 16 hex digits)."""
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def slice_digests(w: WeightEdit) -> dict[str, str]:
    """:func:`tensor_digest` of a weight edit's own tensors (indices, original and edited slices)."""
    return {"indices": tensor_digest(w.indices), "original": tensor_digest(w.original),
            "edited": tensor_digest(w.edited)}


def model_digests(model: torch.nn.Module, replace: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor of the model's ``state_dict`` (``replace`` gives other values for
    some names, e.g. the weights before an edit)."""
    replace = replace or {}
    return {name: tensor_digest(replace.get(name, t)) for name, t in model.state_dict().items()}


def _differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(n for n in set(expected) & set(actual) if expected[n] != actual[n])
    parts = []
    for label, names in (("differ", changed), ("missing here", missing), ("not in the file's model", extra)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} tensor(s) {label}: {shown}")
    return parts


def _check_whole_model(model: torch.nn.Module, edit: EditFile, *, forward: bool, force: bool) -> bool:
    """Compare the model's tensors with the whole-model fingerprint the file records (edited weights: their
    values before the edit when applying, after it when reverting); True when they all match."""
    before = edit.fingerprint.get("tensors")
    if before is None:
        logger.warning(
            "the edit file has no whole-model fingerprint (written by an older version): only the configuration "
            "and the edited neurons are checked"
        )
        return False
    expected = dict(before)
    if not forward:
        expected.update(edit.fingerprint.get("edited_tensors", {}))
    problems = _differences(expected, model_digests(model))
    if not problems:
        return True
    message = f"the edit file was made for another model: {'; '.join(problems)}"
    if force:
        logger.warning("%s (--force: going on)", message)
        return False
    raise EditFileError(message + " (--force applies it anyway)")


def _check_fingerprint(model: torch.nn.Module, edit: EditFile) -> None:
    expected = edit.fingerprint
    actual = model_fingerprint(model, [n for n in edit.weights if n in dict(model.named_parameters())])
    if actual["config_hash"] != expected.get("config_hash"):
        raise EditFileError(
            "the edit file is for another model: configuration hash "
            f"{str(expected.get('config_hash'))[:12]}... (model_type {expected.get('model_type')!r}) "
            f"!= this model's {actual['config_hash'][:12]}... (model_type {actual['model_type']!r})"
        )
    missing = sorted(set(edit.weights) - set(actual["weights"]))
    if missing:
        raise EditFileError(f"the edit file is for another model: this model has no weight(s) {missing}")
    for name, shape in expected.get("weights", {}).items():
        if actual["weights"].get(name) != list(shape):
            raise EditFileError(
                f"the edit file is for another model: weight {name!r} has shape "
                f"{actual['weights'].get(name)} here, {list(shape)} in the file"
            )


# ----------------------------------------------------------------------------- building
def _slices(weight: torch.Tensor, axis: int, indices: torch.Tensor) -> torch.Tensor:
    """Neuron slices of ``weight`` (neuron axis first), detached, contiguous, on CPU."""
    taken = weight.detach().index_select(axis, indices.to(weight.device))
    if axis != 0:
        taken = taken.transpose(0, axis)
    return taken.contiguous().cpu()


def diff_weights(
    model: torch.nn.Module, original_weights: Mapping[str, torch.Tensor]
) -> dict[str, WeightEdit]:
    """Compare the model's current weights with ``original_weights``; keep the changed neuron slices.

    A neuron counts as changed when any element of its slice differs bit-wise (the float values are
    compared as integers of the same width, so NaN and signed zeros are handled exactly).
    """
    params = dict(model.named_parameters())
    edits: dict[str, WeightEdit] = {}
    for name, orig in original_weights.items():
        if name not in params:
            raise EditFileError(f"the model has no parameter {name!r}")
        current = params[name].detach()
        if tuple(current.shape) != tuple(orig.shape) or current.dtype != orig.dtype:
            raise EditFileError(
                f"{name}: original weight {tuple(orig.shape)} {orig.dtype} does not match the model's "
                f"{tuple(current.shape)} {current.dtype}"
            )
        if current.dim() != 2:
            raise EditFileError(f"{name}: only 2-D weight matrices can be stored, got {current.dim()}-D")
        axis = neuron_axis_of(model, name)
        orig_cpu = orig.detach().cpu()
        diff = _bitwise_ne(current.cpu(), orig_cpu)
        other = 1 - axis
        changed = diff.any(dim=other).nonzero().flatten().to(torch.int64)
        if changed.numel() == 0:
            logger.debug("%s: unchanged", name)
            continue
        edits[name] = WeightEdit(
            name=name,
            shape=tuple(current.shape),
            dtype=current.dtype,
            neuron_axis=axis,
            indices=changed,
            original=_slices(orig_cpu, axis, changed),
            edited=_slices(current, axis, changed),
        )
    return edits


def _bitwise_ne(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise 'bits differ' (so -0.0 vs 0.0 and NaN payloads count as changes)."""
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if a.dtype.is_floating_point:
        return a.contiguous().view(int_dtype) != b.contiguous().view(int_dtype)
    return a != b


def build_edit_file(
    model: torch.nn.Module,
    original_weights: Mapping[str, torch.Tensor],
    *,
    state: Optional[Mapping[str, torch.Tensor]] = None,
    hparams: Optional[dict[str, Any]] = None,
    records: Optional[list[Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> EditFile:
    """An :class:`EditFile` holding the difference between ``original_weights`` and the model now."""
    weights = diff_weights(model, original_weights)
    fingerprint = model_fingerprint(model, weights)
    fingerprint["tensors"] = model_digests(model, replace=original_weights)
    fingerprint["edited_tensors"] = {name: tensor_digest(model.get_parameter(name)) for name in weights}
    return EditFile(
        fingerprint=fingerprint,
        weights=weights,
        state=dict(state or {}),
        hparams=hparams,
        records=list(records or []),
        extra=dict(extra or {}),
    )


# ----------------------------------------------------------------------------- reading / writing
def save_edit_file(edit: EditFile, path: PathLike) -> Path:
    """Write ``edit`` as safetensors (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in edit.weights.items():
        tensors[f"{name}/indices"] = w.indices.contiguous()
        tensors[f"{name}/original"] = w.original.contiguous()
        tensors[f"{name}/edited"] = w.edited.contiguous()
    for key, value in edit.state.items():
        tensors[f"{STATE_PREFIX}{key}"] = value.detach().cpu().contiguous()
    header = edit.summary()
    header.update({"hparams": edit.hparams, "records": edit.records, "extra": edit.extra})
    metadata = {METADATA_KEY: json.dumps(header, default=str)}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    logger.info("wrote edit file %s (%d weight(s))", path, len(edit.weights))
    return path


def _check_weight_edit(path: Path, w: WeightEdit, info: dict[str, Any]) -> None:
    """The file's own consistency for one weight: indices (1-D integers, unique, within the shape), slice shapes,
    and the digests the file records of its tensors (a file without them, from an older version, is read with a
    warning)."""
    where = f"{path}: weight {w.name!r}"
    if w.neuron_axis not in (0, 1) or len(w.shape) != 2:
        raise EditFileError(f"{where}: neuron_axis {w.neuron_axis} / shape {list(w.shape)} is not a 2-D weight's")
    if w.indices.dim() != 1 or w.indices.dtype not in (torch.int64, torch.int32):
        raise EditFileError(f"{where}: indices must be a 1-D integer tensor, got {w.indices.dtype} "
                            f"{list(w.indices.shape)}")
    w.indices = w.indices.to(torch.int64)
    n_neurons = w.shape[w.neuron_axis]
    if w.indices.numel():
        low, high = int(w.indices.min()), int(w.indices.max())
        if low < 0 or high >= n_neurons:
            bad = low if low < 0 else high
            raise EditFileError(f"{where}: neuron index {bad} outside 0..{n_neurons - 1}")
        if int(torch.unique(w.indices).numel()) != w.n_changed:
            raise EditFileError(f"{where}: neuron indices repeat")
    if w.original.dim() != 2 or w.original.shape[1] != w.shape[1 - w.neuron_axis]:
        raise EditFileError(f"{where}: slices of shape {list(w.original.shape)} do not fit the weight's "
                            f"{list(w.shape)}")
    digests = info.get("digests")
    if digests is None:
        logger.warning("%s: no digests of its tensors (an older version wrote it): they are not checked", where)
        return
    for label, actual in slice_digests(w).items():
        if not isinstance(digests, dict) or digests.get(label) != actual:
            raise EditFileError(f"{where}: tensor {label!r} does not match the file's digest (the file was changed "
                                "or damaged)")


def load_edit_file(path: PathLike) -> EditFile:
    """Read an edit file written by :func:`save_edit_file`; clear errors for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise EditFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise EditFileError(f"{path}: not an ece-plugin edit file (no '{METADATA_KEY}' metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise EditFileError(f"{path}: corrupt metadata ({exc})") from exc
    if not isinstance(header, dict) or not all(isinstance(header.get(k, {}), dict) for k in ("weights", "fingerprint")):
        raise EditFileError(
            f"{path}: corrupt metadata ('{METADATA_KEY}' must hold an object whose 'weights' and 'fingerprint' are "
            "objects)"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise EditFileError(
            f"{path}: edit file format {header.get('format_version')} not supported (need {FORMAT_VERSION})"
        )
    weights: dict[str, WeightEdit] = {}
    for name, info in header.get("weights", {}).items():
        if not isinstance(info, dict) or not {"shape", "neuron_axis"} <= set(info):
            raise EditFileError(f"{path}: metadata of weight {name!r} lacks 'shape' or 'neuron_axis'")
        try:
            indices = tensors[f"{name}/indices"]
            original = tensors[f"{name}/original"]
            edited = tensors[f"{name}/edited"]
        except KeyError as exc:
            raise EditFileError(f"{path}: weight {name!r} lacks tensor {exc}") from exc
        if original.shape != edited.shape or original.shape[0] != indices.numel():
            raise EditFileError(f"{path}: weight {name!r}: inconsistent tensor shapes")
        weight = WeightEdit(
            name=name,
            shape=tuple(info["shape"]),
            dtype=original.dtype,
            neuron_axis=int(info["neuron_axis"]),
            indices=indices,
            original=original,
            edited=edited,
        )
        _check_weight_edit(path, weight, info)
        weights[name] = weight
    state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return EditFile(
        fingerprint=header.get("fingerprint", {}),
        weights=weights,
        state=state,
        hparams=header.get("hparams"),
        records=header.get("records") or [],
        extra=header.get("extra") or {},
    )


# ----------------------------------------------------------------------------- apply / revert
def _write_slices(model: torch.nn.Module, edit: EditFile, *, forward: bool, force: bool = False) -> list[str]:
    """Check the model (configuration, expected slices, whole-model fingerprint unless ``force``), then write
    the other side; returns names written."""
    _check_fingerprint(model, edit)
    params = dict(model.named_parameters())
    expect_label, expect_side = ("original", "original") if forward else ("edited", "edited")
    for name, w in edit.weights.items():
        param = params[name]
        if param.dtype != w.dtype:
            raise EditFileError(f"{name}: the model holds {param.dtype}, the edit file {w.dtype}")
        if w.indices.numel() and (int(w.indices.min()) < 0 or int(w.indices.max()) >= param.shape[w.neuron_axis]):
            raise EditFileError(f"{name}: neuron index out of range for shape {tuple(param.shape)}")
        current = _slices(param, w.neuron_axis, w.indices)
        expected = getattr(w, expect_side)
        if _bitwise_ne(current, expected).any():
            n_bad = int(_bitwise_ne(current, expected).any(dim=1).sum())
            what = "apply it to" if forward else "revert it from"
            raise EditFileError(
                f"{name}: the model does not hold the {expect_label} values of {n_bad} of the "
                f"{w.n_changed} edited neuron(s); refusing to {what} this model"
            )
    for name, w in edit.weights.items():
        values = w.edited if forward else w.original
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            side = "edited" if forward else "original"
            raise EditFileError(f"{name}: the file's {side} values hold {bad} non-finite value(s); nothing written")
    clean = _check_whole_model(model, edit, forward=forward, force=force)
    previous = {name: _slices(params[name], w.neuron_axis, w.indices) for name, w in edit.weights.items()}
    written = []
    try:
        for name, w in edit.weights.items():
            _put_slices(params[name], w, w.edited if forward else w.original)
            written.append(name)
        if clean:
            _check_promised(model, edit, forward=forward)
    except BaseException:
        for name in written:
            _put_slices(params[name], edit.weights[name], previous[name])
        raise
    return written


def _put_slices(param: torch.Tensor, w: WeightEdit, values: torch.Tensor) -> None:
    with torch.no_grad():
        values = values.to(param.device)
        if w.neuron_axis != 0:
            values = values.transpose(0, w.neuron_axis)
        param.index_copy_(w.neuron_axis, w.indices.to(param.device), values.contiguous())


def _check_promised(model: torch.nn.Module, edit: EditFile, *, forward: bool) -> None:
    """After writing: each written weight has the digest the file promises (edited weights after applying,
    original weights after reverting)."""
    promised = edit.fingerprint.get("edited_tensors" if forward else "tensors")
    if not promised:
        return
    for name in edit.weights:
        if name in promised and tensor_digest(model.get_parameter(name)) != promised[name]:
            raise EditFileError(f"{name}: after writing, the weight does not match the file's fingerprint; "
                                "the model was put back as it was")


def apply_edit_file(model: torch.nn.Module, edit: Union[EditFile, PathLike], force: bool = False) -> list[str]:
    """Put the edit on ``model`` in place (bit-exact); refuse when the model is not the original (``force``:
    only warn when tensors outside the edited neurons differ from the file's fingerprint)."""
    edit = edit if isinstance(edit, EditFile) else load_edit_file(edit)
    return _write_slices(model, edit, forward=True, force=force)


def revert_edit_file(model: torch.nn.Module, edit: Union[EditFile, PathLike], force: bool = False) -> list[str]:
    """Take the edit off ``model`` in place (bit-exact); refuse when the model does not hold the edit (``force``
    as for :func:`apply_edit_file`)."""
    edit = edit if isinstance(edit, EditFile) else load_edit_file(edit)
    return _write_slices(model, edit, forward=False, force=force)


# ----------------------------------------------------------------------------- sequential state
_STATE_META = "__meta__"


def state_to_tensors(state: Any, model: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """The tensors (and metadata, as a uint8 tensor) of a :class:`~ece_plugin.method.state.SequentialState`,
    to store in an edit file; empty for ``None``."""
    if state is None:
        return {}
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        state.save(path, model)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.dumps(f.metadata() or {})
    tensors[_STATE_META] = torch.tensor(list(meta.encode()), dtype=torch.uint8)
    return tensors


def state_from_edit_file(edit: EditFile, model: Optional[torch.nn.Module] = None) -> Any:
    """The :class:`~ece_plugin.method.state.SequentialState` stored in ``edit`` (None when it holds none)."""
    if not edit.state or _STATE_META not in edit.state:
        return None
    from safetensors.torch import save_file

    from ..method.state import SequentialState

    try:
        meta = json.loads(bytes(edit.state[_STATE_META].tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EditFileError(f"the edit file's sequential state has corrupt metadata ({exc})") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise EditFileError("the edit file's sequential state has corrupt metadata (not a mapping of strings)")
    tensors = {k: v.contiguous() for k, v in edit.state.items() if k != _STATE_META}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        save_file(tensors, str(path), metadata=meta)
        return SequentialState.load(path, model)
