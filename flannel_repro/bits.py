"""Bit patterns: compare tensors by their bits, not their values (NaN == NaN, -0.0 != 0.0)."""

from __future__ import annotations

import torch

# An integer dtype of each element size, to view floats as their bit patterns.
BITS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """`t` viewed as integers of its element size: equal bits, equal integers."""
    return t.view(BITS[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits. Of the same dtype: same shape and bytes. Of different
    floating dtypes: equal float32 bit patterns (bf16 -> float32 is exact)."""
    if a.dtype == b.dtype:
        return a.shape == b.shape and bool(
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return a.shape == b.shape and bool(torch.equal(a.float().view(torch.int32), b.float().view(torch.int32)))
