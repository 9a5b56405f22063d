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
from deltaserve.kernels.conv1d.ref import check_qkv
from deltaserve.kernels.gated_delta_rule.ref import _L2_EPS


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


@triton.jit
def _conv_taps(w_ptr, ch, m_ch, W: tl.constexpr):
    """The W taps of channels ch, oldest input's first, as a tuple of fp32 [BC] vectors."""
    taps = ()
    for j in tl.static_range(W):
        taps = taps + (tl.load(w_ptr + ch * W + j, mask=m_ch, other=0.0).to(tl.float32),)
    return taps


@triton.jit
def _sequence_of(cu_ptr, t, N, BLOCK: tl.constexpr):
    """The sequence holding token t: the largest n < N with cu[n] <= t (an empty sequence starts where the next one
    does, so it is never the answer). A count over cu rather than a binary search: one round trip for N <= BLOCK."""
    count = 0
    for base in range(0, N, BLOCK):
        n = base + tl.arange(0, BLOCK)
        count += tl.sum(((tl.load(cu_ptr + n, mask=n < N, other=0) <= t) & (n < N)).to(tl.int32), 0)
    return count - 1


@triton.jit
def _next_sequence(cu_ptr, seq, end, t, N):
    """(sequence, its end) of token t, walking on from sequence seq, which ends at t, past empty sequences. Past the
    last sequence (x longer than the batch) it stays on the last one, whose end is then <= t: those rows are zeros."""
    while (end <= t) & (seq < N - 1):
        seq += 1
        end = tl.load(cu_ptr + seq + 1)
    return seq, end


@triton.jit
def _window_before(x_ptr, hist_ptr, t, start, use_hist, stride_x, stride_cs_w, ch, m_ch, W: tl.constexpr):
    """The W-1 inputs before token t of the sequence starting at token `start`, oldest first, as fp32 [BC] vectors:
    rows of x from `start` on, rows of the slot's history (hist_ptr) before it, zeros there if not use_hist."""
    win = ()
    for k in tl.static_range(W - 1):
        p = t - (W - 1) + k
        in_seq = p >= start
        xv = tl.load(x_ptr + tl.cast(p, tl.int64) * stride_x + ch, mask=m_ch & in_seq, other=0.0).to(tl.float32)
        hv = tl.load(hist_ptr + (p - start + (W - 1)) * stride_cs_w + ch, mask=m_ch & ~in_seq & use_hist,
                     other=0.0).to(tl.float32)
        win = win + (tl.where(in_seq, xv, hv),)
    return win


@triton.jit
def _rows(x_ptr, t, t_end, stride_x, ch, m_ch, R: tl.constexpr):
    """Rows t .. t+R-1 of x (those before t_end; zeros past it), raw, as a tuple of [BC] vectors."""
    rows = ()
    for r in tl.static_range(R):
        rows = rows + (tl.load(x_ptr + tl.cast(t + r, tl.int64) * stride_x + ch, mask=m_ch & (t + r < t_end),
                               other=0.0),)
    return rows


@triton.jit
def _conv_silu_row(win, x, taps, W: tl.constexpr):
    """silu(sum_j taps[j] * input_j) in fp32 for one token, accumulated in tap order (the reference's windows)."""
    acc = tl.zeros_like(x)
    for j in tl.static_range(W - 1):
        acc += win[j] * taps[j]
    acc += x * taps[W - 1]
    return _silu(acc)


@triton.jit
def _silu(x):
    """x * tl.sigmoid(x), bit for bit, in 4 fewer instructions an element on sm_90 (13 -> 9 of a row's ~22):
    tl.sigmoid computes exp(-x) as ex2.approx(-x * log2 e), with a negation and an ex2 that keeps subnormals (3
    instructions of range fix-up); exp2(x * -log2 e) is the same product, and its ex2 flushes subnormals, which
    changes nothing here: a subnormal exp added to 1 rounds to 1 either way."""
    return x * (1 / (1 + tl.exp2(x * -1.4426950408889634)))


# The per-step counts are not specialised on (T, N vary every step: each new divisibility class would recompile).
@triton.jit(do_not_specialize=["T", "N", "stride_plane"])
def _conv1d_prefill_kernel(x_ptr, w_ptr, cs_ptr, cu_ptr, slot_ptr, init_ptr, y_ptr, y2_ptr, T, C, SPLIT, N,
                           stride_x, stride_y, stride_y2, stride_cs_s, stride_cs_w, PLANE, stride_plane, eps,
                           W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HEAD: tl.constexpr,
                           NORM: tl.constexpr):
    """BC channels of the BT tokens [t0, t0 + BT) of the flat batch (which may span sequences), one token after the
    other: the W-1 previous inputs stay in registers, so each x row is read from memory once, and the slot's history
    is read only where a sequence starts (and for the program's first token). Channels < SPLIT go to y, in planes
    of PLANE columns (channel ch at plane ch // PLANE, column ch % PLANE), the rest to y2 (its column ch - SPLIT).
    The channels are held as [BC / HEAD, HEAD] rows; NORM: each row of y's channels (a q or k head) is L2-normalised
    after rounding to y's dtype, as l2norm_qk would read it back. The channel block is program_id(0), so the programs
    running together read whole rows of x rather than narrow column strips a row stride (25-33 kB) apart."""
    ch = tl.program_id(0) * BC + tl.arange(0, BC // HEAD)[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    m_ch = ch < C
    t0 = tl.program_id(1) * BT
    t_end = tl.minimum(t0 + BT, T)
    taps = _conv_taps(w_ptr, ch, m_ch, W)
    seq = _sequence_of(cu_ptr, t0, N, 256)
    end = tl.load(cu_ptr + seq + 1)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    use_hist = (slot >= 0) & (tl.load(init_ptr + seq) != 0)
    win = _window_before(x_ptr, cs_ptr + slot * stride_cs_s, t0, tl.load(cu_ptr + seq), use_hist, stride_x,
                         stride_cs_w, ch, m_ch, W)
    in_y, in_y2 = m_ch & (ch < SPLIT), m_ch & (ch >= SPLIT)
    # whether the block holds y (q, k) channels, y2 (v) ones or both: a v-only block skips the per-head norm (half
    # the blocks at 35B-A3B), where its results were masked away
    has_y, has_y2 = tl.program_id(0) * BC < SPLIT, tl.program_id(0) * BC + BC > SPLIT
    y_col = (ch // PLANE).to(tl.int64) * stride_plane + ch % PLANE
    # W-1 tokens a step: their loads are in flight together, and shifting the window by W-1 is a register renaming
    for tb in range(t0, t_end, W - 1):
        xs = _rows(x_ptr, tb, t_end, stride_x, ch, m_ch, W - 1)
        for u in tl.static_range(W - 1):
            t = tb + u
            if (t == end) & (t < t_end):  # a sequence starts here: its window is its slot's history
                seq, end = _next_sequence(cu_ptr, seq, end, t, N)
                slot = tl.load(slot_ptr + seq).to(tl.int64)
                use_hist = (slot >= 0) & (tl.load(init_ptr + seq) != 0)
                win = _window_before(x_ptr, cs_ptr + slot * stride_cs_s, t, t, use_hist, stride_x, stride_cs_w, ch,
                                     m_ch, W)
            x = xs[u].to(tl.float32)
            y = tl.where((slot >= 0) & (t < end), _conv_silu_row(win, x, taps, W), 0.0)
            t64 = tl.cast(t, tl.int64)  # token * row stride passes 2^31 at ~130k tokens
            if has_y:
                y_head = y
                if NORM:
                    y_head = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                    y_head = y_head * (1.0 / tl.sqrt(tl.sum(y_head * y_head, 1) + eps))[:, None]
                tl.store(y_ptr + t64 * stride_y + y_col, y_head.to(y_ptr.dtype.element_ty), mask=in_y & (t < t_end))
            if has_y2:
                tl.store(y2_ptr + t64 * stride_y2 + (ch - SPLIT), y.to(y2_ptr.dtype.element_ty),
                         mask=in_y2 & (t < t_end))
            win = win[1:] + (x,)


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


# (BT tokens, BC channels, num_warps) of the prefill kernel's programs: each walks BT tokens of BC channels, 8
# channels (16 bytes of bf16) per thread; at 35B-A3B, T = 8192, 16 x 64 programs of 2 warps, ~8 per SM, one wave.
# H200 sweep (`bench_gdn.py --conv-prefill --sweep`, benchmarks/RESULTS.md 2026-12-04): the fastest at 35B-A3B
# (101 us, 63% of copy; the previous kernel took 220), 152 us at 27B where 32 x 512 takes 132 (but 109 at 35B-A3B).
PREFILL_TILE = (128, 512, 2)
# The same for the conv with the fused L2-norm (causal_conv1d_prefill_qkv, the layer's call): the per-head sums
# lengthen each token's step, so shorter token runs and more programs pay. H100 sweep (benchmarks/RESULTS.md
# 2026-12-06, the tile table of the conv with the L2-norm; not yet swept on the H200): 32 x 512 x 2 warps the best
# or within 11% of it at both models' channels and 2,048 / 8,192 tokens (35B-A3B 8k 183 -> 155 us, 2k 92 -> 64;
# 27B 217 -> 184, 100 -> 66).
PREFILL_QKV_TILE = (32, 512, 2)


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
                                        has_initial_state=has_initial_state, split=x.shape[1], tile=PREFILL_TILE)[0]


def causal_conv1d_prefill_split(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_prefill whose y comes back as two contiguous tensors, y[:, :split] and y[:, split:], each
    written by the kernel in place (no copy)."""
    return causal_conv1d_prefill_launch(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens, slots=slots,
                                        has_initial_state=has_initial_state, split=split, tile=PREFILL_TILE)


def causal_conv1d_prefill_qkv(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    key_dim: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GDN layer's conv: (q, k, v) = y[:, :key_dim], y[:, key_dim:2 key_dim], y[:, 2 key_dim:], each contiguous,
    q and k L2-normalised per head of head_dim in the kernel that writes them (no pass of their own). A head_dim the
    kernel's channel rows cannot hold (not a power of two dividing the channel block) takes the split conv and
    l2norm_qk instead, with the same result."""
    check_qkv(x, key_dim, head_dim)
    total, block_c = x.shape[0], PREFILL_QKV_TILE[1]
    if head_dim & (head_dim - 1) or block_c % head_dim:
        from deltaserve.kernels.gated_delta_rule.triton import l2norm_qk

        qk, v = causal_conv1d_prefill_split(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens,
                                            slots=slots, has_initial_state=has_initial_state, split=2 * key_dim)
        heads = (total, key_dim // head_dim, head_dim)
        q, k = l2norm_qk(qk[:, :key_dim].view(heads), qk[:, key_dim:].view(heads))
        return q.view(total, key_dim), k.view(total, key_dim), v
    qk, v = causal_conv1d_prefill_launch(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens,
                                         slots=slots, has_initial_state=has_initial_state, split=2 * key_dim,
                                         tile=PREFILL_QKV_TILE, planes=2, norm_head=head_dim)
    return qk[0], qk[1], v


def causal_conv1d_prefill_launch(
    *, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, cu_seqlens: torch.Tensor,
    slots: torch.Tensor, has_initial_state: torch.Tensor, split: int, tile: tuple[int, int, int], planes: int = 1,
    norm_head: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_prefill_split with an explicit (BT, BC, num_warps) tile (the benchmark sweeps them). planes:
    the head section comes back as [planes, T, split / planes], each plane contiguous ([T, split] for one plane);
    norm_head (a power of two dividing BC and split): its heads of that many channels L2-normalised (0: none)."""
    _check_pool(x, weight, conv_state)
    total, c = x.shape
    if not 0 <= split <= c or split % planes:
        raise ValueError(f"split {split} must lie in [0, C={c}] and divide into {planes} planes")
    block_t, block_c, num_warps = tile
    if norm_head and (norm_head & (norm_head - 1) or block_c % norm_head or split % norm_head):
        raise ValueError(f"norm_head {norm_head} must be a power of two dividing the channel block {block_c} and "
                         f"the split {split}")
    n = slots.shape[0]
    width = weight.shape[1]
    plane = split // planes
    head, tail = x.new_empty(planes, total, plane), x.new_empty(total, c - split)
    if planes == 1:
        head = head[0]
    if n == 0:
        return head.zero_(), tail.zero_()
    init = has_initial_state.view(torch.int8) if has_initial_state.dtype == torch.bool else has_initial_state
    if total > 0:
        _conv1d_prefill_kernel[(triton.cdiv(c, block_c), triton.cdiv(total, block_t))](
            x, weight, conv_state, cu_seqlens, slots, init, head, tail, total, c, split, n,
            x.stride(0), plane, tail.stride(0), conv_state.stride(0), conv_state.stride(1), max(plane, 1),
            total * plane, _L2_EPS, W=width, BT=block_t, BC=block_c, HEAD=norm_head or block_c,
            NORM=norm_head > 0, num_warps=num_warps,
        )
    block_s = 256
    _conv1d_final_state_kernel[(n, triton.cdiv(c, block_s))](
        x, conv_state, cu_seqlens, slots, init, c, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        W=width, WP=triton.next_power_of_2(width - 1), BC=block_s, num_warps=2,
    )
    return head, tail
