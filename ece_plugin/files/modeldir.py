"""Saving a model folder without ever losing what was there.

:func:`save_model_folder` writes the model and tokenizer into a new folder beside the target, copies in the
target's other files (a manifest, a README: everything but weight files, which the new save replaces), gives
the result normal permissions (directories ``0777 & ~umask``, files ``0666 & ~umask``: 0755 / 0644 under the
usual umask), and only then swaps it in: the old folder is renamed aside, the new one renamed into place, the
old one removed (:func:`ece_plugin.method.atomic.atomic_folder`, the one write-beside-and-swap path). A failure
at any step before the swap leaves the target untouched; a failed swap renames the old folder back.

A target that exists, is not empty and is not a model folder (no ``config.json``) is refused unless
``force=True``, so a typo cannot replace a user's folder with a model.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path
from typing import Any, Union

from ..method import atomic

logger = logging.getLogger(__name__)

# files of the old folder that the new save replaces (and that must not survive beside a new weight file)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.index.json")


class ModelFolderError(ValueError):
    """A model folder cannot be written where asked; the message names the folder."""


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_target(path: Union[str, Path], force: bool = False) -> Path:
    """Refuse a target that is a file, or a non-empty folder that is not a model folder (unless ``force``)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ModelFolderError(f"{target}: exists and is not a folder; choose another output folder")
    if target.is_dir() and not force and not is_model_folder(target) and any(target.iterdir()):
        raise ModelFolderError(
            f"{target}: not empty and not a model folder (no config.json); refusing to replace it "
            "(choose an empty or new folder, or pass --force)"
        )
    return target


def normal_permissions(root: Path) -> None:
    """Directories ``0777 & ~umask``, files ``0666 & ~umask`` under ``root`` (``mkdtemp`` makes 0700)."""
    atomic.normal_permissions(root)


def _is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)


def carry_over(old: Path, new: Path) -> list[str]:
    """Copy every entry of ``old`` that ``new`` lacks, except weight files; returns the names copied."""
    copied = []
    for entry in sorted(old.iterdir()):
        dest = new / entry.name
        if dest.exists() or dest.is_symlink() or (entry.is_file() and _is_weight_file(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True)
        else:
            shutil.copy2(entry, dest, follow_symlinks=False)
        copied.append(entry.name)
    return copied


def swap_in(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` (:func:`ece_plugin.method.atomic.swap_in`)."""
    atomic.swap_in(new, target)


def save_model_folder(model: Any, tok: Any, path: Union[str, Path], force: bool = False) -> Path:
    """``save_pretrained`` of ``model`` and ``tok`` into ``path``, safely (see the module docstring)."""
    target = check_target(path, force).absolute()
    with atomic.atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.is_dir():
            kept = carry_over(target, tmp)
            if kept:
                logger.info("%s: kept %s from the folder that was there", target, ", ".join(kept))
    return target
