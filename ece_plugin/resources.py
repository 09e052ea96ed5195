"""Where the files that come with ece-plugin live: hparams, data, testbeds.

Everything that locates a bundled file goes through here, so that one place knows the layout.

Two layouts, one shape. In a clone (or an editable install) the files are read where the repository keeps them:
``hparams/``, ``testbed/``, ``data/`` next to ``ece_plugin/``. An installed wheel carries the same tree inside
the package, ``ece_plugin/_bundled/`` (``setup.py`` copies it there at build time), found with
:mod:`importlib.resources`. :data:`REPO_ROOT` is whichever of the two holds the files, preferring the clone.

A bundled NAME resolves wherever a path is accepted: ``llama3-8b`` is ``hparams/ECE/llama3-8b.yaml``,
``testbed-llama`` is ``testbed/testbed-llama`` (as a model) or ``hparams/ECE/testbed-llama.yaml`` (as hparams),
``counterfact-edit`` is ``data/counterfact/counterfact-edit.json``. A path that exists always wins over a name.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional, Union

PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder holding ``ece_plugin/`` (a clone's root when running from a clone).
CLONE_ROOT = PACKAGE_DIR.parent
#: Where an installed wheel keeps the bundled files (absent in a clone).
BUNDLE_DIR = Path(str(importlib.resources.files("ece_plugin"))) / "_bundled"


def is_clone(root: Path) -> bool:
    """Does ``root`` hold a checkout of this repository (its hparams next to its build files)?"""
    return (root / "hparams" / "ECE").is_dir() and (root / "setup.cfg").is_file()


def files_root() -> Path:
    """The clone's root when running from a clone, else the wheel's ``ece_plugin/_bundled``."""
    return CLONE_ROOT if is_clone(CLONE_ROOT) or not BUNDLE_DIR.is_dir() else BUNDLE_DIR


#: The root of the bundled files' tree (``hparams/``, ``testbed/``, ``data/``): see :func:`files_root`.
REPO_ROOT = files_root()

MODEL_SUFFIXES = ("config.json",)
DATA_SUFFIXES = (".json", ".jsonl")


class ResourceNotFoundError(FileNotFoundError):
    """A path that does not exist and is no bundled name either."""


def repo_path(*parts: str) -> Path:
    """A path under the bundled files' root (``repo_path("data", "zsre")``)."""
    return REPO_ROOT.joinpath(*parts)


def bundled_hparams_names(alg: str = "ECE") -> list[str]:
    """The bundled hparams files of ``alg``, by name (``llama3-8b``, ``testbed-llama``, ...)."""
    folder = repo_path("hparams", alg)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def bundled_model_names() -> list[str]:
    """The bundled testbed model folders, by name."""
    folder = repo_path("testbed")
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def bundled_data_names() -> list[str]:
    """The bundled record files, by name (file stem: ``counterfact-edit``, ``zsre_mend_eval``)."""
    folder = repo_path("data")
    return sorted(p.stem for p in folder.rglob("*") if p.suffix in DATA_SUFFIXES) if folder.is_dir() else []


def _existing(value: Union[str, Path]) -> Optional[Path]:
    """``value`` as given (relative to the current folder), else relative to the bundled files' root."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not path.is_absolute() and repo_path(*path.parts).exists():
        return repo_path(*path.parts)
    return None


def resolve_hparams(value: Union[str, Path], alg: str = "ECE") -> Path:
    """An hparams file: a path (``.yaml`` may be omitted), or a bundled name of ``alg`` (``llama3-8b``)."""
    text = str(value)
    for candidate in (text, text + ".yaml") if not text.endswith((".yaml", ".yml", ".json")) else (text,):
        found = _existing(candidate)
        if found is not None and found.is_file():
            return found
    named = repo_path("hparams", alg, f"{Path(text).stem}.yaml")
    if "/" not in text and "\\" not in text and named.is_file():
        return named
    raise ResourceNotFoundError(
        f"hparams {text!r} not found: no such file, and no bundled {alg} hparams of that name "
        f"(bundled: {', '.join(bundled_hparams_names(alg)) or 'none'})"
    )


def resolve_model(value: Union[str, Path]) -> Path:
    """A model folder: a path, or a bundled testbed's name (``testbed-llama``). A Hugging Face hub id that is
    not a local folder is returned as given (``meta-llama/Meta-Llama-3-8B``): transformers resolves it."""
    text = str(value)
    found = _existing(text)
    if found is not None:
        return found
    named = repo_path("testbed", text)
    if (named / "config.json").is_file():
        return named
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return Path(text)  # a hub id
    raise ResourceNotFoundError(
        f"model {text!r} not found: no such folder, and no bundled testbed of that name "
        f"(bundled: {', '.join(bundled_model_names()) or 'none'})"
    )


def resolve_data(value: Union[str, Path]) -> Path:
    """A record file: a path, or a bundled file's stem (``counterfact-edit``, ``zsre_mend_eval``)."""
    text = str(value)
    found = _existing(text)
    if found is not None and found.is_file():
        return found
    if "/" not in text:
        folder = repo_path("data")
        matches = sorted(p for p in folder.rglob(f"{text}*") if p.suffix in DATA_SUFFIXES and p.stem == Path(text).stem)
        if matches:
            return matches[0]
    raise ResourceNotFoundError(
        f"data {text!r} not found: no such file, and no bundled record file of that name "
        f"(bundled: {', '.join(bundled_data_names()) or 'none'})"
    )


def version() -> str:
    """ece-plugin's version: a clone's setup.cfg (an editable install's metadata may be older), else the installed
    distribution's."""
    if is_clone(CLONE_ROOT):
        import configparser

        config = configparser.ConfigParser()
        config.read(CLONE_ROOT / "setup.cfg")
        return config.get("metadata", "version", fallback="unknown")
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ece-plugin")
    except PackageNotFoundError:
        return "unknown"
