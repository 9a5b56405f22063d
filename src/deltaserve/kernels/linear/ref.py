"""Reference linear layer: torch's own GEMM, as the reference implementation runs it."""

from __future__ import annotations

import torch


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] -> x @ weight^T: [..., N] in x.dtype (products accumulated in fp32 and rounded
    once, as torch's GEMM does for bf16/fp16 inputs)."""
    return torch.nn.functional.linear(x, weight)
