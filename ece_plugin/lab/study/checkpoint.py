"""Checkpoints of a sequence of edits: the edited weights and everything a method carries between batches.

A checkpoint folder holds ``weights.safetensors`` (the parameters the method edits), and per method kind:

* ECE: ``state.safetensors`` (the carried keys, :class:`ece_plugin.method.state.SequentialState`) and
  ``templates.json`` (the context templates its first batch sampled);
* EasyEdit's baselines: ``templates.json`` (the context templates EasyEdit caches in a module global) and,
  for AlphaEdit, ``tensors.safetensors`` (its accumulated key covariance ``cache_c``); for the editors whose
  weights never change, their adapter's state as ``<name>.safetensors`` and ``<name>.json``: GRACE's
  ``codebook`` (keys, values and radii; the labels and edit ids that decide its conflicts), WISE's
  ``side_memory`` (side copy, side memories, gradient mask; counts, thresholds, loc-prompt position).

and ``checkpoint.json``, written last: the number of edits the checkpoint holds, the SHA-256 of each of its
files and the run's progress at that point (its measured rows), so that a checkpoint knows what it holds and a
resumed run trusts it rather than a separate progress file. Reading checks every digest and that the weights are
finite before anything is put on the model.

No pickle is written or read. :func:`save_method_checkpoint` writes a new folder beside the target and swaps it
in (:func:`ece_plugin.method.atomic.atomic_folder`), so a checkpoint is either the old one or the new one, never
half of each; a process killed between the swap's two renames leaves the old one, which the next start puts back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ...method import atomic
from .baselines import EasyEditMethod, ECEMethod

WEIGHTS = "weights.safetensors"
STATE = "state.safetensors"
TEMPLATES = "templates.json"
TENSORS = "tensors.safetensors"
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = "ece-plugin-checkpoint/1"


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
        name = _side_state_name(method)
        if name:
            keeper: Any = method  # GraceMethod, WiseMethod
            side, meta = keeper.side_state(model)
            if side:
                _save_tensors(folder / f"{name}.safetensors", side)
                (folder / f"{name}.json").write_text(json.dumps(meta), encoding="utf-8")
    else:
        raise CheckpointError(f"{type(method).__name__}: no checkpoint support")
    (folder / TEMPLATES).write_text(json.dumps({"templates": templates}), encoding="utf-8")


def _side_state_name(method: Any) -> str:
    """The file stem of the adapter state a method keeps outside the weights (GRACE, WISE); '' for the others."""
    return str(getattr(method, "side_state_name", "") or "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_method_checkpoint(
    method: Any, model: torch.nn.Module, target: Path, n_edits: int, progress: dict[str, Any]
) -> None:
    """Write ``method``'s checkpoint of ``model`` after ``n_edits`` edits to the folder ``target`` (replacing it
    atomically), with ``progress`` (the run's JSON-able progress at this point) in its manifest."""
    with atomic.atomic_folder(target) as tmp:
        _write_method_files(method, model, tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": MANIFEST_FORMAT, "method": method.name, "n_edits": int(n_edits), "files": files,
                    "progress": progress}
        (tmp / MANIFEST).write_text(json.dumps(manifest) + "\n", encoding="utf-8")


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of the checkpoint in ``folder``, after checking that each of its files is there with the
    digest the manifest records; :class:`CheckpointError` naming the file otherwise."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing (a checkpoint of an earlier version, or not a checkpoint); "
                              "start the run again") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(exc).split())[:120]})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
        manifest.get("files"), dict
    ) or not isinstance(manifest.get("n_edits"), int) or not isinstance(manifest.get("progress"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest ({MANIFEST_FORMAT} with files, n_edits, progress)")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: changed since the checkpoint was written (SHA-256 differs)")
    if manifest["progress"].get("n_done") != manifest["n_edits"]:
        raise CheckpointError(f"{path}: holds {manifest['n_edits']} edits but its progress says "
                              f"{manifest['progress'].get('n_done')}")
    return manifest


def load_method_checkpoint(method: Any, model: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """Put ``model``'s edited weights and ``method``'s carried state back as :func:`save_method_checkpoint`
    wrote them (``method`` must have been reset and prepared on this model); returns the manifest. Every file's
    digest, the weights' names, shapes and finiteness are checked before anything is put on the model."""
    manifest = read_checkpoint(folder)
    weights = _load_tensors(folder / WEIGHTS)
    expected = set(method.edited_weight_names(model))
    if set(weights) != expected:
        raise CheckpointError(f"{folder / WEIGHTS}: holds {sorted(weights)}, the method edits {sorted(expected)}")
    for name, tensor in weights.items():
        param = model.get_parameter(name)
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{folder / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"{tuple(param.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{folder / WEIGHTS}: {name} holds {bad} non-finite value(s)")
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
        name = _side_state_name(method)
        if name and (folder / f"{name}.safetensors").is_file():
            meta_path = folder / f"{name}.json"
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
            keeper: Any = method  # GraceMethod, WiseMethod
            keeper.load_side_state(model, _load_tensors(folder / f"{name}.safetensors"), meta)
        method.continue_sequence()
    return manifest


def forget_process_state(method: Any, model: torch.nn.Module) -> None:
    """Start ``method`` as a new process would: no context templates cached from an earlier run."""
    if isinstance(method, ECEMethod):
        from ...method.editor import import_context_templates

        import_context_templates(method._session(model), None)
    elif isinstance(method, EasyEditMethod):
        from ... import easyedit

        easyedit.restore_baseline_process_state(method.alg, None, {})


def state_nbytes(method: Any, model: torch.nn.Module) -> int:
    """Bytes of what the method carries between batches besides the weights (0 for ROME and MEMIT; GRACE's
    codebook, WISE's side memories)."""
    if isinstance(method, ECEMethod):
        return int(method._session(model).state.nbytes())
    if _side_state_name(method):
        return int(method.side_state_nbytes(model))
    from ... import easyedit

    if isinstance(method, EasyEditMethod) and method.alg in easyedit.NULL_SPACE_BASELINES:

        _, tensors = easyedit.baseline_process_state(method.alg)
        return sum(t.numel() * t.element_size() for t in tensors.values())
    return 0
