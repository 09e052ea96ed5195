"""ece-plugin: ECE (Explainable and Efficient Editing, Zhang et al., WWW 2025) as an EasyEdit editor.

Importing this package registers ``ECE`` in EasyEdit's editor registry (``ALG_DICT``) and as a batchable
method when ``easyeditor`` (PyPI 0.0.1.dev0 or EasyEdit main on ``PYTHONPATH``) is importable, so that
``BaseEditor.from_hparams(ECEHyperParams.from_hparams("hparams/ECE/llama3-8b.yaml"))`` works.
"""

from __future__ import annotations

import logging

from .easyedit import apply_ece_to_model
from .method.hparams import ECEHyperParams, HParamsError
from .resources import version as _version

__all__ = ["ECEHyperParams", "HParamsError", "apply_ece_to_model", "__version__"]
__version__ = _version()  # the installed distribution's (setup.cfg's in a clone without an install)

logging.getLogger(__name__).addHandler(logging.NullHandler())

from .easyedit import register as _register  # noqa: E402

_register()
