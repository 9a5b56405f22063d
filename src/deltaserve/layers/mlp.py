"""Dense SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kernels.activation import silu_and_mul
from deltaserve.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.up_proj = Linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One [T, 2I] buffer so the activation is a single fused op (and later one fused GEMM).
        gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(silu_and_mul(x=gate_up))
