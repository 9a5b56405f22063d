"""Triton causal depthwise conv1d + SiLU over a slot pool of conv states; same contract as ``ref.py``.

The conv state pool [S, W-1, C] holds each sequence's last W-1 pre-conv inputs, oldest first, and is updated in place
through the slot indices (slot < 0: padding, its output row is written as zeros and no state is touched).
Kernels stay interpreter-clean (TRITON_INTERPRET=1): masks instead of early returns, no libdevice or inline asm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release


@triton.jit
def _conv_silu_window(x_row_ptr, w_ptr, cs_slot_ptr, stride_cs_w, ch, m_ch, valid,
                     W: tl.constexpr, WP: tl.constexpr):
    """silu(sum_j w[ch, j] * window_j) in fp32 for one token whose history is the conv state at cs_slot_ptr.

    ch: [BC] channel ids (masked by m_ch); valid: scalar, False loads nothing and yields zeros."""
    row = tl.arange(0, WP)
    m_row = row < W - 1
    x = tl.load(x_row_ptr + ch, mask=m_ch & valid, other=0.0).to(tl.float32)
    hist = tl.load(cs_slot_ptr + row[:, None] * stride_cs_w + ch[None, :],
                   mask=valid & m_row[:, None] & m_ch[None, :], other=0.0).to(tl.float32)
    w_hist = tl.load(w_ptr + ch[None, :] * W + row[:, None], mask=m_row[:, None] & m_ch[None, :], other=0.0)
    w_last = tl.load(w_ptr + ch * W + (W - 1), mask=m_ch, other=0.0).to(tl.float32)
    acc = tl.sum(hist * w_hist.to(tl.float32), 0) + x * w_last
    return acc * tl.sigmoid(acc)


@triton.jit
def _roll_window(x_row_ptr, cs_slot_ptr, stride_cs_w, ch, m_ch, do_it, W: tl.constexpr, WP: tl.constexpr):
    """Shift the window of channels ch left by one and append this token's input, in place (if do_it)."""
    row = tl.arange(0, WP)
    x = tl.load(x_row_ptr + ch, mask=m_ch & do_it, other=0.0)
    nxt = tl.load(cs_slot_ptr + (row[:, None] + 1) * stride_cs_w + ch[None, :],
                  mask=do_it & (row[:, None] + 1 < W - 1) & m_ch[None, :], other=0.0)
    new = tl.where(row[:, None] == W - 2, x[None, :].to(nxt.dtype), nxt)
    # row i is read by the thread that owns row i-1: all reads of the old window must land before any write
    tl.debug_barrier()
    tl.store(cs_slot_ptr + row[:, None] * stride_cs_w + ch[None, :], new,
             mask=do_it & (row[:, None] < W - 1) & m_ch[None, :])


@triton.jit
def _conv1d_update_kernel(x_ptr, w_ptr, cs_ptr, slot_ptr, y_ptr, C, stride_x, stride_y, stride_cs_s, stride_cs_w,
                          W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr = False):
    n = tl.program_id(0)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    m_ch = ch < C
    wait_then_release(PDL)  # x is the input projection's output; slots, the window: step data
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    cs_slot = cs_ptr + slot * stride_cs_s
    y = _conv_silu_window(x_ptr + n * stride_x, w_ptr, cs_slot, stride_cs_w, ch, m_ch, valid, W, WP)
    tl.store(y_ptr + n * stride_y + ch, tl.where(valid, y, 0.0).to(y_ptr.dtype.element_ty), mask=m_ch)
    _roll_window(x_ptr + n * stride_x, cs_slot, stride_cs_w, ch, m_ch, valid, W, WP)


# The per-step counts are not specialised on (T, N vary every step: each new divisibility class would recompile).
@triton.jit(do_not_specialize=["T", "N"])
def _conv1d_prefill_kernel(x_ptr, w_ptr, cs_ptr, cu_ptr, slot_ptr, init_ptr, y_ptr, T, C, N,
                           stride_x, stride_y, stride_cs_s, stride_cs_w,
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, LOG_N: tl.constexpr):
    """One [BT tokens, BC channels] tile of the flat batch; tiles may span sequences."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    m_t = t < T
    m_ch = ch < C
    t64 = t.to(tl.int64)  # token * row stride passes 2^31 at ~130k tokens of the merged projection's rows
    # each token's sequence: the largest n with cu[n] <= t (an empty sequence shares its start with the next one)
    lo = tl.zeros([BT], dtype=tl.int32)
    hi = tl.zeros([BT], dtype=tl.int32) + (N - 1)
    for _ in tl.static_range(LOG_N):
        mid = (lo + hi + 1) // 2
        up = tl.load(cu_ptr + mid) <= t
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    start = tl.load(cu_ptr + lo)
    slot = tl.load(slot_ptr + lo).to(tl.int64)
    init = tl.load(init_ptr + lo) != 0
    valid = m_t & (slot >= 0)
    pos = t - start
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        src = pos + (j - (W - 1))  # position of tap j inside the sequence; < 0 reads the history
        in_seq = src >= 0
        xv = tl.load(x_ptr + (t64 + (j - (W - 1)))[:, None] * stride_x + ch[None, :],
                     mask=(valid & in_seq)[:, None] & m_ch[None, :], other=0.0).to(tl.float32)
        hv = tl.load(cs_ptr + slot[:, None] * stride_cs_s + (src + (W - 1))[:, None] * stride_cs_w + ch[None, :],
                     mask=(valid & init & (src < 0))[:, None] & m_ch[None, :], other=0.0).to(tl.float32)
        w_j = tl.load(w_ptr + ch * W + j, mask=m_ch, other=0.0).to(tl.float32)
        acc += tl.where(in_seq[:, None], xv, hv) * w_j[None, :]
    y = tl.where(valid[:, None], acc * tl.sigmoid(acc), 0.0)
    tl.store(y_ptr + t64[:, None] * stride_y + ch[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_ch[None, :])


@triton.jit
def _conv1d_final_state_kernel(x_ptr, cs_ptr, cu_ptr, slot_ptr, init_ptr, C, stride_x, stride_cs_s, stride_cs_w,
                               W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr):
    """conv_state[slot] = last W-1 rows of [history; x_seq]. A separate launch: the prefill kernel's tiles read the
    old history of their sequence, and no tile can know when all of them are done."""
    n = tl.program_id(0)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    m_ch = ch < C
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    init = tl.load(init_ptr + n) != 0
    start = tl.load(cu_ptr + n).to(tl.int64)  # (start + src) * stride_x may pass 2^31
    length = tl.load(cu_ptr + n + 1) - start
    row = tl.arange(0, WP)
    m_row = valid & (row < W - 1)
    src = length + row - (W - 1)  # position in the sequence of the input that lands in row `row`
    in_seq = src >= 0
    cs_slot = cs_ptr + slot * stride_cs_s
    xv = tl.load(x_ptr + (start + src)[:, None] * stride_x + ch[None, :],
                 mask=(m_row & in_seq)[:, None] & m_ch[None, :], other=0.0)
    hv = tl.load(cs_slot + (length + row)[:, None] * stride_cs_w + ch[None, :],
                 mask=(m_row & ~in_seq & init)[:, None] & m_ch[None, :], other=0.0)
    new = tl.where(in_seq[:, None], xv.to(hv.dtype), hv)
    tl.debug_barrier()  # a short sequence keeps part of its old history: read all rows before writing any
    tl.store(cs_slot + row[:, None] * stride_cs_w + ch[None, :], new, mask=m_row[:, None] & m_ch[None, :])


def _check_pool(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor) -> None:
    if x.stride(-1) != 1 or weight.stride() != (weight.shape[1], 1) or conv_state.stride(-1) != 1:
        raise ValueError("conv1d kernels need x [., C], weight [C, W] and conv_state [S, W-1, C] contiguous in C "
                         f"(got strides {x.stride()}, {weight.stride()}, {conv_state.stride()}); call .contiguous()")
    if conv_state.shape[1] != weight.shape[1] - 1 or conv_state.shape[2] != x.shape[1]:
        raise ValueError(f"conv_state {tuple(conv_state.shape)} must be [S, W-1={weight.shape[1] - 1}, "
                         f"C={x.shape[1]}]")


def causal_conv1d_update(
    *, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Single-token decode: one new token per sequence, rolling the conv window in place.

    x: [N, C]; weight: [C, W]; conv_state: [S, W-1, C]; slots: [N] int64 (< 0: skip, row stays zero).
    Returns y: [N, C] in x.dtype."""
    _check_pool(x, weight, conv_state)
    n, c = x.shape
    width = weight.shape[1]
    y = x.new_empty(x.shape)
    if n == 0:
        return y
    block_c = 256
    _conv1d_update_kernel[(n, triton.cdiv(c, block_c))](
        x, weight, conv_state, slots, y, c, x.stride(0), y.stride(0), conv_state.stride(0), conv_state.stride(1),
        W=width, WP=triton.next_power_of_2(width - 1), BC=block_c, num_warps=2, **pdl_launch(x.device),
    )
    return y


# (BT tokens, BC channels, num_warps) of the prefill kernel's tiles: the fastest of the sweep at 27B channels, T=8192
# (benchmarks/RESULTS.md, 2026-11-27, H100, `bench_gdn.py --sweep`; 1.2x faster than 32 x 128, larger tiles slower).
PREFILL_TILE = (16, 256, 4)


def causal_conv1d_prefill(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Varlen causal conv over N sequences packed flat; updates their conv states in place (no host sync).

    x: [T, C]; weight: [C, W]; conv_state: [S, W-1, C]; cu_seqlens: [N+1] int32; slots: [N] int64 (< 0: skip,
    rows stay zero, no state write); has_initial_state: [N] bool. Returns y: [T, C] in x.dtype."""
    return causal_conv1d_prefill_launch(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens, slots=slots,
                                        has_initial_state=has_initial_state, tile=PREFILL_TILE)


def causal_conv1d_prefill_launch(
    *, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, cu_seqlens: torch.Tensor,
    slots: torch.Tensor, has_initial_state: torch.Tensor, tile: tuple[int, int, int],
) -> torch.Tensor:
    """causal_conv1d_prefill with an explicit (BT, BC, num_warps) tile (the benchmark sweeps them)."""
    _check_pool(x, weight, conv_state)
    total, c = x.shape
    n = slots.shape[0]
    width = weight.shape[1]
    y = x.new_empty(x.shape)
    if n == 0:
        return y.zero_()
    init = has_initial_state.view(torch.int8) if has_initial_state.dtype == torch.bool else has_initial_state
    block_t, block_c, num_warps = tile
    if total > 0:
        _conv1d_prefill_kernel[(triton.cdiv(total, block_t), triton.cdiv(c, block_c))](
            x, weight, conv_state, cu_seqlens, slots, init, y, total, c, n,
            x.stride(0), y.stride(0), conv_state.stride(0), conv_state.stride(1),
            W=width, BT=block_t, BC=block_c, LOG_N=max(8, n.bit_length()), num_warps=num_warps,
        )
    block_s = 256
    _conv1d_final_state_kernel[(n, triton.cdiv(c, block_s))](
        x, conv_state, cu_seqlens, slots, init, c, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        W=width, WP=triton.next_power_of_2(width - 1), BC=block_s, num_warps=2,
    )
    return y
