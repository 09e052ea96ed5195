"""Layers that no change can reach, replayed from their cached outputs instead of run again (exact speed-ups).

Two places in an ECE batch run the same layers over the same tokens more than once, where the earlier run's
outputs are still valid:

* **z steps** (values.py, prefix_cache.py): the delta enters at the output of the z layer L, so layers 0..L
  give the same outputs at every step; they run once per batch and every step runs only the layers after L.
* **key re-reads** (keys.py, editor.py): layer i's keys are read after W_out of the earlier edited layers is
  written. Writing W_out of layer l changes nothing below l, so the read after that write starts from the
  output of layer l - 1 kept by the read before it, and runs only layers l and up.

During such a forward the decoder layers in question are swapped for stand-ins that hand back the cached
hidden states in the real layer's output container (a tensor in transformers 5, a tuple in 4.x; the
container is taken from one real output of the same layer). The next real layer sees exactly the input it
would have seen. Turned off by ``layer_replay: false``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architecture import get_module, replace_hidden_state


@dataclass
class LayerReplay:
    """The decoder layers ``names`` (0..L in order) whose output is replayed, and, once known, one real output
    of layer L (its container type, for the stand-ins)."""

    names: list[str]
    template: Any = None

    @property
    def last(self) -> str:
        """The layer whose output the stand-ins hand back."""
        return self.names[-1]


def decoder_layers(layer_module_tmp: str, upto: int) -> list[str]:
    """Names of the decoder layers 0..``upto`` (``layer_module_tmp`` as in the hparams)."""
    return [layer_module_tmp.format(i) for i in range(upto + 1)]


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns fixed hidden states in the real layer's output container."""

    def __init__(self, hidden: torch.Tensor, template: Any) -> None:
        super().__init__()
        self.hidden = hidden
        self.template = template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return replace_hidden_state(self.template, self.hidden)


@contextmanager
def replayed_layers(model: nn.Module, replay: LayerReplay, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, the layers of ``replay`` do not run: each hands back ``hidden`` (the last one's output;
    what the layers before it return is never read). One stand-in per layer, so a hook on a layer fires once."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in replay.names:
            parent_name, _, child = name.rpartition(".")
            parent = get_module(model, parent_name) if parent_name else model
            swapped.append((parent, child, parent._modules[child]))  # type: ignore[arg-type]
            parent._modules[child] = _Replay(hidden, replay.template)
        yield
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module
