"""Reference RMSNorms: zero-centred ``(1 + w)`` RMSNorm (every norm except ``linear_attn.norm``) and the gated
RMSNorm with a plain weight used on the Gated DeltaNet output (docs/MODEL.md, "RMSNorm")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (1 + weight), fp32 math.

    x: [..., D]; weight: [D]; residual: [..., D] or None.
    Without residual returns y in x.dtype. With residual returns (y, h): h = x + residual is summed in x.dtype
    (the model adds residuals in activation dtype, so h is the next residual stream, bit for bit) and y = norm(h).
    """
    h = x if residual is None else x + residual
    y = (_normalize(h.float(), eps) * (1.0 + weight.float())).to(x.dtype)
    return y if residual is None else (y, h)


def gated_rms_norm(*, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Norm-before-gate RMSNorm with a plain weight (not 1 + w): y = weight * norm(x) * silu(gate), fp32 math.

    x, gate: [..., V]; weight: [V]. Returns y: [..., V] in x.dtype.
    """
    return (weight.float() * _normalize(x.float(), eps) * F.silu(gate.float())).to(x.dtype)
