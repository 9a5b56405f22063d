"""Linear layers. Quantized formats plug in later as alternative linear methods; models never branch on quant."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kernels.linear import linear


def new_param(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Parameter:
    """An uninitialised, frozen parameter; the loader (or dummy init) fills it in place."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ W^T, W: [out, in] as stored in Hugging Face checkpoints. No bias (Qwen3.5 has none)."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_param(out_features, in_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x=x, weight=self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class MergedLinear(Linear):
    """Projections of the same input stored as one weight, so they run as one GEMM (at decode, one weight stream
    instead of several small ones). Checkpoints keep them apart: `shards` maps each checkpoint projection name (a
    sibling of this module, e.g. "gate_proj") to its row count; the loader fills each shard's rows in order."""

    def __init__(self, in_features: int, shards: dict[str, int], *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, sum(shards.values()), dtype=dtype, device=device)
        self.shards = dict(shards)

    def shard_rows(self) -> dict[str, slice]:
        """Checkpoint projection name -> its rows of the merged weight."""
        rows, start = {}, 0
        for name, size in self.shards.items():
            rows[name] = slice(start, start + size)
            start += size
        return rows

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The shards' outputs, in order: column views of one [T, out] result."""
        return self(x).split(list(self.shards.values()), dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, shards={self.shards}"
