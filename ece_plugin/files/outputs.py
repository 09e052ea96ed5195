"""The one check of a command's output paths, made before any work starts.

Every output a command writes is one of three kinds:

* ``file``: one file written beside and moved in (``--save-edits``);
* ``folder``: a folder built beside and swapped in (``--save-model``, ``apply``/``revert --out``,
  ``build-testbed --output-dir``);
* ``run``: a results folder the command writes its files into (``--out``).

:func:`check_outputs` refuses, with a one-line :class:`OutputError` naming the path:

* a target that exists, unless ``force`` (nothing a user had is replaced without ``--force``; a run folder that
  exists but is empty is fine);
* a folder where a file is expected, or a file where a folder is expected (even with ``force``);
* a target inside a model folder (a folder holding ``config.json``): a results file there would be taken for
  part of the model, and an edit file named ``model.safetensors`` would replace its weights; a ``folder`` target
  may itself be a model folder (with ``force``), not lie inside one;
* a target under a file, or whose nearest existing folder is not writable;
* one output inside another that is replaced as a whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

KINDS = ("file", "folder", "run")
MAX_SHOWN = 120  # characters of a path shown in a message


class OutputError(ValueError):
    """An output path cannot be written; the message names the option and the path."""


@dataclass(frozen=True)
class Output:
    """One path a command will write: its option (``--save-edits``), the path and its kind (see the module)."""

    option: str
    path: Path
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"output kind must be one of {KINDS}, got {self.kind!r}")


def shown(path: Union[str, Path]) -> str:
    """``path`` for a one-line message (long paths keep their end)."""
    text = str(path)
    return text if len(text) <= MAX_SHOWN else "..." + text[-(MAX_SHOWN - 3):]


def _model_folder_above(path: Path, include_self: bool) -> Optional[Path]:
    candidates = ([path] if include_self else []) + list(path.parents)
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    return None


def _nearest_existing(path: Path) -> Path:
    for folder in [path, *path.parents]:
        if folder.exists() or folder.is_symlink():
            return folder
    return Path("/")


def _check_one(out: Output, force: bool) -> None:
    path = out.path.absolute()
    label = f"{out.option} {shown(out.path)}"
    inside = _model_folder_above(path, include_self=out.kind != "folder")
    if inside is not None:
        where = "is the model folder" if inside == path else f"is inside the model folder {shown(inside)}"
        raise OutputError(f"{label}: {where}; choose a path outside it")
    if path.is_dir():
        if out.kind == "file":
            raise OutputError(f"{label}: is a folder; give a file path")
        if any(path.iterdir()) and not force:
            raise OutputError(f"{label}: exists and is not empty; choose a new folder, or pass --force to replace "
                              f"what this command writes there")
    elif path.exists() or path.is_symlink():
        if out.kind != "file":
            raise OutputError(f"{label}: is a file; give a folder path")
        if not force:
            raise OutputError(f"{label}: exists; choose a new file, or pass --force to replace it")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"{label}: {shown(existing)} is a file, not a folder")
    writable = path if out.kind == "run" and path.is_dir() else existing
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"{label}: cannot write in {shown(writable)} (permission denied)")


def _check_nesting(outputs: Sequence[Output]) -> None:
    for outer in outputs:
        if outer.kind == "run":
            continue  # files written into a run folder do not replace it
        for inner in outputs:
            if inner is outer:
                continue
            a, b = outer.path.absolute(), inner.path.absolute()
            if a == b or a in b.parents:
                raise OutputError(f"{inner.option} {shown(inner.path)}: is inside {outer.option} {shown(outer.path)}, "
                                  "which is replaced as a whole; choose separate paths")


def check_outputs(outputs: Sequence[Optional[Output]], force: bool = False) -> None:
    """Refuse any output of ``outputs`` (``None`` entries: options not given) that cannot be written (see the
    module docstring); nothing is created."""
    given = [o for o in outputs if o is not None]
    for out in given:
        _check_one(out, force)
    _check_nesting(given)
