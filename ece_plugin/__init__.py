"""ece-plugin: ECE (Explainable and Efficient Editing, Zhang et al., WWW 2025) as an EasyEdit editor.

Importing this package registers ``ECE`` in EasyEdit's editor registry (``ALG_DICT``) and as a batchable
method when ``easyeditor`` (PyPI 0.0.1.dev0 or EasyEdit main on ``PYTHONPATH``) is importable, so that
``BaseEditor.from_hparams(ECEHyperParams.from_hparams("hparams/ECE/llama3-8b.yaml"))`` works.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def _interrupted_while_importing() -> None:
    """Ctrl-C while the ``ece-plugin`` command imports torch and EasyEdit: one line and exit 130, as at any
    other moment of a command (in a library import the KeyboardInterrupt propagates as usual)."""
    if Path(sys.argv[0]).name == "ece-plugin" if sys.argv and sys.argv[0] else False:
        sys.stderr.write("ece-plugin: interrupted\n")
        raise SystemExit(130)


try:
    from .easyedit import apply_ece_to_model
    from .easyedit import register as _register
    from .method.hparams import ECEHyperParams, HParamsError
    from .resources import version as _version

    _register()
except KeyboardInterrupt:
    _interrupted_while_importing()
    raise

__all__ = ["ECEHyperParams", "HParamsError", "apply_ece_to_model", "__version__"]
__version__ = _version()  # the installed distribution's (setup.cfg's in a clone without an install)

logging.getLogger(__name__).addHandler(logging.NullHandler())
