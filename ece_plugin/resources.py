"""Where the files that come with ece-plugin live: hparams, data, testbeds.

Everything that locates a bundled file goes through here, so that one place knows the layout.
"""

from __future__ import annotations

from pathlib import Path

#: The folder holding ``ece_plugin/`` (a clone's root).
REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(*parts: str) -> Path:
    """A path under the clone's root (``repo_path("data", "zsre")``)."""
    return REPO_ROOT.joinpath(*parts)
