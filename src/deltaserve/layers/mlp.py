"""Dense SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.config import RankShapes
from deltaserve.layers.linear import Linear, MergedLinear
from deltaserve.parallel import sharding


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, shapes: RankShapes | None = None) -> None:
        """intermediate_size: this rank's (shapes: the rank, when the MLP is split by tensor parallelism)."""
        super().__init__()
        # gate_proj and up_proj as one [2I, D] weight: one GEMM, and its [T, 2I] output feeds the fused activation.
        self.gate_up_proj = MergedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size},
                                         dtype=dtype, device=device)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, device=device)
        if shapes is not None:  # tensor parallelism: column-parallel gate|up, row-parallel down
            rows = sharding.split(shapes, intermediate_size)
            self.gate_up_proj.tp_shards = {"gate_proj.weight": rows, "up_proj.weight": rows}
            self.down_proj.tp_shards = {"weight": sharding.split(shapes, intermediate_size, dim=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_gate(self.gate_up_proj(x))
