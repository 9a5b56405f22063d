"""Reference gated activations: SiLU-and-mul of the dense MLP / shared expert, the attention output's sigmoid gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(*, x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I] in x.dtype, fp32 math."""
    half = x.shape[-1] // 2
    x32 = x.float()
    return (F.silu(x32[..., :half]) * x32[..., half:]).to(x.dtype)


def sigmoid_gate_mul(*, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], gate: [T, H, D] (may be a strided view) -> x * sigmoid(gate): [T, H, D] in x.dtype, fp32 math."""
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    return (x.float() * torch.sigmoid(gate.float())).to(x.dtype)
