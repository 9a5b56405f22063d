"""Reference partial rotary embedding: NeoX rotate-half pairing (i, i + rotary_dim/2) on the first rotary_dim dims
of each head, the rest pass through (docs/MODEL.md, "Gated full attention")."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, rotary_dim] fp32. Returns a new tensor in x.dtype."""
    x32 = x.float()
    rot, rest = x32[..., :rotary_dim], x32[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1).to(x.dtype)


def apply_partial_rope(
    *, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; k: [T, Hkv, D]; positions: [T] int64. Returns (q_out, k_out), new tensors in input dtype.

    inv_freq[i] = theta^(-2i/rotary_dim), angles = position * inv_freq in fp32.
    """
    # same fp32 expression as transformers, so the angles (and large-position rounding) match it bit for bit
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=q.device) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, rotary_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, rotary_dim], broadcast over heads
    cos, sin = emb.cos(), emb.sin()
    return _rotate(q, cos, sin, rotary_dim), _rotate(k, cos, sin, rotary_dim)
