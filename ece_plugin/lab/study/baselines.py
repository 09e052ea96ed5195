"""Editing methods the studies compare, behind one small interface.

* :class:`ECEMethod` - this project's ECE (``apply_ece_to_model``) with a variant's hyperparameters
  (ECE-AS / ECE-WI / ECE-RS; clustering off and p = 1 is the 'MEMIT-equivalent (project code)').
* :class:`EasyEditMethod` - EasyEdit's own editors (ROME, MEMIT, AlphaEdit in both EasyEdit lines; EMMET,
  PMET, SPHERE, ULTRAEDIT, WISE, GRACE from EasyEdit main), with EasyEdit's hyperparameter classes read from
  YAML, through EasyEdit's own ``BaseEditor`` (``batch_edit(..., sequential_edit=True)`` for the methods
  EasyEdit lists as batchable, ``edit(..., sequential_edit=True)``, one request per call, for the others)
  sharing the model object, so that every method is evaluated by the same code on the same model.
  easyeditor 0.0.1.dev0's ``BaseEditor`` always restores the
  weights after a batch, so there (and with ``via="apply"``) the apply function EasyEdit registers in
  ``ALG_DICT`` -- the one ``BaseEditor`` calls -- is called directly. Whether the installed EasyEdit can run
  on the device is asked of :func:`ece_plugin.easyedit.can_run_on`; a method that cannot run says why in one
  line.

Every method edits a model in place, one batch of EasyEdit request dicts at a time, and keeps sequential
state between batches until :meth:`EditMethod.reset`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ...easyedit import BASELINES as EASYEDIT_BASELINES
from ...easyedit import NULL_SPACE_BASELINES
from ...evaluation.scoring import PromptEndHook
from ...method.hparams import ECEHyperParams
from .common import StudyError, weight_names

logger = logging.getLogger(__name__)

BASELINES = tuple(EASYEDIT_BASELINES)
#: Baselines added from EasyEdit main's lifelong editors: their table names say where the code comes from.
EASYEDIT_MAIN_LIFELONG = ("EMMET", "PMET", "SPHERE", "ULTRAEDIT", "WISE", "GRACE")
#: Method names that run a baseline another way than EasyEdit's own BaseEditor call: name -> (alg, via, label).
#: SPHERE is not batchable in EasyEdit main (BaseEditor.edit, one request per call, as its example script runs
#: it); its apply function takes a whole batch, one z per request and one update per batch, as AlphaEdit's does.
BASELINE_ALIASES: dict[str, tuple[str, str, str]] = {
    "SPHERE-batched": ("SPHERE", "apply", "SPHERE (EasyEdit, batched apply)"),
}


#: EasyEdit main editors that replace a module of the model by their own and need their own class to run in the
#: studies (undo, checkpoints, scoring): the plain class refuses them with this. GRACE's adapter runs as it is
#: (:class:`~.grace.GraceMethod` adds where it reads).
OWN_CLASS_BASELINES: dict[str, str] = {
    "WISE": "EasyEdit WISE swaps the edited down_proj for its side-memory module: run it as WiseMethod "
    "(build_methods), which keeps one adapter for the sequence, routes each scored prompt alone and gives loc_prompts",
}


def baseline_label(alg: str) -> str:
    """The table name of an EasyEdit baseline run through BaseEditor."""
    return f"{alg} (EasyEdit)" if alg in EASYEDIT_MAIN_LIFELONG else alg
ECE_VARIANTS: dict[str, dict[str, Any]] = {
    "ECE": {},
    "ECE-AS": {"attribution": "AS"},
    "ECE-WI": {"attribution": "WI"},
    "ECE-RS": {"attribution": "RS"},
    # The configured attribution, neuron selection and masked update with clustering off: every edit's z from
    # zero with v_num_grad_steps batched steps (no shared phase).
    "ECE-unclustered": {"clustering": False},
    # Clustering off and p = 1: every neuron, MEMIT's z -> MEMIT's update computed by this project's code.
    # MEMIT carries nothing between sequential batches: no Cprev either.
    "MEMIT-equivalent": {"clustering": False, "neuron_threshold": 1.0, "carry_keys": False},
}
MEMIT_EQUIVALENT_LABEL = "MEMIT-equivalent (project code)"


def variant_label(variant: str, hparams: ECEHyperParams) -> str:
    """The table name of an ECE variant run with ``hparams``."""
    if variant == "MEMIT-equivalent":
        return MEMIT_EQUIVALENT_LABEL
    if variant == "ECE-unclustered":
        return f"ECE-{hparams.attribution} (clustering off)"
    return f"ECE-{hparams.attribution}" if variant == "ECE" else variant


@dataclass
class BatchOutcome:
    """What editing one batch produced."""

    seconds: float
    trace: Optional[dict[str, Any]] = None  # ECE's trace of the batch (None for EasyEdit's baselines)
    via: str = "ece_plugin"  # how the edit was made: ece_plugin, BaseEditor.batch_edit, BaseEditor.edit, apply function


class EditMethod(Protocol):
    """An editing method as the studies drive it."""

    name: str

    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        """(True, '') when the method can run on this model/device, else (False, one-line reason)."""
        ...

    def edited_weight_names(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters an edit may change (snapshot these to restore the model)."""
        ...

    def prepare(self, model: torch.nn.Module, tok: Any) -> None:
        """One-off work outside the timed edits (e.g. make sure statistics exist)."""
        ...

    def reset(self, model: torch.nn.Module) -> None:
        """Forget sequential state (start a new sequence of edits)."""
        ...

    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        """Edit ``model`` in place with one batch of requests."""
        ...


def prompt_end_hook(method: Any) -> Optional[PromptEndHook]:
    """The method's ``prompt_end_hook``, for an edited model whose forward reads where a prompt ends (GRACE:
    :class:`~.grace.GraceMethod`); None for every other method, whose scoring needs none."""
    hook: Optional[PromptEndHook] = getattr(method, "prompt_end_hook", None)
    return hook


# ----------------------------------------------------------------------------- ECE
def ece_variant_hparams(base: ECEHyperParams, variant: str, **overrides: Any) -> ECEHyperParams:
    """A copy of ``base`` with a named variant's settings (see :data:`ECE_VARIANTS`) and ``overrides``."""
    if variant not in ECE_VARIANTS:
        raise StudyError(f"unknown ECE variant {variant!r}; known: {sorted(ECE_VARIANTS)}")
    changes = {**ECE_VARIANTS[variant], **overrides}
    if not changes.get("clustering", base.clustering) and "v_num_grad_steps" not in changes:
        # Same number of z steps as ECE's two phases, so the comparison is step for step.
        changes["v_num_grad_steps"] = max(base.v_num_grad_steps, 1)
    new = dataclasses.replace(copy.deepcopy(base), **changes)
    new.validate()
    return new


def ensure_statistics(model: torch.nn.Module, tok: Any, hparams: Any, progress: bool = True) -> list[str]:
    """Compute (one pass, progress bar) and cache in EasyEdit's layout the second-moment statistics of the
    layers ``hparams`` edits that have no cache file yet; returns the layer names computed.

    A cache file that is there is checked from its header as ECE's own loader checks it (model, layer, shape,
    sample count), since EasyEdit's baselines read these files without any check. Its corpus may be one only
    ECE's hparams name (``mom2_corpus``): every method then shares ECE's C0, as before. But a file made from a
    model-folder corpus (``<model>/<mom2_dataset>.txt``) must match that file's text as it is now: a cache left
    from an older version of it is refused, naming it."""
    from ...method import statistics
    from ...method.architecture import get_module

    spec = statistics.StatsSpec.from_hparams(hparams)
    layer_names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    own = statistics.local_corpus(spec, model)  # None for a set only EasyEdit computes (wikipedia)
    current = own.label if own is not None else None
    named = dataclasses.replace(spec, ds_name=own.name) if own is not None else spec  # the name it is filed under
    missing = []
    for name in layer_names:
        present = [path for path in statistics.stats_paths_for(model, name, named).all() if path.is_file()]
        if not present:
            missing.append(name)
        d_ff = statistics.module_input_dim(get_module(model, name))
        for path in present:
            shape, sample_size, meta = statistics.read_stats_header(path)
            recorded = str((meta or {}).get("corpus", ""))
            corpus = current if not recorded or recorded.startswith(statistics.MODEL_CORPUS_PREFIX) else recorded
            statistics.check_stats_file(path, model, name, named, d_ff, shape, sample_size, meta, corpus)
    if missing:
        logger.info("computing statistics for %s into %s", missing, spec.stats_dir)
        statistics.compute_statistics(model, tok, missing, hparams, write=True, progress=progress)
    return missing


class ECEMethod:
    """This project's ECE with given hyperparameters."""

    def __init__(self, hparams: ECEHyperParams, name: Optional[str] = None, ensure_stats: bool = True) -> None:
        self.hparams = hparams
        self.name = name or f"ECE-{hparams.attribution}"
        self.ensure_stats = ensure_stats
        self.traces: list[dict[str, Any]] = []

    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        return True, ""

    def edited_weight_names(self, model: torch.nn.Module) -> list[str]:
        return weight_names([self.hparams.rewrite_module_tmp], self.hparams.layers)

    def prepare(self, model: torch.nn.Module, tok: Any) -> None:
        if self.ensure_stats and self.hparams.mom2_adjustment:
            ensure_statistics(model, tok, self.hparams)

    def _session(self, model: torch.nn.Module) -> Any:
        from ...method.state import get_session

        return get_session(model, self.hparams)

    def reset(self, model: torch.nn.Module) -> None:
        session = self._session(model)
        session.state.reset()  # statistics stay cached: they do not depend on earlier edits
        session.last_trace = None
        self.traces = []

    def sequential_state(self, model: torch.nn.Module) -> Any:
        """The session's sequential state object (carried keys), or None."""
        return getattr(self._session(model), "state", None)

    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        from ...easyedit import apply_ece_to_model

        start = time.perf_counter()
        apply_ece_to_model(model, tok, list(requests), self.hparams, copy=False)
        _sync(model)
        seconds = time.perf_counter() - start
        trace_obj: Any = getattr(self._session(model), "last_trace", None)
        trace = trace_obj.to_dict() if hasattr(trace_obj, "to_dict") else trace_obj
        if trace is not None:
            self.traces.append(trace)
        return BatchOutcome(seconds=seconds, trace=trace)


# ----------------------------------------------------------------------------- EasyEdit baselines
def _sync(model: torch.nn.Module) -> None:
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _TimedApply:
    """Wraps EasyEdit's apply function inside a ``BaseEditor``: times each call (BaseEditor's own evaluation
    before and after is not editing time) and asks AlphaEdit / SPHERE to reset their cache on a run's first call."""

    def __init__(self, apply: Any, alg: str, model: torch.nn.Module) -> None:
        self.apply = apply
        self.alg = alg
        self.model = model
        self.seconds = 0.0
        self.first_call = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.alg in NULL_SPACE_BASELINES:
            kwargs["reset_cache"] = self.first_call  # EasyEdit keeps AlphaEdit's / SPHERE's cache in module globals
        self.first_call = False
        start = time.perf_counter()
        out = self.apply(*args, **kwargs)
        _sync(self.model)
        self.seconds += time.perf_counter() - start
        return out


def _base_editor_kwargs(requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``BaseEditor.edit`` / ``batch_edit`` keyword arguments for EasyEdit request dicts (one entry per request,
    as ``examples/run_AlphaEdit_editing.py`` builds them)."""
    kwargs: dict[str, Any] = {
        "prompts": [r["prompt"] for r in requests],
        "target_new": [r["target_new"] for r in requests],
        "ground_truth": [r.get("ground_truth") for r in requests],
        "subject": [r["subject"] for r in requests],
        "rephrase_prompts": [r.get("rephrase_prompt") for r in requests],
    }
    if any(r.get("locality_prompt") for r in requests):
        kwargs["locality_inputs"] = {
            "neighborhood": {
                "prompt": [r.get("locality_prompt") for r in requests],
                "ground_truth": [r.get("locality_ground_truth") for r in requests],
            }
        }
    return kwargs


@dataclass
class EasyEditMethod:
    """An EasyEdit editor (see :data:`BASELINES`) through EasyEdit's ``BaseEditor`` (``via="BaseEditor"``) or
    the apply function EasyEdit registers for it (``via="apply"``: one call per batch, or per request for
    :data:`~ece_plugin.easyedit.SINGLE_REQUEST_BASELINES`); ``via="auto"`` takes BaseEditor wherever the
    installed EasyEdit's BaseEditor can keep edits across batches (EasyEdit main)."""

    alg: str
    hparams_path: Path
    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    ensure_stats: bool = True
    via: str = "auto"
    _hparams: Any = None
    _apply: Any = None
    _editor: Any = None
    _timed: Optional[_TimedApply] = None
    _first_batch: bool = True
    _workdir: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.alg not in BASELINES:
            raise StudyError(f"unknown EasyEdit baseline {self.alg!r}; known: {BASELINES}")
        if self.via not in ("auto", "BaseEditor", "apply"):
            raise StudyError(f"via must be 'auto', 'BaseEditor' or 'apply', got {self.via!r}")
        self.name = self.name or baseline_label(self.alg)
        self.hparams_path = Path(self.hparams_path)

    # -- loading
    def load(self, model: Optional[torch.nn.Module] = None) -> Any:
        """EasyEdit's hparams object for this method (``overrides`` applied; with ``model``, EasyEdit's
        ``device`` follows the model unless overridden)."""
        if self._hparams is None:
            from ... import easyedit

            overrides = dict(self.overrides)
            if model is not None and "device" not in overrides:
                device = _model_device(model)
                overrides["device"] = "cpu" if device.type == "cpu" else (device.index or 0)
            self._hparams = easyedit.baseline_hparams(self.alg, self.hparams_path, **overrides)
        return self._hparams

    def _apply_fn(self) -> Any:
        if self._apply is None:
            from ... import easyedit

            self._apply = easyedit.baseline_apply(self.alg)
        return self._apply

    def uses_base_editor(self) -> bool:
        """Whether edits go through EasyEdit's ``BaseEditor`` (see the class docstring)."""
        from ... import easyedit

        if self.via == "apply":
            return False
        keeps = easyedit.base_editor_keeps_edits()
        if self.via == "BaseEditor" and not keeps:
            raise StudyError(
                f"{self.alg}: this easyeditor's BaseEditor restores the weights after every batch "
                "(no sequential_edit); use via='apply' for sequential editing"
            )
        return keeps

    # -- EditMethod
    def availability(self, model: torch.nn.Module) -> tuple[bool, str]:
        from ... import easyedit

        try:
            ok, reason = easyedit.can_run_on(_model_device(model))
        except Exception as exc:  # noqa: BLE001 - any failure to probe EasyEdit means "cannot run"
            return False, f"EasyEdit not usable: {exc}"
        if not ok:
            return False, f"EasyEdit {self.alg}: {reason}"
        if self.alg in OWN_CLASS_BASELINES and type(self) is EasyEditMethod:
            return False, OWN_CLASS_BASELINES[self.alg]
        if not self.hparams_path.is_file():
            return False, f"no {self.alg} hparams file at {self.hparams_path}"
        try:
            self.load(model)
            self._apply_fn()
            self.uses_base_editor()
        except Exception as exc:  # noqa: BLE001
            return False, f"EasyEdit {self.alg} could not be set up: {type(exc).__name__}: {exc}"
        return True, ""

    def edited_weight_names(self, model: torch.nn.Module) -> list[str]:
        from ... import easyedit

        return easyedit.baseline_weight_names(self.alg, self.load(model))

    def prepare(self, model: torch.nn.Module, tok: Any) -> None:
        hparams = self.load(model)
        if self.ensure_stats and (getattr(hparams, "mom2_adjustment", False) or self.alg in NULL_SPACE_BASELINES):
            ensure_statistics(model, tok, hparams)
        if self.alg in NULL_SPACE_BASELINES:
            self._prepare_alphaedit_projection(model, tok, hparams)
        if self.uses_base_editor():
            self._prepare_base_editor(model, tok, hparams)

    def _prepare_base_editor(self, model: torch.nn.Module, tok: Any, hparams: Any) -> None:
        """EasyEdit's BaseEditor on this very model object (built once per model), its apply function timed."""
        from ... import easyedit

        if self._editor is None or self._editor.model is not model:
            self._editor = easyedit.base_editor(hparams, model, tok)
        self._timed = _TimedApply(self._apply_fn(), self.alg, model)
        self._editor.apply_algo = self._timed

    def _prepare_alphaedit_projection(self, model: torch.nn.Module, tok: Any, hparams: Any) -> None:
        """Compute AlphaEdit's null-space projection P once, outside the timed edits, into a private file.

        EasyEdit computes P inside the first edit when ``P_loc`` is missing, saves it as
        ``./null_space_project.pt`` in the working directory (whatever ``P_loc`` says) and keeps it in a
        module global afterwards; here P is computed with EasyEdit's own ``get_project`` for the layers of
        this run and ``P_loc`` points at it, so the repository stays clean and a run with other layers
        never reuses a stale P.
        """
        from ... import easyedit

        module: Any = easyedit.baseline_module(self.alg)  # AlphaEdit_main or SPHERE_main: same get_project, P globals
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"ece-{self.alg.lower()}-"))
            weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        path = self._workdir / f"P-{'-'.join(str(x) for x in hparams.layers)}.pt"
        if not path.is_file():
            projections = [module.get_project(model, tok, layer, hparams).cpu() for layer in hparams.layers]
            torch.save(torch.stack(projections), path)
        hparams.P_loc = str(path)
        module.P_loaded = False  # make EasyEdit read this P on the next call

    def reset(self, model: torch.nn.Module) -> None:
        self._first_batch = True
        if self._timed is not None:
            self._timed.first_call = True

    def continue_sequence(self) -> None:
        """The next batch continues an earlier sequence (resumed from a checkpoint): AlphaEdit keeps the
        key covariance it was given instead of starting a new one."""
        self._first_batch = False
        if self._timed is not None:
            self._timed.first_call = False

    def edit_batch(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        if self._timed is not None:  # set by prepare() when edits go through BaseEditor
            return self._edit_with_base_editor(model, requests)
        return self._edit_with_apply(model, tok, requests)

    def base_editor_extra(self, model: torch.nn.Module, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """More ``BaseEditor`` keyword arguments for this batch (WISE's ``loc_prompts``); none here."""
        return {}

    def _edit_with_base_editor(self, model: torch.nn.Module, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        """One batch through ``BaseEditor``; the time is the apply function's (BaseEditor's own pre/post
        evaluation is left out)."""
        from ... import easyedit

        assert self._editor is not None and self._timed is not None
        editor, timed = self._editor, self._timed
        timed.seconds = 0.0
        kwargs = {**_base_editor_kwargs(requests), **self.base_editor_extra(model, requests)}
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            if not easyedit.baseline_batchable(self.alg):  # BaseEditor.edit: one request per call, in sequence
                call = "BaseEditor.edit"
                if hasattr(editor.hparams, "batch_size"):
                    editor.hparams.batch_size = 1
                editor.edit(**kwargs, sequential_edit=True, verbose=False)
            else:
                call = "BaseEditor.batch_edit"
                editor.hparams.batch_size = len(requests)
                if self.alg == "ULTRAEDIT":
                    self._fit_ultraedit_sub_batch(editor.hparams, len(requests))
                editor.batch_edit(**kwargs, sequential_edit=True, verbose=False)
        finally:
            # ULTRAEDIT freezes every parameter but its own; other methods' later edits must find them as they were
            for name, param in model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
        if editor.model is not model:
            raise StudyError(f"{self.alg}: BaseEditor replaced the model object; the edit would be lost")
        return BatchOutcome(seconds=timed.seconds, via=call)

    def _fit_ultraedit_sub_batch(self, hparams: Any, n_requests: int) -> None:
        """ULTRAEDIT passes ``batch_size // batch_size_once`` sub-batches forward, so a sub-batch that does not
        divide the batch drops requests (none at all when it is larger: EasyEdit then fails with ``KeyError: 0``
        in ``predict_param_shifts``). The largest divisor of the batch not above the configured sub-batch is used."""
        wanted = int(self.load().batch_size_once)
        once = max(d for d in range(1, min(wanted, n_requests) + 1) if n_requests % d == 0)
        if once != wanted:
            logger.info("ULTRAEDIT: batch_size_once %d -> %d (a divisor of the batch of %d)", wanted, once, n_requests)
        hparams.batch_size_once = once

    def _edit_with_apply(self, model: torch.nn.Module, tok: Any, requests: Sequence[dict[str, Any]]) -> BatchOutcome:
        from ... import easyedit

        hparams = self.load()
        apply = self._apply_fn()
        start = time.perf_counter()
        if self.alg in easyedit.SINGLE_REQUEST_BASELINES:  # one request per call (EasyEdit's batch size 1)
            for request in requests:
                apply(model, tok, [dict(request)], hparams, copy=False, return_orig_weights=False)
        else:
            kwargs: dict[str, Any] = {}
            if hasattr(hparams, "batch_size"):
                hparams.batch_size = len(requests)
            if self.alg == "ULTRAEDIT":
                self._fit_ultraedit_sub_batch(hparams, len(requests))
            if self.alg in NULL_SPACE_BASELINES:
                kwargs["reset_cache"] = self._first_batch  # EasyEdit keeps AlphaEdit's / SPHERE's cache in globals
            apply(model, tok, [dict(r) for r in requests], hparams, copy=False, return_orig_weights=False, **kwargs)
        _sync(model)
        self._first_batch = False
        return BatchOutcome(seconds=time.perf_counter() - start, via="apply function")


# ----------------------------------------------------------------------------- construction
def default_baseline_hparams(hparams_root: Path, alg: str, model_dir: Optional[Path] = None) -> Path:
    """``hparams/<alg>/<name>.yaml`` for a model: the file named after the model folder when present,
    else the only YAML in the folder, else ``testbed-llama.yaml``."""
    folder = hparams_root / alg
    if model_dir is not None:
        for candidate in (folder / f"{Path(model_dir).name}.yaml", folder / "testbed-llama.yaml"):
            if candidate.is_file():
                return candidate
    yamls = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if len(yamls) == 1:
        return yamls[0]
    return folder / "testbed-llama.yaml"
