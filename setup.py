"""Build hook: the wheel carries the files ece-plugin finds in a clone (hparams, the demo testbed, its data).

setup.cfg holds all metadata. The files stay where the repository keeps them (``hparams/``, ``testbed/``,
``data/``); building copies them into ``ece_plugin/_bundled/`` with the same layout, where
:mod:`ece_plugin.resources` finds them when ece-plugin runs from an installed wheel. A clone (or an editable
install) reads them in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Files and folders under the repository's root that the wheel ships (MANIFEST.in lists the same for the sdist).
BUNDLED = (
    "hparams",
    "testbed/testbed-llama",
    "data/README.md",
    "data/counterfact/counterfact-edit.json",
    "data/counterfact/counterfact-val.json",
    "data/zsre/zsre_mend_eval.json",
    "data/wikitext-2-raw",
    "LICENSE",
    "CITATION.cff",
)
BUNDLE_PACKAGE_DIR = Path("ece_plugin") / "_bundled"


class BuildWithBundle(build_py):
    """``build_py`` that also copies :data:`BUNDLED` into ``ece_plugin/_bundled/`` of the build."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / BUNDLE_PACKAGE_DIR
        shutil.rmtree(target, ignore_errors=True)  # nothing left from an earlier build in the same build/ folder
        missing = [item for item in BUNDLED if not (ROOT / item).exists()]
        if missing:
            raise SystemExit(f"ece-plugin build: bundled files missing from the source tree: {missing}")
        for item in BUNDLED:
            source, dest = ROOT / item, target / item
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
            else:
                shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildWithBundle})
