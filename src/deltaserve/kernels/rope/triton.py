"""Triton partial rotary embedding (same keyword-only signature as ref.py): one program per token rotates all of its
q and k heads in one pass and copies the pass-through dims.

Each column d < rotary_dim is paired with its partner d +- rotary_dim/2, loaded a second time through a permuted
index (Triton has no register shuffle); the two loads of one row hit the same cache lines. Angles are
position * inv_freq in fp32, exactly as the reference (and transformers) form them; they are then reduced modulo 2 pi
in fp64 before the fp32 cos/sin, so that large positions (angles up to ~1e6 rad) lose no accuracy whichever
cos/sin the compiler picks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TWO_PI = tl.constexpr(6.283185307179586)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def rope_cos_sin(pos, inv_freq_ptr, cols, HALF: tl.constexpr):
    """pos: fp32 scalar; cols: [BLOCK_D] column indices. Returns (cos, sin, partner, is_rot, sign), each [BLOCK_D]:
    the angle of column d is pos * inv_freq[d % HALF] for d < 2 * HALF; other columns pass through."""
    is_rot = cols < 2 * HALF
    first = cols < HALF
    inv = tl.load(inv_freq_ptr + tl.where(first, cols, cols - HALF), mask=is_rot, other=0.0)
    ang = (pos * inv).to(tl.float64)
    turns = (ang * _INV_TWO_PI + 0.5).to(tl.int64).to(tl.float64)  # angles are >= 0: truncation is floor
    r = (ang - turns * _TWO_PI).to(tl.float32)
    partner = tl.where(first, cols + HALF, cols - HALF)
    sign = tl.where(first, -1.0, 1.0)
    return tl.cos(r), tl.sin(r), partner, is_rot, sign


@triton.jit
def _rope_heads(x_ptr, o_ptr, stride_xh, n_heads, cos, sin, cols, partner, is_rot, sign,
                D: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < D)
    rows = x_ptr + heads[:, None] * stride_xh
    x = tl.load(rows + cols[None, :], mask=mask, other=0.0)
    xp = tl.load(rows + partner[None, :], mask=mask & is_rot[None, :], other=0.0).to(tl.float32)
    rotated = x.to(tl.float32) * cos[None, :] + sign[None, :] * xp * sin[None, :]
    out = tl.where(is_rot[None, :], rotated.to(o_ptr.dtype.element_ty), x.to(o_ptr.dtype.element_ty))
    tl.store(o_ptr + heads[:, None] * D + cols[None, :], out, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    cols = tl.arange(0, BLOCK_D)
    cos, sin, partner, is_rot, sign = rope_cos_sin(pos, inv_freq_ptr, cols, HALF)
    _rope_heads(q_ptr + t * stride_qt, qo_ptr + t * (HQ * D), stride_qh, HQ, cos, sin, cols, partner, is_rot, sign,
                D, BLOCK_HQ)
    _rope_heads(k_ptr + t * stride_kt, ko_ptr + t * (HK * D), stride_kh, HK, cos, sin, cols, partner, is_rot, sign,
                D, BLOCK_HK)


@functools.lru_cache(maxsize=16)
def inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/rotary_dim): the reference's fp32 expression, evaluated once on the CPU (so it is
    bit-identical to the reference) and cached on the device. Call it before CUDA graph capture."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (theta**exponents)).to(device)


def rope_outputs(q: torch.Tensor, k: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check rotary_dim against q's head dim and allocate the (q_out, k_out) of a rotating op."""
    if rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim} must be even and at most head_dim={q.shape[-1]}")
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def apply_partial_rope(
    *, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; k: [T, Hkv, D]; positions: [T] int64. Returns (q_out, k_out), new tensors in input dtype.

    inv_freq[i] = theta^(-2i/rotary_dim), angles = position * inv_freq in fp32.
    """
    T, Hq, D = q.shape
    Hk = k.shape[1]
    q_out, k_out = rope_outputs(q, k, rotary_dim)
    if T == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    _rope_kernel[(T,)](
        q, k, q_out, k_out, positions, inv_freq(rotary_dim, theta, q.device),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        HQ=Hq, HK=Hk, D=D, HALF=rotary_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )
    return q_out, k_out
