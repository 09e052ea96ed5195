"""The loss layer's MLP at the positions the z loss reads, and nowhere else (an exact speed-up of the z steps).

A z step runs the layers after the z layer and reads the output of the loss layer (``v_loss_layer``) only at a
few positions of each row: the tokens whose next-token distribution must give the target, and the KL row's
fact token. Every other position's output of the loss layer is computed and never read, and since the forward
stops at the loss layer nothing after it reads them either. Its attention still runs at every position (other
positions' keys and values come from its input, which is unchanged), but its MLP, which works token by token,
needs only the read positions: the MLP is handed just those tokens and its output is put back in place, zeros
elsewhere. The read positions get the same values (up to float rounding of a smaller matrix product), so
the losses, gradients and z are those of the full forward.

On the scale testbed (z at layer 3, loss at layer 5 of 6) a row's suffix has about 5 tokens of which 1-2 are
read, and the loss layer's MLP is about 45 % of a step; on Llama-3-8B (z at 8, loss at 31) it is one MLP of
23 and the saving is small. Turned off by ``z_loss_positions_only: false``.

The key reads (keys.py) use the same argument at the deepest layer a read reaches: a key is the input of W_out
at a row's fact token, and the z layer's output is read there too, so that layer's MLP runs at the fact tokens
only (``key_positions_only: false`` turns it off). On the scale testbed, where d_ff is 13 times d_model, this is
most of the deepest layer's work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..architecture import ArchitectureError


@contextmanager
def mlp_at_positions(
    mlp: nn.Module, rows: torch.Tensor, positions: torch.Tensor, switch: str = "z_loss_positions_only"
) -> Iterator[None]:
    """Within the block, ``mlp`` (token-wise, called with the hidden states ``[R, T, d]`` first) runs only at
    ``(rows[j], positions[j])``; its output is zero at every other position. Pairs may repeat; inside the MLP its
    modules see the distinct pairs as one row ``[1, P, .]``, in order of (row, position). ``switch``: the hparam
    that turns this off, named when a model's MLP does not fit."""
    pairs = torch.unique(torch.stack([rows.long(), positions.long()]), dim=1)
    shape: dict[str, torch.Size] = {}

    def gather(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape["in"] = x.shape
        r, p = pairs[0].to(x.device), pairs[1].to(x.device)
        return (x[r, p].unsqueeze(0), *args[1:])

    def scatter(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ArchitectureError(
                f"{type(module).__name__} returned {type(output).__name__}, not a tensor: set "
                f"{switch}: false for this model"
            )
        full = output.new_zeros((*shape["in"][:-1], output.shape[-1]))
        r, p = pairs[0].to(output.device), pairs[1].to(output.device)
        return full.index_put((r, p), output.squeeze(0))

    handles = [mlp.register_forward_pre_hook(gather), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
