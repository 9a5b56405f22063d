"""apply_partial_rope against a complex-number rotation of the pairs (i, i + rotary_dim/2), and against
transformers' own Qwen3.5 rotary embedding at large positions."""

from __future__ import annotations

import pytest
import torch
from tests.tolerances import assert_close

from deltaserve.kernels.rope import apply_partial_rope

THETA = 1e7


def rope_truth(x: torch.Tensor, rotary_dim: int, angles: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; angles: [T, rotary_dim/2] float64. Pair (i, i + half) is the complex number x_i + j x_{i+half},
    rotated by e^{j angle_i}; dims >= rotary_dim untouched."""
    half = rotary_dim // 2
    x = x.double()
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * torch.polar(torch.ones_like(angles), angles)[:, None]
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 65])
def test_rope_small_positions(dtype, tokens):
    # positions below 64 keep the fp32 angle error under 1e-5 rad, so float64 angles are a fair truth
    gen = torch.Generator().manual_seed(tokens)
    rotary_dim, head_dim = 16, 48
    q = torch.randn(tokens, 4, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, 2, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    inv_freq = THETA ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.double()[:, None] * inv_freq
    q_out, k_out = apply_partial_rope(q=q, k=k, positions=positions, rotary_dim=rotary_dim, theta=THETA)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert_close(q_out, rope_truth(q, rotary_dim, angles))
    assert_close(k_out, rope_truth(k, rotary_dim, angles))
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


def test_rope_matches_transformers_at_large_positions():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen3_5TextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.25},
    )
    gen = torch.Generator().manual_seed(0)
    tokens = 33
    positions = torch.cat([torch.arange(5), torch.randint(1000, 262_144, (tokens - 5,), generator=gen)])
    q = torch.randn(tokens, 4, 256, generator=gen)
    k = torch.randn(tokens, 2, 256, generator=gen)
    cos, sin = Qwen3_5TextRotaryEmbedding(config)(q, positions[None, None, :].expand(3, 1, -1))
    # transformers works in [B, H, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = apply_partial_rope(q=q, k=k, positions=positions, rotary_dim=64, theta=THETA)
    assert_close(q_out, q_hf[0].transpose(0, 1))
    assert_close(k_out, k_hf[0].transpose(0, 1))
