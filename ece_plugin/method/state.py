"""Sequential-editing state: the second moment of the keys of earlier edits, ``Cprev = sum k k^T``.

ECE's update for layer l restricts the least-squares solve to the selected neurons S and adds the keys
of earlier edits, ``Cprev[S, S]``, so that later edits preserve earlier ones. :class:`SequentialState`
carries, per layer name (the W_out module, e.g. ``model.layers.5.mlp.down_proj``), either

* the keys themselves, ``K`` of shape ``[d_ff, n]`` (low rank), while ``2 n <= d_ff``; or
* the dense sum ``K K^T`` of shape ``[d_ff, d_ff]`` once ``2 n > d_ff`` (the switch is exact up to
  float32 rounding; the dense form never grows again).

Sizes (float32): keys cost ``4 d_ff n`` bytes; the dense form ``4 d_ff^2``. For Llama-3-8B
(d_ff = 14336) a dense layer is 822 MB, so five edited layers hold 4.1 GB once more than 7168 edits have
been made; 1000 edits cost 57 MB per layer in the low-rank form. ``device='cpu'`` (default) keeps the
state off the accelerator; ``device='model'`` keeps each layer's tensors where its keys were computed.

Commit protocol (works in both EasyEdit lines). An edit calls :meth:`SequentialState.stage` with its keys
and the W_out neuron values it wrote; nothing is accumulated yet. At the start of the next batch (and in
:meth:`save`) the editor calls :meth:`reconcile` with the model:

* W_out still holds the post-edit values at those neurons -> the edit persisted (EasyEdit main with
  ``sequential_edit=True``; easyeditor 0.0.1.dev0 without ``keep_original_weight``): commit.
* they hold the pre-edit values (EasyEdit main restored ``weights_copy`` after a non-sequential edit;
  0.0.1.dev0 with ``keep_original_weight=True``): discard silently (debug log).
* anything else: warn and discard.

Neuron axis. W_out neuron k is COLUMN k of an ``nn.Linear`` weight ``[d_model, d_ff]`` (axis 1) and ROW k
of a GPT-2 ``Conv1D`` weight ``[d_ff, d_model]`` (axis 0). ``written`` values are the slices
``neuron_values(weight, idx, axis=...)`` returns; the axis may be given explicitly (third tuple element,
or :class:`WrittenNeurons`), otherwise it is taken from the owning module's class at reconcile time.

Fading keys (for a variant's keys staged with a decay gamma < 1, e.g. ``prompt_keys_decay``; see
``variants/``). A batch may stage ``protected`` keys beside its own: they go to a dense moment of their own,
``P <- gamma P + K_P K_P^T`` at each commit, and :meth:`cprev` / :meth:`cprev_masked` return ``K K^T + P``. Keys a
variant carries at full weight are staged among the edits' keys instead.

File format (:meth:`save`): one safetensors file; tensors ``"{layer}::keys"`` or ``"{layer}::dense"``, and
``"{layer}::protected"`` where keys fade;
the header metadata key ``ece_state`` holds JSON (format version, layer names, kinds, d_ff, n, n_edits,
model fingerprint). Written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import atomic
from .finite import count_nonfinite, describe_nonfinite
from .statistics import StatisticsCache, model_fingerprint, module_input_dim

logger = logging.getLogger(__name__)

STATE_FORMAT = "ece-sequential-state"
STATE_VERSION = 1
_META_KEY = "ece_state"


class StateError(ValueError):
    """The sequential state is used wrongly or a state file is unreadable."""


class StateMismatchError(StateError):
    """A saved state belongs to another model or another layer shape."""


# ------------------------------------------------------------------------------------------ neurons
def neuron_axis(conv1d: bool) -> int:
    """The axis of W_out that indexes neurons: 0 for GPT-2 Conv1D ``[d_ff, d_model]``, 1 for Linear."""
    return 0 if conv1d else 1


def neuron_values(
    weight: torch.Tensor, idx: torch.Tensor, conv1d: bool = False, *, axis: Optional[int] = None
) -> torch.Tensor:
    """The W_out slice of neurons ``idx``: columns of an nn.Linear weight, rows of a Conv1D weight."""
    ax = neuron_axis(conv1d) if axis is None else axis
    return weight.detach().index_select(ax, torch.as_tensor(idx, dtype=torch.long, device=weight.device))


@dataclass
class WrittenNeurons:
    """Neuron values an edit wrote into one W_out weight (``pre`` optional: tells restore from other)."""

    idx: torch.Tensor
    post: torch.Tensor
    axis: Optional[int] = None
    pre: Optional[torch.Tensor] = None

    @classmethod
    def coerce(cls, value: Any) -> WrittenNeurons:
        if isinstance(value, WrittenNeurons):
            item = value
        elif isinstance(value, (tuple, list)) and 2 <= len(value) <= 4:
            item = cls(*value)
        else:
            raise StateError(
                "written values must be WrittenNeurons or (idx, post_values[, axis[, pre_values]]) tuples"
            )
        return cls(
            idx=torch.as_tensor(item.idx, dtype=torch.long).detach().cpu().clone(),
            post=item.post.detach().cpu().clone(),
            axis=item.axis,
            pre=None if item.pre is None else item.pre.detach().cpu().clone(),
        )


@dataclass
class _Pending:
    keys: dict[str, torch.Tensor]
    written: dict[str, WrittenNeurons]
    n_edits: int
    protected: Optional[dict[str, torch.Tensor]] = None  # [d_ff, m] per layer, fading by decay
    decay: float = 1.0


@dataclass
class _LayerMoment:
    d_ff: int
    keys: Optional[torch.Tensor] = None  # [d_ff, n]
    dense: Optional[torch.Tensor] = None  # [d_ff, d_ff]
    protected: Optional[torch.Tensor] = None  # P = sum_b gamma^(age b) K_P K_P^T, [d_ff, d_ff] (fading keys)

    @property
    def n(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[1])

    @property
    def empty(self) -> bool:
        return self.keys is None and self.dense is None

    def nbytes(self) -> int:
        total = 0
        for t in (self.keys, self.dense, self.protected):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


@dataclass(frozen=True)
class StateCheckpoint:
    """A :class:`SequentialState` as it was at :meth:`SequentialState.checkpoint`."""

    layers: dict[str, _LayerMoment]
    pending: Optional[_Pending]
    n_edits: int
    fingerprint: Optional[dict[str, Any]]


# ---------------------------------------------------------------------------------------- the state
class SequentialState:
    """Per-layer ``Cprev = sum k k^T`` over committed edits, low rank while small, dense afterwards."""

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if device != "model":
            torch.device(device)  # validates the string
        self.device = device
        self.dtype = dtype
        self._layers: dict[str, _LayerMoment] = {}
        self._pending: Optional[_Pending] = None
        self.n_edits = 0
        self.fingerprint: Optional[dict[str, Any]] = None

    # -------------------------------------------------------------------------------- reading
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def is_dense(self, layer_name: str) -> bool:
        layer = self._layers.get(layer_name)
        return layer is not None and layer.dense is not None

    def n_keys(self, layer_name: str) -> int:
        """Number of key columns held in low-rank form (0 once dense)."""
        layer = self._layers.get(layer_name)
        return 0 if layer is None else layer.n

    def nbytes(self) -> int:
        total = sum(layer.nbytes() for layer in self._layers.values())
        if self._pending is not None:
            total += sum(k.numel() * k.element_size() for k in self._pending.keys.values())
        return total

    def cprev(self, layer_name: str, dtype: torch.dtype = torch.float64) -> Optional[torch.Tensor]:
        """The full ``d_ff x d_ff`` Cprev of a layer (None when nothing was committed there)."""
        layer = self._layers.get(layer_name)
        if layer is None:
            return None
        if layer.dense is not None:
            out = layer.dense.to(dtype)
        else:
            assert layer.keys is not None
            k = layer.keys.to(dtype)
            out = k @ k.T
        return out if layer.protected is None else out + layer.protected.to(out)

    def cprev_masked(
        self,
        layer_name: str,
        idx: torch.Tensor,
        device: Union[str, torch.device],
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """``Cprev[idx][:, idx]`` (|S| x |S|) on ``device``; zeros when nothing was committed."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        n = int(idx.numel())
        layer = self._layers.get(layer_name)
        if layer is None:
            return torch.zeros(n, n, dtype=dtype, device=device)
        if layer.dense is not None:
            sel = idx.to(layer.dense.device)
            block = layer.dense.index_select(0, sel).index_select(1, sel).to(device=device, dtype=dtype)
        else:
            assert layer.keys is not None
            ks = layer.keys.index_select(0, idx.to(layer.keys.device)).to(device=device, dtype=dtype)
            block = ks @ ks.T
        if layer.protected is not None:
            sel = idx.to(layer.protected.device)
            block = block + layer.protected.index_select(0, sel).index_select(1, sel).to(device=device, dtype=dtype)
        return block

    # -------------------------------------------------------------------------------- writing
    def _place(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(self.dtype)
        return t if self.device == "model" else t.to(self.device)

    def stage(
        self,
        keys: dict[str, torch.Tensor],
        written: dict[str, Any],
        n_edits: int,
        protected: Optional[dict[str, torch.Tensor]] = None,
        decay: float = 1.0,
    ) -> None:
        """Hold one batch's keys (``[d_ff, n]`` per layer) until :meth:`reconcile` sees the model. ``protected``
        keys (``[d_ff, m]``, already scaled) go to the fading moment P, which the commit first multiplies by
        ``decay``."""
        if self._pending is not None:
            raise StateError("a staged batch is pending: call reconcile(model) before staging another")
        if n_edits < 1:
            raise StateError(f"n_edits must be >= 1, got {n_edits}")
        placed: dict[str, torch.Tensor] = {}
        for name, k in keys.items():
            if k.dim() != 2:
                raise StateError(f"keys for {name}: expected [d_ff, n], got shape {tuple(k.shape)}")
            layer = self._layers.get(name)
            if layer is not None and layer.d_ff != k.shape[0]:
                raise StateError(f"keys for {name}: d_ff {k.shape[0]} != {layer.d_ff} of earlier edits")
            placed[name] = self._place(k).clone()
        placed_protected = self._check_protected(protected, keys, decay)
        self._pending = _Pending(
            keys=placed,
            written={w: WrittenNeurons.coerce(v) for w, v in written.items()},
            n_edits=int(n_edits),
            protected=placed_protected,
            decay=float(decay),
        )

    def _check_protected(
        self, protected: Optional[dict[str, torch.Tensor]], keys: dict[str, torch.Tensor], decay: float
    ) -> Optional[dict[str, torch.Tensor]]:
        if not (0.0 < decay <= 1.0):
            raise StateError(f"decay must lie in (0, 1], got {decay}")
        if protected is None:
            return None
        placed: dict[str, torch.Tensor] = {}
        for name, kp in protected.items():
            if name not in keys:
                raise StateError(f"protected keys for {name} but no edit keys for that layer")
            if kp.dim() != 2 or kp.shape[0] != keys[name].shape[0]:
                raise StateError(f"protected keys for {name}: expected [{keys[name].shape[0]}, m], got {tuple(kp.shape)}")
            placed[name] = self._place(kp).clone()
        return placed

    def _commit(self, pending: _Pending) -> None:
        for name, k in pending.keys.items():
            layer = self._layers.setdefault(name, _LayerMoment(d_ff=int(k.shape[0])))
            if layer.dense is not None:
                kd = k.to(layer.dense.device, torch.float64)
                # out of place: a checkpoint taken before this commit still holds the old tensor
                layer.dense = layer.dense + (kd @ kd.T).to(layer.dense.dtype)
                continue
            layer.keys = k if layer.keys is None else torch.cat([layer.keys, k.to(layer.keys.device)], dim=1)
            if 2 * layer.n > layer.d_ff:
                kd = layer.keys.to(torch.float64)
                layer.dense = (kd @ kd.T).to(self.dtype)
                layer.keys = None
                logger.info("sequential state %s: switched to the dense %dx%d form", name, layer.d_ff, layer.d_ff)
        self._commit_protected(pending)
        self.n_edits += pending.n_edits

    def _commit_protected(self, pending: _Pending) -> None:
        """``P <- decay * P + K_P K_P^T`` for every layer; a layer's P fades even in a batch without prompt keys."""
        fresh = pending.protected or {}
        for name, layer in self._layers.items():
            kp = fresh.get(name)
            if layer.protected is None and kp is None:
                continue
            old = None if layer.protected is None else layer.protected * pending.decay
            if kp is not None:
                kd = kp.to(torch.float64)
                add = (kd @ kd.T).to(self.dtype)
                old = add if old is None else old + add.to(old.device)
            layer.protected = old  # out of place: a checkpoint taken before this commit still holds the old tensor

    def reconcile(self, model: nn.Module) -> str:
        """Commit or discard the staged batch by looking at W_out; returns what happened.

        One of ``'none'`` (nothing staged), ``'committed'``, ``'discarded-restored'``,
        ``'discarded-changed'``.
        """
        pending = self._pending
        if pending is None:
            return "none"
        self._pending = None
        verdicts = [_verdict(model, name, w) for name, w in pending.written.items()]
        if all(v == "post" for v in verdicts):
            self._commit(pending)
            if self.fingerprint is None:
                self.fingerprint = model_fingerprint(model)
            logger.debug("sequential state: committed %d edit(s)", pending.n_edits)
            return "committed"
        if all(v in ("pre", "not-post") for v in verdicts):
            logger.debug("sequential state: W_out was restored, %d edit(s) discarded", pending.n_edits)
            return "discarded-restored"
        logger.warning(
            "sequential state: W_out holds neither the post-edit nor the pre-edit values of the last "
            "batch (%s); its %d edit(s) are not carried",
            ", ".join(f"{n}: {v}" for n, v in zip(pending.written, verdicts)),
            pending.n_edits,
        )
        return "discarded-changed"

    def checkpoint(self) -> StateCheckpoint:
        """What :meth:`rollback` needs to put this state back exactly as it is now (no tensor is copied: the
        state never changes a tensor in place, it replaces it)."""
        return StateCheckpoint(
            layers={name: dataclasses.replace(layer) for name, layer in self._layers.items()},
            pending=self._pending,
            n_edits=self.n_edits,
            fingerprint=copy.deepcopy(self.fingerprint),
        )

    def rollback(self, checkpoint: StateCheckpoint) -> None:
        """Return to the state of :meth:`checkpoint` (a failed or interrupted edit leaves no trace)."""
        self._layers = {name: dataclasses.replace(layer) for name, layer in checkpoint.layers.items()}
        self._pending = checkpoint.pending
        self.n_edits = checkpoint.n_edits
        self.fingerprint = copy.deepcopy(checkpoint.fingerprint)

    def reset(self) -> None:
        self._layers.clear()
        self._pending = None
        self.n_edits = 0
        self.fingerprint = None

    # -------------------------------------------------------------------------------- files
    def save(self, path: Union[str, Path], model: Optional[nn.Module] = None) -> None:
        """Write the committed state atomically (reconciling first when ``model`` is given)."""
        from safetensors.torch import save_file

        if model is not None:
            self.reconcile(model)
            if self.fingerprint is None:
                self.fingerprint = model_fingerprint(model)
        elif self._pending is not None:
            logger.warning("sequential state: a staged batch is not saved (pass the model to reconcile it)")
        tensors: dict[str, torch.Tensor] = {}
        layers_meta: dict[str, dict[str, Any]] = {}
        for name, layer in self._layers.items():
            kind = "dense" if layer.dense is not None else "keys"
            tensor = layer.dense if layer.dense is not None else layer.keys
            assert tensor is not None
            tensors[f"{name}::{kind}"] = tensor.detach().cpu().contiguous().clone()
            layers_meta[name] = {"kind": kind, "d_ff": layer.d_ff, "n": layer.n}
            if layer.protected is not None:
                tensors[f"{name}::protected"] = layer.protected.detach().cpu().contiguous().clone()
                layers_meta[name]["protected"] = True
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "n_edits": self.n_edits,
            "layers": layers_meta,
            "fingerprint": self.fingerprint,
        }
        with atomic.atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(
        cls, path: Union[str, Path], model: Optional[nn.Module] = None, device: str = "cpu"
    ) -> SequentialState:
        """Read a saved state; with ``model``, refuse a state for another model or layer shape."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sequential state file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise StateError(f"{path}: not a readable safetensors file ({exc})") from exc
        if _META_KEY not in header:
            raise StateError(f"{path}: not an ECE sequential state (no '{_META_KEY}' metadata)")
        meta = _read_meta(path, header[_META_KEY])
        state = cls(device=device)
        state.n_edits = meta["n_edits"]
        state.fingerprint = meta.get("fingerprint")
        for name, info in meta["layers"].items():
            kind, d_ff = info["kind"], info["d_ff"]
            tensor = tensors.get(f"{name}::{kind}")
            if tensor is None:
                raise StateError(f"{path}: tensor for layer {name!r} missing")
            if tensor.dim() != 2 or tensor.shape[0] != d_ff or (kind == "dense" and tuple(tensor.shape) != (d_ff, d_ff)):
                raise StateError(f"{path}: layer {name!r} tensor shape {tuple(tensor.shape)} != d_ff {d_ff}")
            if count_nonfinite(tensor):
                raise StateError(f"{path}: layer {name!r} ({kind}): {describe_nonfinite(tensor)}")
            placed = state._place(tensor)
            protected = None
            if info.get("protected"):
                protected = tensors.get(f"{name}::protected")
                if protected is None:
                    raise StateError(f"{path}: fading-key moment for layer {name!r} missing")
                if tuple(protected.shape) != (d_ff, d_ff):
                    raise StateError(f"{path}: layer {name!r} fading-key moment shape {tuple(protected.shape)} "
                                     f"!= ({d_ff}, {d_ff})")
                if count_nonfinite(protected):
                    raise StateError(f"{path}: layer {name!r} (protected): {describe_nonfinite(protected)}")
                protected = state._place(protected)
            state._layers[name] = _LayerMoment(
                d_ff=d_ff,
                keys=placed if kind == "keys" else None,
                dense=placed if kind == "dense" else None,
                protected=protected,
            )
        if model is not None:
            state.check_model(model, source=str(path))
        return state

    def check_model(self, model: nn.Module, source: str = "state") -> None:
        """Raise :class:`StateMismatchError` when this state cannot belong to ``model``."""
        problems: list[str] = []
        if self.fingerprint is not None:
            ours = model_fingerprint(model)
            for key in ("config_hash", "hidden_size", "num_hidden_layers", "model_type"):
                if self.fingerprint.get(key) != ours.get(key):
                    problems.append(f"{key} {self.fingerprint.get(key)!r} != model's {ours.get(key)!r}")
        for name, layer in self._layers.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                problems.append(f"layer {name!r} does not exist in the model")
                continue
            d_ff = module_input_dim(module)
            if d_ff != layer.d_ff:
                problems.append(f"layer {name!r} has d_ff {d_ff}, the state {layer.d_ff}")
        if problems:
            raise StateMismatchError(f"{source} does not fit this model: {'; '.join(problems)}")


def _read_meta(path: Path, text: str) -> dict[str, Any]:
    """The state file's JSON metadata, checked key by key (errors name the file and the key)."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: corrupt '{_META_KEY}' metadata (not JSON: {exc})") from exc
    if not isinstance(meta, dict):
        raise StateError(f"{path}: '{_META_KEY}' metadata must be a JSON object")
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise StateError(
            f"{path}: unsupported state format {meta.get('format')!r} version {meta.get('version')!r}"
        )
    n_edits = meta.get("n_edits", 0)
    if not isinstance(n_edits, int) or isinstance(n_edits, bool) or n_edits < 0:
        raise StateError(f"{path}: metadata key 'n_edits' must be an integer >= 0, got {n_edits!r}")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise StateError(f"{path}: metadata key 'layers' must be an object, got {type(layers).__name__}")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise StateError(f"{path}: metadata of layer {name!r} must be an object")
        for key in ("kind", "d_ff"):
            if key not in info:
                raise StateError(f"{path}: metadata of layer {name!r} lacks key {key!r}")
        if info["kind"] not in ("keys", "dense"):
            raise StateError(f"{path}: layer {name!r}: key 'kind' must be 'keys' or 'dense', got {info['kind']!r}")
        d_ff = info["d_ff"]
        if not isinstance(d_ff, int) or isinstance(d_ff, bool) or d_ff < 1:
            raise StateError(f"{path}: layer {name!r}: key 'd_ff' must be a positive integer, got {d_ff!r}")
    fingerprint = meta.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise StateError(f"{path}: metadata key 'fingerprint' must be an object or null")
    meta["n_edits"], meta["layers"] = n_edits, layers
    return meta


def _verdict(model: nn.Module, weight_name: str, w: WrittenNeurons) -> str:
    """'post' (still the edited values), 'pre' (restored), 'not-post' (differs; pre unknown), 'other'."""
    try:
        param = model.get_parameter(weight_name)
    except AttributeError:
        return "missing"
    axis = w.axis
    if axis is None:
        owner = model.get_submodule(weight_name.rsplit(".", 1)[0]) if "." in weight_name else model
        axis = neuron_axis(type(owner).__name__ == "Conv1D")
    if w.idx.numel() and int(w.idx.max()) >= param.shape[axis]:
        return "other"
    current = neuron_values(param, w.idx, axis=axis).cpu()
    if current.shape != w.post.shape:
        return "other"
    if torch.equal(current.to(w.post.dtype), w.post):
        return "post"
    if w.pre is None:
        return "not-post"
    if current.shape == w.pre.shape and torch.equal(current.to(w.pre.dtype), w.pre):
        return "pre"
    return "other"


# -------------------------------------------------------------------------------------- sessions
@dataclass
class EditSession:
    """What ECE keeps between calls on one model: carried keys, statistics, last trace, templates."""

    state: SequentialState
    statistics: StatisticsCache = field(default_factory=StatisticsCache)
    last_trace: Optional[Any] = None
    context_templates: Optional[Any] = None  # cached context templates (the editor decides the form)

    def __deepcopy__(self, memo: dict[int, Any]) -> EditSession:
        """A deep-copied model gets its own copy of the sequential state; the statistics cache (read-only C0
        matrices, gigabytes for Llama-3-8B) and the context templates are shared, not duplicated."""
        return EditSession(
            state=copy.deepcopy(self.state, memo),
            statistics=self.statistics,
            last_trace=self.last_trace,
            context_templates=self.context_templates,
        )


SESSION_ATTR = "_ece_session"


def get_session(model: nn.Module, hparams: Any = None) -> EditSession:
    """The model's :class:`EditSession` (attribute ``_ece_session``), created on first use."""
    session = model.__dict__.get(SESSION_ATTR)
    if isinstance(session, EditSession):
        return session
    device = str(getattr(hparams, "state_device", "cpu") or "cpu")
    session = EditSession(state=SequentialState(device=device))
    # object.__setattr__ skips nn.Module's registration logic; the session is plain Python state
    object.__setattr__(model, SESSION_ATTR, session)
    return session


def reset_session(model: nn.Module) -> None:
    """Forget everything ECE carried for this model (sequential keys, statistics, templates)."""
    if SESSION_ATTR in model.__dict__:
        del model.__dict__[SESSION_ATTR]
