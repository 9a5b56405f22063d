"""Reference linear layer: torch's own GEMM, as the reference implementation runs it. Unlike the other references it
does not upcast its inputs: torch's GEMM already accumulates bf16/fp16 products in fp32 and rounds once, and an
upcast would copy every weight on every CPU call."""

from __future__ import annotations

import torch

from deltaserve.kernels.activation.ref import silu_and_mul


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] -> x @ weight^T: [..., N] in x.dtype (products accumulated in fp32 and rounded
    once, as torch's GEMM does for bf16/fp16 inputs)."""
    return torch.nn.functional.linear(x, weight)


def check_silu_mul_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[-1] != 2 * weight.shape[-1]:
        raise ValueError(f"silu_mul_linear: x must be [..., 2K] = [gate | up] for a weight of K = {weight.shape[-1]} "
                         f"columns; got x {tuple(x.shape)} and weight {tuple(weight.shape)}")


def silu_mul_linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., 2K] = [gate | up]; weight: [N, K] -> (silu(gate) * up) @ weight^T: [..., N] in x.dtype: the
    activation as silu_and_mul gives it (fp32 math, rounded to x.dtype), then linear (the dense MLP's down
    projection of its gate|up output)."""
    check_silu_mul_shapes(x, weight)
    return linear(x=silu_and_mul(x=x), weight=weight)
