"""RMSNorm modules: zero-centred `(1 + w)` everywhere except the GDN output norm, which uses the plain weight."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kernels.norm import gated_rms_norm, rms_norm
from deltaserve.layers.linear import new_param
from deltaserve.layers.weights import seeded


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm (stored weights are ~0; the scale applied is 1 + w), optional fused residual add."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> norm(x); with a residual, (norm(x + residual), x + residual): the add fused in."""
        return rms_norm(x=x, weight=self.weight, eps=self.eps, residual=residual)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm over V with a plain fp32 weight, gated by silu(z) (norm before gate)."""

    def __init__(self, dim: int, eps: float, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_param(dim, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x=x, gate=gate, weight=self.weight, eps=self.eps)

    def init_dummy_weights(self, prefix: str, seed: int) -> None:
        with torch.no_grad():  # a plain scale (not zero-centred): stored near 1
            self.weight.normal_(1.0, 0.02, generator=seeded(prefix + "weight", seed, self.weight.device))
