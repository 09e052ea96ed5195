"""Checkpoints of a sequence of edits: the edited weights and everything a method carries between batches.

A checkpoint folder holds ``weights.safetensors`` (the parameters the method edits), and per method kind:

* ECE: ``state.safetensors`` (the carried keys, :class:`ece_plugin.method.state.SequentialState`) and
  ``templates.json`` (the context templates its first batch sampled);
* EasyEdit's baselines: ``templates.json`` (the context templates EasyEdit caches in a module global) and,
  for AlphaEdit, ``tensors.safetensors`` (its accumulated key covariance ``cache_c``).

No pickle is written or read. :func:`save_method_checkpoint` writes a new folder beside the target and swaps it
in, so a checkpoint is either the old one or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .baselines import EasyEditMethod, ECEMethod

WEIGHTS = "weights.safetensors"
STATE = "state.safetensors"
TEMPLATES = "templates.json"
TENSORS = "tensors.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _write_method_files(method: Any, model: torch.nn.Module, folder: Path) -> None:
    names = method.edited_weight_names(model)
    _save_tensors(folder / WEIGHTS, {name: model.get_parameter(name) for name in names})
    if isinstance(method, ECEMethod):
        from ...method.editor import export_context_templates

        session = method._session(model)
        session.state.save(folder / STATE, model=model)
        templates: Any = export_context_templates(session)
    elif isinstance(method, EasyEditMethod):
        from ... import easyedit

        templates, tensors = easyedit.baseline_process_state(method.alg)
        if tensors:
            _save_tensors(folder / TENSORS, tensors)
    else:
        raise CheckpointError(f"{type(method).__name__}: no checkpoint support")
    (folder / TEMPLATES).write_text(json.dumps({"templates": templates}), encoding="utf-8")


def save_method_checkpoint(method: Any, model: torch.nn.Module, target: Path) -> None:
    """Write ``method``'s checkpoint of ``model`` to the folder ``target`` (replacing it atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_method_files(method, model, tmp)
        os.chmod(tmp, 0o755)
        old = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_method_checkpoint(method: Any, model: torch.nn.Module, folder: Path) -> None:
    """Put ``model``'s edited weights and ``method``'s carried state back as :func:`save_method_checkpoint`
    wrote them (``method`` must have been reset and prepared on this model)."""
    weights = _load_tensors(folder / WEIGHTS)
    expected = set(method.edited_weight_names(model))
    if set(weights) != expected:
        raise CheckpointError(f"{folder / WEIGHTS}: holds {sorted(weights)}, the method edits {sorted(expected)}")
    for name, tensor in weights.items():
        param = model.get_parameter(name)
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{folder / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"{tuple(param.shape)}")
    try:
        templates = json.loads((folder / TEMPLATES).read_text(encoding="utf-8"))["templates"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder / TEMPLATES}: unreadable ({exc})") from exc
    with torch.no_grad():
        for name, tensor in weights.items():
            model.get_parameter(name).copy_(tensor)
    if isinstance(method, ECEMethod):
        from ...method.editor import import_context_templates
        from ...method.state import SequentialState

        session = method._session(model)
        session.state = SequentialState.load(folder / STATE, model=model, device=session.state.device)
        import_context_templates(session, templates)
    elif isinstance(method, EasyEditMethod):
        from ... import easyedit

        tensors = _load_tensors(folder / TENSORS) if (folder / TENSORS).is_file() else {}
        easyedit.restore_baseline_process_state(method.alg, templates, tensors)
        method.continue_sequence()


def forget_process_state(method: Any, model: torch.nn.Module) -> None:
    """Start ``method`` as a new process would: no context templates cached from an earlier run."""
    if isinstance(method, ECEMethod):
        from ...method.editor import import_context_templates

        import_context_templates(method._session(model), None)
    elif isinstance(method, EasyEditMethod):
        from ... import easyedit

        easyedit.restore_baseline_process_state(method.alg, None, {})


def state_nbytes(method: Any, model: torch.nn.Module) -> int:
    """Bytes of what the method carries between batches besides the weights (0 for ROME and MEMIT)."""
    if isinstance(method, ECEMethod):
        return int(method._session(model).state.nbytes())
    if isinstance(method, EasyEditMethod) and method.alg == "AlphaEdit":
        from ... import easyedit

        _, tensors = easyedit.baseline_process_state(method.alg)
        return sum(t.numel() * t.element_size() for t in tensors.values())
    return 0
