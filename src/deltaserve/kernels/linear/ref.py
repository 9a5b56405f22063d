"""Reference linear layer: torch's own GEMM, as the reference implementation runs it. Unlike the other references it
does not upcast its inputs: torch's GEMM already accumulates bf16/fp16 products in fp32 and rounds once, and an
upcast would copy every weight on every CPU call."""

from __future__ import annotations

import torch


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] -> x @ weight^T: [..., N] in x.dtype (products accumulated in fp32 and rounded
    once, as torch's GEMM does for bf16/fp16 inputs)."""
    return torch.nn.functional.linear(x, weight)


def rms_norm_linear(*, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None,
                    residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """linear(rms_norm(x + residual)): a decoder layer's input norm and its mixer's input projection as one op.

    x: [..., K] (the layer input); weight: [N, K]; norm_weight: [K], the zero-centred norm's (1 + w applied); eps;
    residual: [..., K] or None (the first layer); residual_out: [..., K], given with residual, receives
    x + residual (summed in x.dtype: the next residual stream). Returns [..., N] in x.dtype."""
    from deltaserve.kernels.norm import ref as norm_ref

    if residual is None:
        return linear(x=norm_ref.rms_norm(x=x, weight=norm_weight, eps=eps), weight=weight)
    normed, h = norm_ref.rms_norm(x=x, weight=norm_weight, eps=eps, residual=residual)
    residual_out.copy_(h)
    return linear(x=normed, weight=weight)
