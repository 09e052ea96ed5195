"""Per-family facts about the MLP output projection W_out, and module access by name.

ECE's unit is a *neuron* k of the MLP: the k-th input of W_out (the key coordinate k) and the d_model output
weights it writes. The weight layout depends on the module type, never on the shape (d_model may equal d_ff):

* ``torch.nn.Linear`` (Llama ``down_proj``, GPT-J ``fc_out``): weight ``[d_model, d_ff]``, neuron k = column k.
* GPT-2 ``Conv1D`` (``c_proj``): weight ``[d_ff, d_model]`` (``y = x @ W + b``), neuron k = row k.

Everything that reads or writes neurons goes through :class:`WOut`, which presents the weight in the
*neuron view* ``[d_model, d_ff]`` (neuron k = column k) whatever the layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


class ArchitectureError(ValueError):
    """A module named in the hparams is missing or of a kind ECE cannot edit."""


class StopForward(Exception):
    """Raised by a forward hook once everything needed has been read: ends the forward early."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module ``name`` of ``model`` (clear error naming the template when it is absent)."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ArchitectureError(
            f"module {name!r} not found in {type(model).__name__}; check the *_module_tmp hparams"
        ) from exc


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``name`` (e.g. ``transformer.h.3.mlp.c_proj.weight``)."""
    for n, p in model.named_parameters():
        if n == name:
            return p
    raise ArchitectureError(f"parameter {name!r} not found in {type(model).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (transformers.pytorch_utils); matched by class name so no internal import is needed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def neuron_axis(module: nn.Module) -> int:
    """Axis of ``module.weight`` that indexes neurons (W_out inputs): 1 for Linear, 0 for GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return 1
    if _is_conv1d(module):
        return 0
    raise ArchitectureError(
        f"unsupported W_out module type {type(module).__name__}: ECE edits nn.Linear (down/out projections) "
        "or GPT-2 Conv1D (c_proj)"
    )


@dataclass(frozen=True)
class WOut:
    """The MLP output projection of one layer, with its neuron axis."""

    layer: int
    name: str  # module name, e.g. model.layers.4.mlp.down_proj
    module: nn.Module
    axis: int  # neuron axis of the weight

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight  # type: ignore[return-value]

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def d_ff(self) -> int:
        return int(self.weight.shape[self.axis])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1 - self.axis])

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def neuron_view(self) -> torch.Tensor:
        """The weight as ``[d_model, d_ff]`` (a view, no copy)."""
        w = self.weight
        return w if self.axis == 1 else w.t()

    def neuron_norms(self) -> torch.Tensor:
        """L2 norm of each neuron's output weights, ``[d_ff]`` float32 (input-independent)."""
        return self.neuron_view().detach().float().norm(dim=0)

    def read_neurons(self, idx: torch.Tensor) -> torch.Tensor:
        """Neurons ``idx`` as ``[d_model, |idx|]`` (a copy)."""
        idx = idx.to(self.device)
        return self.neuron_view().detach().index_select(1, idx).clone()

    def read_native(self, idx: torch.Tensor) -> torch.Tensor:
        """Neurons ``idx`` in the parameter's own layout (columns for Linear, rows for Conv1D), a copy."""
        return self.weight.detach().index_select(self.axis, idx.to(self.device)).clone()

    @torch.no_grad()
    def add_to_neurons(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta`` (``[d_model, |idx|]``, any float dtype) to neurons ``idx``, in place.

        The sum is formed in the wider of the two dtypes and cast back to the weight's dtype (as MEMIT adds its
        float64 update); every other neuron is left untouched (bit-identical).
        """
        idx = idx.to(self.device)
        if delta.shape != (self.d_model, idx.numel()):
            raise ValueError(f"delta shape {tuple(delta.shape)} != ({self.d_model}, {idx.numel()})")
        w = self.weight
        old = self.neuron_view().index_select(1, idx)
        wide = torch.promote_types(old.dtype, delta.dtype)
        new = (old.to(wide) + delta.to(device=w.device, dtype=wide)).to(w.dtype)
        if self.axis == 1:
            w.index_copy_(1, idx, new)
        else:
            w.index_copy_(0, idx, new.t().contiguous())


def w_out(model: nn.Module, template: str, layer: int) -> WOut:
    """The W_out of ``layer`` named by ``template`` (``hparams.rewrite_module_tmp``)."""
    name = template.format(layer)
    module = get_module(model, name)
    return WOut(layer=layer, name=name, module=module, axis=neuron_axis(module))


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError("cannot read the hidden size from the model config")


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError("cannot read the number of layers from the model config")


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's position scheme was made for (None when the config does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device (model-parallel safe)."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
        return emb.weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def hidden_state(output: object) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor in transformers 5, a tuple in 4.x)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ArchitectureError(f"unsupported layer output type {type(output).__name__}")


def replace_hidden_state(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its hidden state replaced, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise ArchitectureError(f"unsupported layer output type {type(output).__name__}")
