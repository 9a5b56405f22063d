"""Reference gated activation of the dense MLP / shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(*, x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I] in x.dtype, fp32 math."""
    half = x.shape[-1] // 2
    x32 = x.float()
    return (F.silu(x32[..., :half]) * x32[..., half:]).to(x.dtype)
