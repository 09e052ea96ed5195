"""count_nonfinite: the sum tells a finite tensor at once; the entries are counted only when it does not."""

from __future__ import annotations

import torch

from ece_plugin.method.finite import count_nonfinite, describe_nonfinite


def test_finite_tensors_count_zero_even_when_their_sum_overflows() -> None:
    assert count_nonfinite(torch.randn(64, 64)) == 0
    big = torch.full((4,), 3e38, dtype=torch.float32)  # every entry finite, the float32 sum is inf
    assert not torch.isfinite(big.sum())
    assert count_nonfinite(big) == 0


def test_each_nan_and_infinity_is_counted() -> None:
    t = torch.zeros(10, dtype=torch.float64)
    t[[1, 4]] = float("nan")
    t[7] = float("inf")
    t[8] = -float("inf")  # inf + -inf: the sum is NaN, not a cancelled finite number
    assert count_nonfinite(t) == 4
    assert describe_nonfinite(t) == "4 of 10 values are non-finite (2 NaN, 2 Inf)"


def test_integer_tensors_and_none_have_no_nonfinite_values() -> None:
    assert count_nonfinite(None) == 0
    assert count_nonfinite(torch.arange(5)) == 0
