"""EasyEdit main's editors that put an adapter module in place of the module they edit (GRACE, WISE): what the
studies need of any of them, whatever the adapter holds. Each method's own module adds how its adapter is scored
and checkpointed (:mod:`.grace`, :mod:`.wise`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ...method.architecture import get_module
from .baselines import EasyEditMethod
from .common import StudyError


def module_path(inner_param: str) -> str:
    """``model.layers[3].mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj`` (the adapters wrap modules)."""
    path = inner_param.replace("[", ".").replace("]", "")
    return path.rsplit(".", 1)[0] if path.endswith((".weight", ".bias")) else path


@dataclass
class AdapterMethod(EasyEditMethod):
    """An EasyEdit editor whose edits live in an adapter wrapping the one module its ``inner_params`` names."""

    ALG: ClassVar[str] = ""  # the EasyEdit algorithm the subclass runs
    ADAPTER: ClassVar[str] = ""  # the class name of its adapter
    side_state_name: ClassVar[str] = ""  # the file stem of the adapter's state in a checkpoint

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alg != self.ALG:
            raise StudyError(f"{type(self).__name__} runs {self.ALG}, not {self.alg}")

    def module_name(self, model: Optional[torch.nn.Module] = None) -> str:
        """The name of the module the adapter wraps."""
        inner = list(getattr(self.load(model), "inner_params", []) or [])
        if len(inner) != 1:
            raise StudyError(f"{self.ALG} edits one module; {self.hparams_path} names {len(inner)} in inner_params")
        return module_path(str(inner[0]))

    def adapter(self, model: torch.nn.Module) -> Any:
        """The adapter module on ``model`` (None before the first edit or after :meth:`reset`)."""
        module = get_module(model, self.module_name(model))
        return module if type(module).__name__ == self.ADAPTER else None

    def ensure_adapter(self, model: torch.nn.Module) -> Any:
        """The adapter, wrapped first (empty, as the method's first edit wraps it) when there is none."""
        if self.adapter(model) is None:
            from ... import easyedit

            easyedit.adapter_wrap(self.ALG, model, self.load(model))
        return self.adapter(model)

    def unwrap(self, model: torch.nn.Module) -> None:
        """Put the wrapped module back in the adapter's place (nothing when there is no adapter)."""
        adapter = self.adapter(model)
        if adapter is not None:
            parent_name, _, child = self.module_name(model).rpartition(".")
            setattr(get_module(model, parent_name), child, adapter.layer)
