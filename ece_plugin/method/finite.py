"""Finiteness checks: no NaN or infinity may reach the weights.

Statistics, sequential state and hyperparameters are checked when they are loaded (each loader raises its own
error naming the file or key, using :func:`count_nonfinite`); the update is checked once more after it is
written, before it is kept (:class:`NonFiniteUpdateError`, raised by ``update.write_layers``, which then rolls
the whole batch back).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


class NonFiniteError(ValueError):
    """A value that must be finite is NaN or infinite; the message names where it came from."""


class NonFiniteUpdateError(NonFiniteError):
    """An edit's update would make weights non-finite; the batch was rolled back."""


def count_nonfinite(t: Optional[torch.Tensor]) -> int:
    """Number of NaN / infinite entries of ``t`` (0 for ``None`` and for integer tensors)."""
    if t is None or not t.dtype.is_floating_point and not t.dtype.is_complex:
        return 0
    if bool(torch.isfinite(t.sum())):  # a non-finite entry makes the sum non-finite: no mask needed
        return 0
    return int((~torch.isfinite(t)).sum())  # the sum overflowed, or some entries are non-finite


def describe_nonfinite(t: torch.Tensor) -> str:
    """``'3 of 64 values are non-finite (2 NaN, 1 Inf)'``."""
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    return f"{n_nan + n_inf} of {t.numel()} values are non-finite ({n_nan} NaN, {n_inf} Inf)"


def require_finite(t: torch.Tensor, what: str, error: type[ValueError] = NonFiniteError) -> torch.Tensor:
    """Return ``t`` when every entry is finite; else raise ``error`` naming ``what``."""
    if count_nonfinite(t):
        raise error(f"{what}: {describe_nonfinite(t)}")
    return t


def is_finite_number(value: Any) -> bool:
    """False for a float NaN or infinity; True for anything else (ints, strings, None, ...)."""
    return not (isinstance(value, float) and not math.isfinite(value))
