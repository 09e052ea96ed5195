"""The only module that knows EasyEdit versions: registry, batchable list, weights-copy semantics.

Two EasyEdit lines are in use and differ in ways the plugin bridges here:

* **easyeditor 0.0.1.dev0** (PyPI, October 2023; transformers 4.x): ``BaseEditor`` moves the model to
  ``cuda:{hparams.device}`` (hard-coded), so it cannot run on a CPU. There is no sequential-edit switch:
  ``edit``/``batch_edit`` pass ``keep_original_weight`` to the algorithm and always restore the weights
  from the returned ``weights_copy``; ROME/MEMIT return an EMPTY copy unless ``keep_original_weight`` is
  true, so by default edits ACCUMULATE. ECE follows that contract: with ``keep_original_weight`` passed
  it returns the originals only when it is true (see :func:`wants_weights_copy`).
* **EasyEdit main** (GitHub; transformers 5.x; run from a clone on ``PYTHONPATH``): devices go through
  ``util/device.py`` (``device: cpu`` works). ``edit(..., sequential_edit=False)`` (the default)
  restores the model from ``weights_copy`` after each edit, ``batch_edit`` after each chunk of
  ``batch_size``; ``sequential_edit=True`` keeps them (``edit()`` passes ``keep_original_weight=False``,
  which main's MEMIT ignores: the copy is always returned). The restore is ``editors/utils.py
  restore_after_edit``: ECE is in none of its special sets (``CALLABLE_RESTORE_ALGS``,
  ``PEFT_RESTORE_ALGS``, ``KEEP_EDITED_MODEL_ALGS``), so the default path copies every entry of the
  ``{weight_name: tensor}`` dict back, as for MEMIT. Main's ``edit()`` (one request at a time) asserts
  ``hparams.batch_size == 1``; use ``batch_edit`` for batches.

Both lines pick ``ALG_DICT[hparams.alg_name]`` in ``BaseEditor.__init__`` from
``easyeditor.util.alg_dict.ALG_DICT``, the same object ``editors/editor.py`` star-imports, and ask the
hard-coded staticmethod ``BatchEditor.is_batchable_method`` before ``batch_edit``. :func:`register`
mutates that dict (never rebinds it) and wraps the staticmethod once. ``BaseEditor.from_hparams`` is
``cls(hparams)`` in both lines: no alg-name -> hparams-class table needs an entry.

The ECE state (see :mod:`ece_plugin.method.state`) reconciles with the weights EasyEdit restored or kept, so the
carried keys accumulate exactly when edits do, in both lines.

After ``import easyeditor`` the attribute names ``easyeditor.models`` / ``easyeditor.util`` are
shadowed by sub-packages (star imports), so modules are reached with :func:`import_easyedit`.
"""

from __future__ import annotations

import copy as copy_module
import importlib
import importlib.util
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch
import yaml
from torch import nn

logger = logging.getLogger(__name__)

ALG_NAME = "ECE"
EASYEDIT_PYPI = "pypi-0.0.1.dev0"
EASYEDIT_MAIN = "main"
_WRAPPED_MARK = "_ece_plugin_wrapped"

#: EasyEdit's own baselines the CLI runs next to ECE: alg name -> (hparams class, what ALG_DICT holds for it).
#: ROME / MEMIT / AlphaEdit are in both EasyEdit lines; the lifelong editors below only in EasyEdit main.
BASELINES: dict[str, tuple[str, str]] = {
    "ROME": ("ROMEHyperParams", "apply_rome_to_model"),
    "MEMIT": ("MEMITHyperParams", "apply_memit_to_model"),
    "AlphaEdit": ("AlphaEditHyperParams", "apply_AlphaEdit_to_model"),
    "EMMET": ("EMMETHyperParams", "apply_emmet_to_model"),
    "PMET": ("PMETHyperParams", "apply_pmet_to_model"),
    "SPHERE": ("SPHEREHyperParams", "apply_SPHERE_to_model"),
    "ULTRAEDIT": ("UltraEditHyperParams", "UltraEditRewriteExecutor().apply_to_model"),
    "WISE": ("WISEHyperParams", "apply_wise_to_model"),
    "GRACE": ("GraceHyperParams", "apply_grace_to_model"),
}

# What an EasyEdit hparams file spells differently from its hparams class (EasyEdit's own from_hparams converts it).
_WISE_MARGIN = ("alpha", "beta", "gamma")  # WISE's act_margin: [alpha, beta, gamma]


class EasyEditUnavailableError(ImportError):
    """easyeditor is not importable, or lacks what was asked for."""


def import_easyedit(name: str) -> ModuleType:
    """Import ``easyeditor.<name>`` (or a full dotted name) through importlib, past shadowed attributes."""
    full = name if name == "easyeditor" or name.startswith("easyeditor.") else f"easyeditor.{name}"
    with warnings.catch_warnings():
        # easyeditor imports timm's deprecated module paths; their FutureWarnings say nothing about ECE
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(full)


def _easyeditor_importable() -> Optional[ModuleType]:
    try:
        return import_easyedit("easyeditor")
    except Exception as exc:  # noqa: BLE001 - any failure (missing, broken torchvision) means "absent"
        logger.debug("easyeditor is not importable: %s", exc)
        return None


def easyedit_version() -> Optional[str]:
    """``'main'`` (GitHub clone), ``'pypi-0.0.1.dev0'`` or ``None`` when easyeditor is not importable."""
    if importlib.util.find_spec("easyeditor") is None:
        return None
    package = _easyeditor_importable()
    if package is None:
        return None
    files = getattr(package, "__file__", None)
    if files is None:
        return None
    root = Path(files).resolve().parent
    # util/device.py (normalize_device) exists in main and not in the 0.0.1.dev0 release
    return EASYEDIT_MAIN if (root / "util" / "device.py").is_file() else EASYEDIT_PYPI


def can_run_on(device: Union[int, str, torch.device, None]) -> tuple[bool, str]:
    """Whether EasyEdit's ``BaseEditor`` can run ECE on ``device`` here, and why not."""
    version = easyedit_version()
    if version is None:
        return False, "easyeditor is not importable"
    dev = str(device) if device is not None else ""
    wants_cpu = dev == "cpu" or dev.startswith("cpu:")
    if version == EASYEDIT_PYPI:
        if wants_cpu:
            return False, "easyeditor 0.0.1.dev0 hard-codes cuda:{device}; it cannot run on a CPU"
        if not torch.cuda.is_available():
            return False, "easyeditor 0.0.1.dev0 needs CUDA (cuda:{device} is hard-coded) and none is available"
        return True, "easyeditor 0.0.1.dev0 on CUDA"
    if not wants_cpu and not torch.cuda.is_available() and not dev.startswith(("mps", "xpu")):
        return False, f"EasyEdit main would use {dev or 'cuda'} but CUDA is not available; set device: cpu"
    return True, f"EasyEdit main on {dev or 'the default device'}"


def explicit_device(hparams: Any) -> Optional[torch.device]:
    """The device an hparams' ``device`` names by string (``cpu``, ``cuda``, ``cuda:1``); None for EasyEdit's
    integer GPU index (which only ``BaseEditor`` reads, to place the model itself)."""
    value = getattr(hparams, "device", None)
    if not isinstance(value, str):
        return None
    return torch.device(value)


_DEVICE_WARNED: set[tuple[str, str]] = set()  # (hparams device type, model device type): said once a process


def warn_unused_device(hparams: Any, model: nn.Module) -> None:
    """ECE edits the model where it lies and never moves it: an hparams ``device`` naming another device type
    than the model's is not honoured, and a warning says so (the CLI loads the model there instead)."""
    wanted = explicit_device(hparams)
    try:
        actual = next(model.parameters()).device
    except StopIteration:
        return
    index = getattr(hparams, "device", None)
    if isinstance(index, int) and not isinstance(index, bool) and actual.type == "cpu" and not torch.cuda.is_available():
        if ("gpu-index", "cpu") not in _DEVICE_WARNED:
            _DEVICE_WARNED.add(("gpu-index", "cpu"))
            logger.warning("hparams device %d names a GPU, but CUDA is not available: ECE edits on the CPU", index)
        return
    if wanted is not None and wanted.type != actual.type and (wanted.type, actual.type) not in _DEVICE_WARNED:
        _DEVICE_WARNED.add((wanted.type, actual.type))
        logger.warning(
            "hparams device %r is not used: ECE edits the model on %s, where it lies; move the model (or pass "
            "--device %s to the CLI) to edit on %s",
            str(wanted), actual, wanted, wanted,
        )


def wants_weights_copy(
    return_orig_weights: bool, kwargs: dict[str, Any], version: Optional[str] = None
) -> bool:
    """Whether ``apply_ece_to_model`` should return the original weights (EasyEdit's contract).

    easyeditor 0.0.1.dev0 passes ``keep_original_weight`` and always restores from the returned copy;
    its ROME/MEMIT return a copy only when that flag is true, so edits accumulate by default. EasyEdit
    main's ``edit()`` also passes ``keep_original_weight=False`` but its MEMIT ignores it: main always
    gets the copy and decides itself (``sequential_edit``) whether to restore. ``version`` defaults to
    :func:`easyedit_version`; without EasyEdit (direct calls) the copy is returned when asked for.
    """
    if not return_orig_weights:
        return False
    if version is None:
        version = easyedit_version()
    if version == EASYEDIT_PYPI and "keep_original_weight" in kwargs:
        return bool(kwargs["keep_original_weight"])
    return True


# ---------------------------------------------------------------------------------- apply_ece_to_model
def apply_ece_to_model(
    model: nn.Module,
    tok: Any,
    requests: Sequence[dict[str, Any]],
    hparams: Any,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with ECE; returns ``(model, weights_copy)`` as EasyEdit's MEMIT does (EasyEdit's
    ``apply_*_to_model`` contract, over :func:`ece_plugin.method.editor.edit_model`).

    ``weights_copy`` maps each W_out parameter name to its original tensor when EasyEdit asks for it
    (``return_orig_weights``; with easyeditor 0.0.1.dev0's ``keep_original_weight`` passed, only when that is
    true), else ``{}``. ``copy=True`` edits a deep copy. ``session=`` selects an explicit
    :class:`~ece_plugin.method.state.EditSession`; other EasyEdit keyword arguments are ignored.
    """
    from .method.editor import edit_model, edited_w_outs
    from .method.requests import check_conflicts, normalise_requests

    if copy:
        model = copy_module.deepcopy(model)
    check_conflicts(normalise_requests(requests))  # bad requests fail before the weights are copied
    warn_unused_device(hparams, model)
    passed = {} if keep_original_weight is None else {"keep_original_weight": keep_original_weight}
    want_copy = wants_weights_copy(return_orig_weights, passed) or keep_original_weight is True
    weights_copy: dict[str, torch.Tensor] = {}
    if want_copy:
        from .method.architecture import num_layers

        hparams.validate(num_layers(model))
        weights_copy = {wo.weight_name: wo.weight.detach().clone() for wo in edited_w_outs(model, hparams)}
    ignored = sorted(set(kwargs) - {"session"})
    if ignored:
        logger.debug("apply_ece_to_model: ignoring keyword arguments %s", ignored)
    edit_model(model, tok, requests, hparams, session=kwargs.get("session"))
    return model, weights_copy


# ----------------------------------------------------------------------------------------- registry
def _registries() -> list[dict[str, Any]]:
    """Every distinct ALG_DICT object an editor may read (compared by identity)."""
    found: list[dict[str, Any]] = []
    for module_name in ("easyeditor.util.alg_dict", "easyeditor.editors.editor"):
        try:
            module = import_easyedit(module_name)
        except Exception as exc:  # noqa: BLE001
            logger.debug("cannot import %s: %s", module_name, exc)
            continue
        registry = getattr(module, "ALG_DICT", None)
        if isinstance(registry, dict) and not any(registry is r for r in found):
            found.append(registry)
    return found


def _wrap_batchable() -> bool:
    """Wrap ``BatchEditor.is_batchable_method`` once so that it also accepts ``'ECE'``."""
    module = import_easyedit("easyeditor.editors.batch_editor")
    batch_editor = module.BatchEditor
    original: Callable[[str], bool] = batch_editor.is_batchable_method
    if getattr(original, _WRAPPED_MARK, False):
        return False

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or bool(original(alg_name))

    setattr(is_batchable_method, _WRAPPED_MARK, True)
    is_batchable_method.__wrapped__ = original  # type: ignore[attr-defined]
    is_batchable_method.__doc__ = "EasyEdit's batchable check, extended by ece-plugin with 'ECE'."
    type.__setattr__(batch_editor, "is_batchable_method", staticmethod(is_batchable_method))
    return True


def _check_restore_path() -> None:
    """Main's restore_after_edit must take its default dict path for ECE (as for MEMIT)."""
    try:
        utils = import_easyedit("easyeditor.editors.utils")
    except Exception:  # noqa: BLE001 - 0.0.1.dev0 has no editors/utils.py
        return
    for set_name in ("CALLABLE_RESTORE_ALGS", "PEFT_RESTORE_ALGS", "KEEP_EDITED_MODEL_ALGS"):
        special: set[str] = set(getattr(utils, set_name, set()))
        if ALG_NAME in special:
            logger.warning("EasyEdit lists ECE in %s; its weights_copy dict would not be restored", set_name)


def register() -> bool:
    """Register ECE in EasyEdit (idempotent); returns whether easyeditor was found.

    Puts ``'ECE': apply_ece_to_model`` into the ALG_DICT the editors read and makes ECE batchable.
    A silent no-op (debug log) when easyeditor is not importable.
    """
    version = easyedit_version()
    if version is None:
        logger.debug("easyeditor not importable: ECE not registered")
        return False

    registries = _registries()
    if not registries:
        logger.debug("easyeditor has no ALG_DICT: ECE not registered")
        return False
    for registry in registries:
        registry[ALG_NAME] = apply_ece_to_model
    wrapped = _wrap_batchable()
    _check_restore_path()
    logger.debug("ECE registered in EasyEdit %s (%d registry object(s), batchable wrapped now: %s)",
                 version, len(registries), wrapped)
    return True


def is_registered() -> bool:
    """ECE is in every ALG_DICT the editors read and is batchable."""
    if easyedit_version() is None:
        return False
    registries = _registries()
    batch_editor = import_easyedit("easyeditor.editors.batch_editor").BatchEditor
    return bool(registries) and all(ALG_NAME in r for r in registries) and bool(
        batch_editor.is_batchable_method(ALG_NAME)
    )


# ----------------------------------------------------------------------------------- baseline hparams
def _read_config(path_or_config: Union[str, Path, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(path_or_config, dict):
        return dict(path_or_config)
    path = Path(path_or_config)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise FileNotFoundError(f"hparams file not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: an hparams file must hold a mapping of keys to values")
    return config


def _scientific(config: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit's ``construct_float_from_scientific_notation``: '1e4' strings become floats."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, str):
            try:
                out[key] = float(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


def baseline_hparams(
    alg_name: str, path_or_config: Union[str, Path, dict[str, Any]], **overrides: Any
) -> Any:
    """Build EasyEdit's own ROME / MEMIT / AlphaEdit hparams object from a YAML file or a dict.

    ``overrides`` (e.g. ``model_name``, ``stats_dir``, ``device``, ``mom2_n_samples``) replace keys of the
    file. Unknown keys are reported by name rather than as a dataclass ``TypeError``.
    """
    if alg_name not in BASELINES:
        raise KeyError(f"unknown baseline {alg_name!r}; known: {sorted(BASELINES)}")
    if easyedit_version() is None:
        raise EasyEditUnavailableError(f"{alg_name} baseline needs easyeditor (not importable)")
    class_name, _ = BASELINES[alg_name]
    package = import_easyedit("easyeditor")
    cls = getattr(package, class_name, None)
    if cls is None:
        raise EasyEditUnavailableError(
            f"this easyeditor ({easyedit_version()}) has no {class_name}: {alg_name} is unavailable"
        )
    config = _scientific(_read_config(path_or_config))
    config.update(overrides)
    if alg_name == "WISE" and "act_margin" in config:
        margin = config.pop("act_margin")
        if not isinstance(margin, (list, tuple)) or len(margin) != len(_WISE_MARGIN):
            raise ValueError(f"WISE act_margin must list {len(_WISE_MARGIN)} values (alpha, beta, gamma), got {margin!r}")
        config.update(zip(_WISE_MARGIN, margin))
    if config.get("alg_name", alg_name) != alg_name:
        raise ValueError(f"alg_name: the file is for {config.get('alg_name')!r}, not {alg_name!r}")
    config["alg_name"] = alg_name
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise KeyError(f"{class_name}: unknown key(s) {unknown}")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in config
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise KeyError(f"{class_name}: missing key(s) {missing}")
    return cls(**config)


# Model families whose tokenizer BaseEditor.__init__ gives pad = eos, and those it pads on the right for the
# locate-and-edit methods (EasyEdit main, editors/editor.py).
_PAD_EOS_FAMILIES = ("gpt", "llama", "baichuan", "internlm", "mistral")
_RIGHT_PAD_FAMILIES = ("mistral", "llama", "qwen")


# The algorithms BaseEditor pads on the right (Llama/Mistral/Qwen); it pads every other one on the left, PMET
# included, although PMET's compute_zs places targets and the subject's last token without a padding offset.
_RIGHT_PAD_ALGS = ("ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE")


def easyedit_tokenizer(tok: Any, model_name: str, alg_name: str = "MEMIT") -> Any:
    """A copy of ``tok`` set up as EasyEdit's ``BaseEditor.__init__`` sets up the tokenizer it loads for
    ``alg_name``: pad = eos for GPT/Llama-like families; right padding for the locate-and-edit methods on
    Llama/Mistral/Qwen, left padding for every other method (ULTRAEDIT, PMET, WISE, GRACE, ...)."""
    import copy as _copy

    name = model_name.lower()
    out = _copy.deepcopy(tok)
    if any(family in name for family in _PAD_EOS_FAMILIES) and getattr(out, "eos_token_id", None) is not None:
        out.pad_token_id = out.eos_token_id
    if alg_name not in _RIGHT_PAD_ALGS:
        out.padding_side = "left"
    elif any(family in name for family in _RIGHT_PAD_FAMILIES):
        out.padding_side = "right"
    return out


def base_editor_keeps_edits() -> bool:
    """Whether the installed ``BaseEditor.batch_edit`` can keep a batch's edits (EasyEdit main's
    ``sequential_edit``); easyeditor 0.0.1.dev0 always restores the weights after each chunk."""
    import inspect

    if easyedit_version() is None:
        return False
    editor_cls = getattr(import_easyedit("easyeditor"), "BaseEditor", None)
    if editor_cls is None:
        return False
    return "sequential_edit" in inspect.signature(editor_cls.batch_edit).parameters


def base_editor(hparams: Any, model: nn.Module, tok: Any) -> Any:
    """EasyEdit's own ``BaseEditor.from_hparams(hparams)`` editing ``model`` in place (no second copy).

    BaseEditor accepts ``(model, tokenizer)`` in place of a model name and then skips loading; the
    tokenizer is set up as BaseEditor would set up its own (:func:`easyedit_tokenizer`), and the editor's
    ``model_name`` is put back to the string EasyEdit's evaluation and apply functions look at.
    """
    if easyedit_version() is None:
        raise EasyEditUnavailableError("BaseEditor needs easyeditor (not importable)")
    editor_cls = import_easyedit("easyeditor").BaseEditor
    model_name = str(hparams.model_name)
    hparams.model_name = (model, easyedit_tokenizer(tok, model_name, str(hparams.alg_name)))
    try:
        editor = editor_cls.from_hparams(hparams)
    finally:
        hparams.model_name = model_name
    editor.model_name = model_name
    return editor


#: Baselines whose apply function edits one request per call (ROME's rank-one update; WISE's and GRACE's
#: per-request adapter training): BaseEditor runs them through ``edit`` with ``batch_size`` 1.
SINGLE_REQUEST_BASELINES = ("ROME", "WISE", "GRACE")


def baseline_batchable(alg_name: str) -> bool:
    """Whether the installed EasyEdit's ``BaseEditor.batch_edit`` accepts ``alg_name`` (its ``BatchEditor``
    list); the others go through ``BaseEditor.edit``, one request per call."""
    if easyedit_version() is None:
        raise EasyEditUnavailableError(f"{alg_name} baseline needs easyeditor (not importable)")
    batch_editor = import_easyedit("easyeditor.editors.batch_editor").BatchEditor
    return bool(batch_editor.is_batchable_method(alg_name))


def _parameter_name(inner_param: str) -> str:
    """EasyEdit's ``inner_params`` spelling (``model.layers[3].mlp.down_proj.weight`` or, for ULTRAEDIT, a
    module name without ``.weight``) as a parameter name (``model.layers.3.mlp.down_proj.weight``)."""
    name = re.sub(r"\[(\d+)\]", r".\1", inner_param)
    return name if name.endswith((".weight", ".bias")) else f"{name}.weight"


def baseline_weight_names(alg_name: str, hparams: Any) -> list[str]:
    """Names of the model parameters a baseline's edit may change, read from its EasyEdit hparams:
    ``inner_params`` (ULTRAEDIT, WISE, GRACE), ``rewrite_module_tmps`` x ``layers`` (PMET) or
    ``rewrite_module_tmp`` x ``layers`` (the locate-and-edit methods)."""
    names: dict[str, None] = {}
    inner = getattr(hparams, "inner_params", None)
    if inner:
        for param in inner:
            names.setdefault(_parameter_name(str(param)), None)
        return list(names)
    templates = list(getattr(hparams, "rewrite_module_tmps", None) or [hparams.rewrite_module_tmp])
    for template in templates:
        for layer in hparams.layers:
            names.setdefault(f"{template.format(layer)}.weight", None)
    return list(names)


def baseline_apply(alg_name: str) -> Callable[..., Any]:
    """EasyEdit's ``apply_*_to_model`` of a baseline (from ALG_DICT)."""
    if easyedit_version() is None:
        raise EasyEditUnavailableError(f"{alg_name} baseline needs easyeditor (not importable)")
    for registry in _registries():
        if alg_name in registry:
            return registry[alg_name]  # type: ignore[no-any-return]
    raise EasyEditUnavailableError(f"this easyeditor ({easyedit_version()}) has no {alg_name!r} in ALG_DICT")


# Module globals in which EasyEdit's baselines keep what lasts between calls of one process: the context
# templates they sample on first use (ROME, MEMIT, AlphaEdit) and AlphaEdit's sum of earlier edits' keys.
_BASELINE_MODULES = {
    "ROME": "easyeditor.models.rome.rome_main",
    "MEMIT": "easyeditor.models.memit.memit_main",
    "AlphaEdit": "easyeditor.models.alphaedit.AlphaEdit_main",
    "EMMET": "easyeditor.models.emmet.emmet_main",
    "PMET": "easyeditor.models.pmet.pmet_main",
    "SPHERE": "easyeditor.models.SPHERE.SPHERE_main",
    "ULTRAEDIT": "easyeditor.models.ultraedit.ultraedit_main",
    "WISE": "easyeditor.models.wise.wise_main",
    "GRACE": "easyeditor.models.grace.grace_main",
}
_TEMPLATE_GLOBAL = "CONTEXT_TEMPLATES_CACHE"
#: Baselines whose cached context templates live in another module than their main one.
_TEMPLATE_MODULES = {"WISE": "easyeditor.models.wise.utils"}
_ALPHAEDIT_CACHE = ("cache_c", "cache_c_new")
#: Baselines with AlphaEdit's null-space projection P and accumulated key covariance ``cache_c`` in module globals
#: (SPHERE is AlphaEdit's update with a soft projection added; EasyEdit main keeps the same globals for it).
NULL_SPACE_BASELINES = ("AlphaEdit", "SPHERE")


def baseline_module(alg_name: str) -> ModuleType:
    """The EasyEdit module that holds a baseline's main code and its process globals (ROME, MEMIT, AlphaEdit)."""
    if alg_name not in _BASELINE_MODULES:
        raise KeyError(f"no main module known for baseline {alg_name!r}; known: {sorted(_BASELINE_MODULES)}")
    return import_easyedit(_BASELINE_MODULES[alg_name])


def _template_module(alg_name: str) -> ModuleType:
    """The EasyEdit module whose global caches a baseline's context templates."""
    return import_easyedit(_TEMPLATE_MODULES.get(alg_name, _BASELINE_MODULES[alg_name]))


def baseline_process_state(alg_name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """What a baseline carries between batches outside the weights, for a checkpoint: ``(templates,
    tensors)``: its cached context templates (JSON-safe, None before the first edit) and, for AlphaEdit and SPHERE, its
    accumulated key covariance ``cache_c`` (absent before the first edit)."""
    module = import_easyedit(_BASELINE_MODULES[alg_name])
    templates = getattr(_template_module(alg_name), _TEMPLATE_GLOBAL, None)
    tensors: dict[str, torch.Tensor] = {}
    if alg_name in NULL_SPACE_BASELINES and getattr(module, _ALPHAEDIT_CACHE[1], False):
        tensors["cache_c"] = getattr(module, _ALPHAEDIT_CACHE[0]).detach().cpu().contiguous().clone()
    return templates, tensors


def restore_baseline_process_state(alg_name: str, templates: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`baseline_process_state` returned (None templates: sampled afresh on next use)."""
    module = import_easyedit(_BASELINE_MODULES[alg_name])
    holder = _template_module(alg_name)
    if hasattr(holder, _TEMPLATE_GLOBAL) or templates is not None:
        setattr(holder, _TEMPLATE_GLOBAL, templates)
    if alg_name in NULL_SPACE_BASELINES:
        if "cache_c" in tensors:
            setattr(module, _ALPHAEDIT_CACHE[0], tensors["cache_c"].clone())
            setattr(module, _ALPHAEDIT_CACHE[1], True)
        else:
            setattr(module, _ALPHAEDIT_CACHE[1], False)


#: The editors that wrap the module they edit in an adapter: name -> (module, class) of the wrapper that puts it in.
_ADAPTER_WRAPPERS = {"GRACE": ("easyeditor.models.grace.GRACE", "GRACE"), "WISE": ("easyeditor.models.wise.WISE", "WISE")}


def adapter_wrap(alg_name: str, model: torch.nn.Module, hparams: Any) -> None:
    """Wrap the module GRACE or WISE edits in EasyEdit main's adapter, empty, as the method's first edit does (its
    wrapper's constructor); the parameters keep their ``requires_grad``."""
    module, cls = _ADAPTER_WRAPPERS[alg_name]
    wrapper = getattr(import_easyedit(module), cls)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapper(config=hparams, model=model, device=getattr(hparams, "device", "cpu"))
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))


#: The module globals in which EasyEdit main's WISE keeps the inputs of earlier edits (read only by its replay).
_WISE_HISTORY = ("edit_history", "merge_group_edit_history")


def wise_history_reset() -> None:
    """Start EasyEdit main's WISE as a new process would: no inputs of earlier edits in its module globals."""
    wise = import_easyedit("easyeditor.models.wise.WISE")
    for name in _WISE_HISTORY:
        setattr(wise, name, [])
