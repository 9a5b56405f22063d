"""Reference linear layer: torch's own GEMM, as the reference implementation runs it. Unlike the other references it
does not upcast its inputs: torch's GEMM already accumulates bf16/fp16 products in fp32 and rounds once, and an
upcast would copy every weight on every CPU call."""

from __future__ import annotations

import torch


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] -> x @ weight^T: [..., N] in x.dtype (products accumulated in fp32 and rounded
    once, as torch's GEMM does for bf16/fp16 inputs)."""
    return torch.nn.functional.linear(x, weight)
