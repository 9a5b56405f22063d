"""GPU gated delta rule: a single-token decode step and a k-token verify step (two Triton launches each) with the
verify step's commit (for all layers at once: one copy launch for the conv windows, one replay launch for the
recurrent states), the gating and q/k-norm kernels of the prefill,
and the chunked prefill itself through fla-core (fla_chunk.py).

Same contracts as ``ref.py``. The recurrent state pool [S, HV, K, V] (fp32, or bf16 to halve its memory and traffic)
is read and written in place through the slot indices; slot < 0 is padding (output rows written as zeros, no state
touched). Whatever the pool's dtype, the recurrence runs in fp32: a bf16 state is widened on load and rounded to
nearest even once per step on store (the conversions compile away for an fp32 pool).

Decode (``fused_gdn_decode``) runs the conv-update kernel (conv + SiLU of every channel, rounded to the activation
dtype as the unfused layer does, window rolled in place), then one program per (row n, value head hv, V tile):
load the fp32 state tile S[slot, hv, :, tile] ([K, BV], the bulk of the bytes) first so it is in flight while the
rest is computed; L2-normalise q and k of key head h = hv // (HV/H), scale q; g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b); one delta-rule step; write o and the tile back. Splitting the conv out leaves the recurrence
programs nothing to share, so they can be many and small (the state traffic is spread over every SM); the single
fused kernels it replaced, which had to coordinate the q/k window shared by a key head's programs, ran at 65-70% of
copy bandwidth at batch 64 against 85-89% for this pair (benchmarks/RESULTS.md, 2026-11-27, H100, `bench_gdn.py`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release
from deltaserve.kernels.conv1d.triton import causal_conv1d_update

_L2_EPS = 1e-6
_STATE_DTYPES = (torch.float32, torch.bfloat16)  # state pool storage; the math is fp32 either way


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (threshold 20); exp(x) where 1 + exp(x) would round to 1
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _log_gates(a_row, b_row, alog_ptr, dtb_ptr, hv, act: tl.constexpr):
    """(g = -exp(A_log) softplus(a + dt_bias), beta) of value head hv, fp32 scalars; beta rounded to the activation
    dtype."""
    return _log_gates_of(tl.load(a_row + hv), tl.load(b_row + hv), alog_ptr, dtb_ptr, hv, act)


@triton.jit
def _log_gates_of(a, b, alog_ptr, dtb_ptr, hv, act: tl.constexpr):
    """_log_gates from value head hv's loaded a and b."""
    a = a.to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * _softplus(a + tl.load(dtb_ptr + hv).to(tl.float32))
    beta = tl.sigmoid(b.to(tl.float32)).to(act).to(tl.float32)
    return g, beta


@triton.jit
def _gates(a_row, b_row, alog_ptr, dtb_ptr, hv, act: tl.constexpr):
    """(decay = exp(g), beta) of value head hv, fp32 scalars; beta rounded to the activation dtype."""
    g, beta = _log_gates(a_row, b_row, alog_ptr, dtb_ptr, hv, act)
    return tl.exp(g), beta


@triton.jit
def _step(s, q, k, v, decay, beta):
    """One delta-rule step on a [K, BV] tile: returns (new tile, o [BV])."""
    s = s * decay
    delta = beta * (v - tl.sum(s * k[:, None], 0))
    s = s + k[:, None] * delta[None, :]
    return s, tl.sum(s * q[:, None], 0)


@triton.jit
def _decode_recurrent_kernel(
    y_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, ss_ptr, slot_ptr, o_ptr,
    stride_y, stride_a, stride_b, stride_ss_s,
    scale, eps,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PDL: tl.constexpr = False,
):
    """The recurrence of a decode step: one program per (row n, value head hv, V tile) over the post-conv
    activations y [N, 2*H*K + HV*V] that the conv-update kernel wrote; every load is independent of the others."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    n = i_nh // HV
    hv = i_nh % HV
    h = hv // (HV // H)
    wait_then_release(PDL)  # y is the conv kernel's output; the slot and its state: step data
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_s = ss_ptr + slot * stride_ss_s + hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    m_s = valid & m_k[:, None] & m_v[None, :]
    s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    y_row = y_ptr + n * stride_y
    q = tl.load(y_row + h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    k = tl.load(y_row + H * K + h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    v = tl.load(y_row + 2 * H * K + hv * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    decay, beta = _gates(a_ptr + n * stride_a, b_ptr + n * stride_b, alog_ptr, dtb_ptr, hv, y_ptr.dtype.element_ty)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + eps) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + eps)
    s, o = _step(s, q, k, v, decay, beta)
    tl.store(o_ptr + i_nh * V + o_v, tl.where(valid, o, 0.0).to(o_ptr.dtype.element_ty), mask=m_v)
    tl.store(p_s, s.to(ss_ptr.dtype.element_ty), mask=m_s)


def decode_config(num_rows: int, num_v_heads: int) -> tuple[int, int]:
    """(BV, num_warps) of the recurrence kernel: small tiles with one warp when there are few (row, head) pairs,
    BV=64 with 4 warps once there are enough programs to fill the GPU. The sweep that chose them (27B and 35B-A3B
    shapes, batch 1 to 64) is in benchmarks/RESULTS.md (2026-11-27, H100, `bench_gdn.py --sweep`)."""
    if num_rows * num_v_heads >= 256:
        return 64, 4
    return 16, 1


def _check_decode_args(mixed_qkv: torch.Tensor, conv_weight: torch.Tensor, conv_state: torch.Tensor,
                       ssm_state: torch.Tensor, hk: int, dk: int, hv: int, dv: int) -> None:
    conv_dim, width = mixed_qkv.shape[1], conv_weight.shape[1]
    if conv_dim != 2 * hk * dk + hv * dv or hv % hk:
        raise ValueError(f"mixed_qkv has {conv_dim} channels, expected 2*H*K + HV*V = {2 * hk * dk + hv * dv} "
                         f"with HV % H == 0 (H={hk}, K={dk}, HV={hv}, V={dv})")
    if ssm_state.dtype not in _STATE_DTYPES or ssm_state.shape[1:] != (hv, dk, dv) or \
            ssm_state.stride()[1:] != (dk * dv, dv, 1):
        raise ValueError(f"ssm_state must be an fp32 or bf16 pool [S, {hv}, {dk}, {dv}] contiguous per slot, got "
                         f"{ssm_state.dtype} {tuple(ssm_state.shape)} strides {ssm_state.stride()}")
    if conv_state.shape[1:] != (width - 1, conv_dim) or conv_state.stride(2) != 1:
        raise ValueError(f"conv_state must be [S, {width - 1}, {conv_dim}] contiguous in channels, got "
                         f"{tuple(conv_state.shape)} strides {conv_state.stride()}")


def fused_gdn_decode_launch(
    *, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    conv_weight: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor,
    num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int, scale: float,
    block_v: int, num_warps: int,
) -> torch.Tensor:
    """fused_gdn_decode with an explicit recurrence tiling (the tests and the benchmark sweep them)."""
    hk, hv, dk, dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    _check_decode_args(mixed_qkv, conv_weight, conv_state, ssm_state, hk, dk, hv, dv)
    n = mixed_qkv.shape[0]
    # Rows may be strided (column slices of the merged input projection); only the last dim must be unit-stride.
    mixed_qkv, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (mixed_qkv, a, b))
    o = mixed_qkv.new_empty(n, hv, dv)
    if n == 0:
        return o
    y = causal_conv1d_update(x=mixed_qkv, weight=conv_weight.contiguous(), conv_state=conv_state, slots=slots)
    num_tiles = triton.cdiv(dv, block_v)
    _decode_recurrent_kernel[(n * hv * num_tiles,)](
        y, a, b, A_log, dt_bias, ssm_state, slots, o, y.stride(0), a.stride(0), b.stride(0), ssm_state.stride(0),
        float(scale), _L2_EPS, H=hk, HV=hv, K=dk, V=dv, BK=triton.next_power_of_2(dk), BV=block_v, NV=num_tiles,
        num_warps=num_warps, **pdl_launch(y.device))
    return o


def fused_gdn_decode(
    *,
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    head_v_dim: int,
    scale: float,
) -> torch.Tensor:
    """One decode step of a GDN layer's core for N single-token rows (see the module docstring).

    mixed_qkv: [N, conv_dim = 2*H*K + HV*V] pre-conv; a, b: [N, HV]; A_log, dt_bias: [HV]; conv_weight: [conv_dim, W];
    conv_state: [S, W-1, conv_dim]; ssm_state: [S, HV, K, V] fp32 or bf16; slots: [N] int64 (< 0: skip).
    Returns o: [N, HV, V] in mixed_qkv.dtype. CUDA-graph safe."""
    block_v, num_warps = decode_config(mixed_qkv.shape[0], num_v_heads)
    return fused_gdn_decode_launch(
        mixed_qkv=mixed_qkv, a=a, b=b, A_log=A_log, dt_bias=dt_bias, conv_weight=conv_weight, conv_state=conv_state,
        ssm_state=ssm_state, slots=slots, num_k_heads=num_k_heads, head_k_dim=head_k_dim, num_v_heads=num_v_heads,
        head_v_dim=head_v_dim, scale=scale, block_v=min(block_v, triton.next_power_of_2(head_v_dim)),
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Prefill: fla-core's chunk kernel over sequence-ordered states, with a gather from and a scatter to the slot pool.


@triton.jit
def _gather_states_kernel(pool_ptr, out_ptr, slot_ptr, init_ptr, stride_pool, NUMEL: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[n] = pool[slot[n]] if slot[n] >= 0 and init[n] else zeros (out fp32, the pool fp32 or bf16)."""
    n = tl.program_id(0)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = off < NUMEL
    slot = tl.load(slot_ptr + n).to(tl.int64)
    keep = (slot >= 0) & (tl.load(init_ptr + n) != 0)
    val = tl.load(pool_ptr + slot * stride_pool + off, mask=m & keep, other=0.0)
    tl.store(out_ptr + n.to(tl.int64) * NUMEL + off, val.to(tl.float32), mask=m)


@triton.jit
def _scatter_states_kernel(src_ptr, pool_ptr, slot_ptr, stride_pool, NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    """pool[slot[n]] = src[n] where slot[n] >= 0 (src fp32; rounded to nearest even for a bf16 pool)."""
    n = tl.program_id(0)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    m = (off < NUMEL) & (slot >= 0)
    val = tl.load(src_ptr + n.to(tl.int64) * NUMEL + off, mask=m)
    tl.store(pool_ptr + slot * stride_pool + off, val.to(pool_ptr.dtype.element_ty), mask=m)


_COPY_BLOCK = 2048


def gather_states(state: torch.Tensor, slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    """[S, ...] pool -> [N, ...] fp32: each row's slot state, zeros where slot < 0 or not has_initial_state."""
    numel = state[0].numel()
    out = state.new_empty(slots.shape[0], *state.shape[1:], dtype=torch.float32)  # fla-core's fp32 initial state
    init = has_initial_state.view(torch.int8) if has_initial_state.dtype == torch.bool else has_initial_state
    if slots.shape[0]:
        _gather_states_kernel[(slots.shape[0], triton.cdiv(numel, _COPY_BLOCK))](
            state, out, slots, init, state.stride(0), NUMEL=numel, BLOCK=_COPY_BLOCK, num_warps=4)
    return out


def scatter_states(src: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> None:
    """state[slots[n]] = src[n] for slots[n] >= 0 (in place)."""
    numel = state[0].numel()
    if slots.shape[0]:
        _scatter_states_kernel[(slots.shape[0], triton.cdiv(numel, _COPY_BLOCK))](
            src.contiguous(), state, slots, state.stride(0), NUMEL=numel, BLOCK=_COPY_BLOCK, num_warps=4)


def _check_state_pool(state: torch.Tensor) -> None:
    if state.dtype not in _STATE_DTYPES or not state[0].is_contiguous():
        raise ValueError(f"state must be an fp32 or bf16 pool [S, HV, K, V] contiguous per slot, got {state.dtype} "
                         f"strides {state.stride()}")


@triton.jit(do_not_specialize=["T"])  # the token count varies every step: one compiled kernel
def _gating_kernel(a_ptr, b_ptr, alog_ptr, dtb_ptr, g_ptr, beta_ptr, T, stride_a, stride_b,
                   HV: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """g = -exp(A_log) softplus(a + dt_bias) (fp32) and beta = sigmoid(b) for BT tokens x all HV heads."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    hv = tl.arange(0, BH)
    m = (t < T)[:, None] & (hv < HV)[None, :]
    t64 = t.to(tl.int64)[:, None]
    a = tl.load(a_ptr + t64 * stride_a + hv[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t64 * stride_b + hv[None, :], mask=m, other=0.0).to(tl.float32)
    neg_a = -tl.exp(tl.load(alog_ptr + hv, mask=hv < HV, other=0.0).to(tl.float32))
    dtb = tl.load(dtb_ptr + hv, mask=hv < HV, other=0.0).to(tl.float32)
    g = neg_a[None, :] * _softplus(a + dtb[None, :])
    tl.store(g_ptr + t64 * HV + hv[None, :], g, mask=m)
    tl.store(beta_ptr + t64 * HV + hv[None, :], tl.sigmoid(b).to(beta_ptr.dtype.element_ty), mask=m)


def gdn_gating(*, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
               beta_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ref.gdn_gating, one launch; a and b may be column slices (unit stride in the last dim)."""
    T, hv = a.shape
    a, b = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, b))
    g = torch.empty(T, hv, dtype=torch.float32, device=a.device)
    beta = torch.empty(T, hv, dtype=beta_dtype, device=a.device)
    if T:
        bh = triton.next_power_of_2(hv)
        bt = max(1, 2048 // bh)
        _gating_kernel[(triton.cdiv(T, bt),)](a, b, A_log, dt_bias, g, beta, T, a.stride(0), b.stride(0),
                                              HV=hv, BT=bt, BH=bh, num_warps=4)
    return g, beta


@triton.jit(do_not_specialize=["T"])
def _l2norm_qk_kernel(q_ptr, k_ptr, out_ptr, T, stride_t, stride_h, eps,
                      H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """out[0] = l2norm(q), out[1] = l2norm(k): rows (token, head) of strided [T, H, K] inputs -> contiguous."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    which = tl.program_id(1)
    src = q_ptr if which == 0 else k_ptr
    t = (r // H).to(tl.int64)
    h = r % H
    o_k = tl.arange(0, BK)
    m = (r < T * H)[:, None] & (o_k < K)[None, :]
    x = tl.load(src + t[:, None] * stride_t + h[:, None] * stride_h + o_k[None, :], mask=m, other=0.0)
    x = x.to(tl.float32)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, 1) + eps))[:, None]
    dst = out_ptr + which.to(tl.int64) * T * H * K + (t * H + h)[:, None] * K + o_k[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=m)


def l2norm_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised q, k ([T, H, K], same shape and strides, unit stride in K) as contiguous tensors, rounded to
    their dtype, with fla-core's l2norm formula (x / sqrt(sum x^2 + eps)); one launch for both."""
    T, H, K = q.shape
    if k.shape != q.shape or k.stride() != q.stride() or q.stride(-1) != 1:
        raise ValueError(f"q and k must have the same shape and strides with unit stride in the last dim, got "
                         f"{tuple(q.shape)} {q.stride()} and {tuple(k.shape)} {k.stride()}")
    out = torch.empty(2, T, H, K, dtype=q.dtype, device=q.device)
    if T:
        br = 16
        _l2norm_qk_kernel[(triton.cdiv(T * H, br), 2)](q, k, out, T, q.stride(0), q.stride(1), _L2_EPS,
                                                       H=H, K=K, BK=triton.next_power_of_2(K), BR=br, num_warps=4)
    return out[0], out[1]


def chunk_gated_delta_rule(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    chunk_indices: torch.Tensor | None = None,
    any_padding: bool = True,
    chunk_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill over N sequences packed flat through fla-core's chunk forward (fla_chunk.py); reads and writes their
    states in place. Same contract as ref.chunk_gated_delta_rule.

    q, k: [T, H, K] (may be strided views of the conv output); v: [T, HV, V]; g: [T, HV] fp32 log-decay;
    beta: [T, HV]; state: [S, HV, K, V] fp32 or bf16 (gathered to fp32 for fla-core, its fp32 final states rounded
    back on the scatter); cu_seqlens: [N+1] (int64 spares a conversion); slots: [N] int64 (< 0:
    skip, rows stay zero, no state write); has_initial_state: [N] bool. Returns o: [T, HV, V] in v.dtype. With
    chunk_indices (built on the host) it syncs nothing. any_padding=False: the caller guarantees every slot is >= 0,
    so the zeroing pass over the output is skipped. chunk_states: fla keeps its per-chunk states in the input dtype,
    which would not be exact checkpoints, so a call that asks for them runs the reference."""
    if chunk_states is not None:
        from deltaserve.kernels.gated_delta_rule import ref

        return ref.chunk_gated_delta_rule(
            q=q, k=k, v=v, g=g, beta=beta, state=state, cu_seqlens=cu_seqlens, slots=slots,
            has_initial_state=has_initial_state, scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
            chunk_states=chunk_states)
    from deltaserve.kernels.gated_delta_rule.fla_chunk import chunk_forward

    _check_state_pool(state)
    total = q.shape[0]
    if slots.shape[0] == 0 or total == 0:
        return v.new_zeros(v.shape)
    if use_qk_l2norm:
        q, k = l2norm_qk(q, k)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int64 else cu_seqlens.to(torch.int64)
    h0 = gather_states(state, slots, has_initial_state)
    o, final = chunk_forward(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=g.float().contiguous(),
                             beta=beta.contiguous(), scale=scale, initial_state=h0, cu_seqlens=cu,
                             chunk_indices=chunk_indices, chunk_size=chunk_size)
    scatter_states(final, state, slots)
    o = o.to(v.dtype)
    if not any_padding:
        return o
    keep = torch.repeat_interleave(slots >= 0, cu.diff(), output_size=total)
    return o.masked_fill_(~keep[:, None, None], 0)


# ---------------------------------------------------------------------------------------------------------------------
# Verify steps of speculative decoding: k decode steps per row; the commit replays the kept ones.
#
# Verify (``fused_gdn_multistep``) is the decode pair for T tokens per row: the conv kernel computes each token's
# window from the slot's stored window and the row's earlier inputs (the pool is only read, so nothing is rolled),
# writes the window after each token to conv_states_out[n, t] and the post-conv row to y_out[n, t]; the recurrence
# program loads its state tile once and runs the decode program's step per token (same device functions, the state
# rounded to the pool dtype between tokens as stored-and-reloaded decode steps round it), writing o and the token's
# (g, beta) to gates_out[n, t], but no state: which position's state to keep is known only after sampling, and a
# state per position would cost T state writes a row (27B: 147 MiB each over its 48 GDN layers). The commit
# (``replay_kept_states``) reruns the kept positions' steps from the slot's state, from y and the gates, and
# writes the state once.
#
# Each of the three kernels issues the loads of all its tokens before it stores anything: Triton does not move a load
# across a store, so a load placed after the previous token's stores waits for them, and the token loop becomes a
# chain of memory round trips. Hoisting them took one 35B-A3B layer's verify kernels at 16 rows from 60 to 28 us and
# the replay from 37 to 30 (H100, benchmarks/RESULTS.md 2026-12-07), the conv alone from 23 to 5 us.


@triton.jit
def _window_of(hist, xs, t: tl.constexpr, row, W: tl.constexpr, WP: tl.constexpr):
    """[WP, BC] raw conv window of token t (pool dtype) from the slot's stored rows `hist` (W - 1 vectors) and the
    row's inputs `xs` (T vectors): row j holds the input at position t - (W - 1) + j of the row (the stored row
    j + t for negative positions); rows >= W - 1 are zeros."""
    win = tl.zeros([WP, hist[0].shape[0]], hist[0].dtype)
    for j in tl.static_range(W - 1):
        # (indices written out: a name assigned in the loop would be a tensor, and tuples take constant indices)
        if t + j < W - 1:
            win = tl.where(row[:, None] == j, hist[t + j][None, :], win)
        else:
            win = tl.where(row[:, None] == j, xs[t + j - (W - 1)].to(hist[0].dtype)[None, :], win)
    return win


@triton.jit
def _multistep_conv_kernel(x_ptr, w_ptr, cs_ptr, slot_ptr, y_ptr, cso_ptr, C, stride_x, stride_yn, stride_yt,
                           stride_cs_s, stride_cs_w, stride_cso_n, stride_cso_t, stride_cso_w,
                           T: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr):
    """Conv + SiLU of row n's T tokens over BC channels, as T conv-update steps would compute them: token t's window
    is the slot's stored window followed by the row's inputs 0..t (raw inputs rounded to the pool dtype, as the
    rolled window holds them); its output goes to y[n, t], the window after it to conv_states_out[n, t]. The pool is
    only read."""
    n = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    m_ch = ch < C
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    cs_slot = cs_ptr + slot * stride_cs_s
    row = tl.arange(0, WP)
    m_row = row < W - 1
    w_hist = tl.load(w_ptr + ch[None, :] * W + row[:, None], mask=m_row[:, None] & m_ch[None, :], other=0.0)
    w_hist = w_hist.to(tl.float32)
    w_last = tl.load(w_ptr + ch * W + (W - 1), mask=m_ch, other=0.0).to(tl.float32)
    hist = ()  # every input first: the slot's W - 1 stored rows, then the row's T tokens
    for j in tl.static_range(W - 1):
        hist = hist + (tl.load(cs_slot + j * stride_cs_w + ch, mask=m_ch & valid, other=0.0),)
    xs = ()
    for t in tl.static_range(T):
        xs = xs + (tl.load(x_ptr + (n * T + t) * stride_x + ch, mask=m_ch & valid, other=0.0),)
    win = _window_of(hist, xs, 0, row, W, WP)
    for t in tl.static_range(T):
        acc = tl.sum(win.to(tl.float32) * w_hist, 0) + xs[t].to(tl.float32) * w_last
        y = acc * tl.sigmoid(acc)
        tl.store(y_ptr + n * stride_yn + t * stride_yt + ch, y.to(y_ptr.dtype.element_ty), mask=m_ch & valid)
        win = _window_of(hist, xs, t + 1, row, W, WP)
        tl.store(cso_ptr + n * stride_cso_n + t * stride_cso_t + row[:, None] * stride_cso_w + ch[None, :],
                 win.to(cso_ptr.dtype.element_ty), mask=valid & m_row[:, None] & m_ch[None, :])


@triton.jit
def _token_loads(y_row, h, hv, o_k, m_k, o_v, m_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """One token's raw (q, k, v) for value head hv (key head h) from its post-conv row y_row."""
    q = tl.load(y_row + h * K + o_k, mask=m_k, other=0.0)
    k = tl.load(y_row + H * K + h * K + o_k, mask=m_k, other=0.0)
    v = tl.load(y_row + 2 * H * K + hv * V + o_v, mask=m_v, other=0.0)
    return q, k, v


@triton.jit
def _qkv_of(q, k, v, scale, eps):
    """fp32 (q, k, v) from their loads: q and k L2-normalised, q scaled."""
    q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    return q * _inv_norm(q, eps) * scale, k * _inv_norm(k, eps), v


@triton.jit
def _inv_norm(x, eps):
    """1 / sqrt(sum(x^2) + eps) of an fp32 vector."""
    return tl.rsqrt(tl.sum(x * x, 0) + eps)


@triton.jit
def _multistep_recurrent_kernel(
    y_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, ss_ptr, slot_ptr, o_ptr, gates_ptr,
    stride_yn, stride_yt, stride_a, stride_b, stride_ss_s, stride_gn, stride_gt,
    scale, eps,
    T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
):
    """The decode recurrence for T tokens of row n: one program per (row n, value head hv, V tile) loads the state
    tile once, then per token runs exactly the decode program's step (the state rounded to the pool dtype between
    tokens, as a chain of decode steps stores and reloads it) and writes o; the V tile-0 program also writes the
    token's (g, beta) to gates[n, t] for the commit's replay. The pool is only read."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    n = (i_nh // HV).to(tl.int64)
    hv = i_nh % HV
    h = hv // (HV // H)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tile = hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    m_s = valid & m_k[:, None] & m_v[None, :]
    s = tl.load(ss_ptr + slot * stride_ss_s + tile, mask=m_s, other=0.0).to(tl.float32)
    # every token's inputs and the norms' factors before the first step (they do not depend on the state); the
    # vectors stay 16-bit until their step (all of them in fp32 spills at 2 or 4 warps)
    loads = ()
    for t in tl.static_range(T):
        loads = loads + (_multistep_loads(y_ptr, a_ptr, b_ptr, n, t, h, hv, o_k, m_k, o_v, m_v, stride_yn, stride_yt,
                                          stride_a, stride_b, T, H, K, V),)
    factors = ()
    for t in tl.static_range(T):
        q, k, v, a, b = loads[t]
        g, beta = _log_gates_of(a, b, alog_ptr, dtb_ptr, hv, y_ptr.dtype.element_ty)
        factors = factors + ((_inv_norm(q.to(tl.float32), eps), _inv_norm(k.to(tl.float32), eps), g, beta),)
    for t in tl.static_range(T):
        q, k, v, a, b = loads[t]
        rq, rk, g, beta = factors[t]  # q and k as _qkv_of normalises them (the same ops in the same order)
        s = _multistep_out(s, q.to(tl.float32) * rq * scale, k.to(tl.float32) * rk, v.to(tl.float32), g, beta, o_ptr,
                           gates_ptr, ss_ptr, n, t, hv, i_v, o_v, m_v, valid, stride_gn, stride_gt, T, HV, V)


@triton.jit
def _multistep_loads(y_ptr, a_ptr, b_ptr, n, t, h, hv, o_k, m_k, o_v, m_v, stride_yn, stride_yt, stride_a, stride_b,
                     T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Token t of row n: its raw (q, k, v, a, b) for value head hv."""
    tok = n * T + t
    q, k, v = _token_loads(y_ptr + n * stride_yn + t * stride_yt, h, hv, o_k, m_k, o_v, m_v, H, K, V)
    return q, k, v, tl.load(a_ptr + tok * stride_a + hv), tl.load(b_ptr + tok * stride_b + hv)


@triton.jit
def _multistep_out(s, q, k, v, g, beta, o_ptr, gates_ptr, ss_ptr, n, t, hv, i_v, o_v, m_v, valid, stride_gn,
                   stride_gt, T: tl.constexpr, HV: tl.constexpr, V: tl.constexpr):
    """Token t's step of the multistep recurrence: o and (g, beta) written, the state rounded to the pool dtype."""
    tok = n * T + t
    s, o = _step(s, q, k, v, tl.exp(g), beta)
    tl.store(o_ptr + (tok * HV + hv) * V + o_v, tl.where(valid, o, 0.0).to(o_ptr.dtype.element_ty), mask=m_v)
    gate_row = gates_ptr + n * stride_gn + t * stride_gt + hv
    tl.store(gate_row, g, mask=valid & (i_v == 0))
    tl.store(gate_row + HV, beta, mask=valid & (i_v == 0))
    return s.to(ss_ptr.dtype.element_ty).to(tl.float32)


def _check_multistep_outs(conv_states_out: torch.Tensor, y_out: torch.Tensor, gates_out: torch.Tensor, n: int,
                          k: int, conv_state: torch.Tensor, conv_dim: int, num_v_heads: int,
                          dtype: torch.dtype) -> None:
    if conv_states_out.shape != (n, k, *conv_state.shape[1:]) or conv_states_out.stride(3) != 1:
        raise ValueError(f"conv_states_out must be [{n}, {k}, {', '.join(map(str, conv_state.shape[1:]))}] with unit "
                         f"stride in channels, got {tuple(conv_states_out.shape)} strides {conv_states_out.stride()}")
    if y_out.shape != (n, k, conv_dim) or y_out.stride(2) != 1 or y_out.dtype != dtype:
        raise ValueError(f"y_out must be {dtype} [{n}, {k}, {conv_dim}] (mixed_qkv's dtype: y and beta round to it) "
                         f"with unit stride in channels, got {y_out.dtype} {tuple(y_out.shape)} strides {y_out.stride()}")
    if gates_out.shape != (n, k, 2, num_v_heads) or gates_out.dtype != torch.float32 or \
            gates_out.stride()[2:] != (num_v_heads, 1):
        raise ValueError(f"gates_out must be fp32 [{n}, {k}, 2, {num_v_heads}], contiguous per position, got "
                         f"{gates_out.dtype} {tuple(gates_out.shape)} strides {gates_out.stride()}")


def fused_gdn_multistep_launch(
    *, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    conv_weight: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor,
    tokens_per_row: int, num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int, scale: float,
    conv_states_out: torch.Tensor, y_out: torch.Tensor, gates_out: torch.Tensor, block_v: int, num_warps: int,
    block_c: int = 256,
) -> torch.Tensor:
    """The multistep with an explicit recurrence tiling (the tests and the benchmark sweep them)."""
    hk, hv, dk, dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    _check_decode_args(mixed_qkv, conv_weight, conv_state, ssm_state, hk, dk, hv, dv)
    n, k = slots.shape[0], tokens_per_row
    if mixed_qkv.shape[0] != n * k or a.shape[0] != n * k or b.shape[0] != n * k:
        raise ValueError(f"mixed_qkv, a and b need {n} rows x {k} tokens = {n * k} rows, got {mixed_qkv.shape[0]}, "
                         f"{a.shape[0]}, {b.shape[0]}")
    conv_dim = mixed_qkv.shape[1]
    _check_multistep_outs(conv_states_out, y_out, gates_out, n, k, conv_state, conv_dim, hv, mixed_qkv.dtype)
    mixed_qkv, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (mixed_qkv, a, b))
    o = mixed_qkv.new_empty(n * k, hv, dv)
    if n == 0 or k == 0:
        return o
    conv_weight = conv_weight.contiguous()
    width = conv_weight.shape[1]
    _multistep_conv_kernel[(n, triton.cdiv(conv_dim, block_c))](
        mixed_qkv, conv_weight, conv_state, slots, y_out, conv_states_out, conv_dim, mixed_qkv.stride(0),
        y_out.stride(0), y_out.stride(1), conv_state.stride(0), conv_state.stride(1), conv_states_out.stride(0),
        conv_states_out.stride(1), conv_states_out.stride(2), T=k, W=width, WP=triton.next_power_of_2(width),
        BC=block_c, num_warps=4)
    num_tiles = triton.cdiv(dv, block_v)
    _multistep_recurrent_kernel[(n * hv * num_tiles,)](
        y_out, a, b, A_log, dt_bias, ssm_state, slots, o, gates_out, y_out.stride(0), y_out.stride(1), a.stride(0),
        b.stride(0), ssm_state.stride(0), gates_out.stride(0), gates_out.stride(1), float(scale), _L2_EPS,
        T=k, H=hk, HV=hv, K=dk, V=dv, BK=triton.next_power_of_2(dk), BV=block_v, NV=num_tiles, num_warps=num_warps)
    return o


# (BV, num_warps) of the verify recurrence at every batch: one warp over 16 value columns, whose K reductions stay in
# the warp. Of 16/1, 32/2 and 64/4 it was the fastest at 35B-A3B's and 27B's heads at 1, 8, 16 and 32 rows (T = 4,
# H100, benchmarks/RESULTS.md 2026-12-07); 64/4, the decode step's tile past 256 (row, head) pairs, took 20-45% longer.
MULTISTEP_TILE = (16, 1)


def fused_gdn_multistep(
    *, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    conv_weight: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor,
    tokens_per_row: int, num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int, scale: float,
    conv_states_out: torch.Tensor, y_out: torch.Tensor, gates_out: torch.Tensor,
) -> torch.Tensor:
    """ref.fused_gdn_multistep on the GPU in two launches, CUDA-graph safe (no host sync), the recurrence tiled by
    MULTISTEP_TILE."""
    block_v, num_warps = MULTISTEP_TILE
    return fused_gdn_multistep_launch(
        mixed_qkv=mixed_qkv, a=a, b=b, A_log=A_log, dt_bias=dt_bias, conv_weight=conv_weight, conv_state=conv_state,
        ssm_state=ssm_state, slots=slots, tokens_per_row=tokens_per_row, num_k_heads=num_k_heads,
        head_k_dim=head_k_dim, num_v_heads=num_v_heads, head_v_dim=head_v_dim, scale=scale,
        conv_states_out=conv_states_out, y_out=y_out, gates_out=gates_out,
        block_v=min(block_v, triton.next_power_of_2(head_v_dim)), num_warps=num_warps)


# ---------------------------------------------------------------------------------------------------------------------
# Commit after a verify step: each row's kept state into its slot, for a whole stack of layers in one launch.


@triton.jit
def _install_kept_kernel(dst_ptr, src_ptr, slot_ptr, row_ptr, kept_ptr, N, stride_dl, stride_ds, stride_sl,
                         stride_sr, stride_sk, NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    """dst[l, slot[i]] = src[l, row[i], kept[i] - 1], rounded to dst's dtype, for chunk program_id(0) of BLOCK
    elements of one state (NUMEL contiguous elements) and program_id(1) = l * N + i: read once, written once."""
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    li = tl.program_id(1)
    layer = (li // N).to(tl.int64)
    i = li % N
    slot = tl.load(slot_ptr + i).to(tl.int64)
    row = tl.load(row_ptr + i).to(tl.int64)
    pos = tl.load(kept_ptr + i).to(tl.int64) - 1
    m = off < NUMEL
    val = tl.load(src_ptr + layer * stride_sl + row * stride_sr + pos * stride_sk + off, mask=m)
    tl.store(dst_ptr + layer * stride_dl + slot * stride_ds + off, val.to(dst_ptr.dtype.element_ty), mask=m)


_INSTALL_BLOCK = 4096  # elements per program: 16 KB of an fp32 state, 32 per thread at 4 warps
_MAX_GRID_Y = 65535


def _inner_contiguous(t: torch.Tensor, lead: int) -> bool:
    """Whether each t[i_0, ..., i_{lead-1}] is contiguous (the strides of the trailing dims are row-major)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[lead:]), reversed(t.stride()[lead:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def install_kept_states_launch(*, states: torch.Tensor, kept_states: torch.Tensor, slots: torch.Tensor,
                               rows: torch.Tensor, num_kept: torch.Tensor, block: int) -> None:
    """install_kept_states with an explicit chunk size (the tests use small ones to get several chunks)."""
    num_layers, n = states.shape[0], slots.shape[0]
    if (kept_states.dim() != states.dim() + 1 or kept_states.shape[0] != num_layers
            or kept_states.shape[3:] != states.shape[2:]):
        raise ValueError(f"kept_states must be [L, R, k, *state] for states [L, S, *state], got "
                         f"{tuple(kept_states.shape)} for {tuple(states.shape)}")
    if rows.shape != (n,) or num_kept.shape != (n,) or slots.dim() != 1:
        raise ValueError(f"slots, rows and num_kept must be [n], got {tuple(slots.shape)}, {tuple(rows.shape)}, "
                         f"{tuple(num_kept.shape)}")
    if not _inner_contiguous(states, 2) or not _inner_contiguous(kept_states, 3):
        raise ValueError(f"each state must be contiguous, got strides {states.stride()} and {kept_states.stride()}")
    numel = math.prod(states.shape[2:])
    if n == 0 or num_layers == 0 or numel == 0:
        return
    if num_layers * n > _MAX_GRID_Y:
        raise ValueError(f"{num_layers} layers x {n} rows exceed the grid ({_MAX_GRID_Y})")
    _install_kept_kernel[(triton.cdiv(numel, block), num_layers * n)](
        states, kept_states, slots, rows, num_kept, n, states.stride(0), states.stride(1), kept_states.stride(0),
        kept_states.stride(1), kept_states.stride(2), NUMEL=numel, BLOCK=block, num_warps=4)


def install_kept_states(*, states: torch.Tensor, kept_states: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                        num_kept: torch.Tensor) -> None:
    """ref.install_kept_states in one launch, each state read once and written once (the reference's gather +
    index_copy moves it twice), cast to the states' dtype in the kernel; no host sync, CUDA-graph safe (slots, rows
    and num_kept are read on the device)."""
    numel = math.prod(states.shape[2:])
    install_kept_states_launch(states=states, kept_states=kept_states, slots=slots, rows=rows, num_kept=num_kept,
                               block=min(_INSTALL_BLOCK, triton.next_power_of_2(max(numel, 1))))


@triton.jit
def _replay_kernel(ss_ptr, y_ptr, gates_ptr, slot_ptr, row_ptr, kept_ptr, stride_sl, stride_ss, stride_yl,
                   stride_yr, stride_yt, stride_gl, stride_gr, stride_gt, eps,
                   T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """states[l, slot[i]] advanced by the first kept[i] positions of verify row row[i], for program_id(1) = layer
    l and program_id(0) = (i, value head hv, V tile): the multistep recurrence program's steps on the same values
    (y and the stored gates), the state rounded to the pool dtype between positions, loaded once, stored once."""
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    i_v = pid % NV
    i_nh = pid // NV
    i = i_nh // HV
    hv = i_nh % HV
    h = hv // (HV // H)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    row = tl.load(row_ptr + i).to(tl.int64)
    kept = tl.load(kept_ptr + i)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_s = ss_ptr + layer * stride_sl + slot * stride_ss + hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    y_rows = y_ptr + layer * stride_yl + row * stride_yr
    gate_rows = gates_ptr + layer * stride_gl + row * stride_gr + hv
    # the next position's loads in flight during each step
    nxt = _replay_loads(y_rows, gate_rows, 0, kept, h, hv, o_k, m_k, o_v, m_v, stride_yt, stride_gt, H, HV, K, V)
    for t in tl.static_range(T):
        q, k, v, g, beta = nxt
        if t + 1 < T:
            nxt = _replay_loads(y_rows, gate_rows, t + 1, kept, h, hv, o_k, m_k, o_v, m_v, stride_yt, stride_gt,
                                H, HV, K, V)
        if t < kept:
            qf, kf, vf = _qkv_of(q, k, v, 1.0, eps)
            s, _ = _step(s, qf, kf, vf, tl.exp(g), beta)
            s = s.to(ss_ptr.dtype.element_ty).to(tl.float32)
    tl.store(p_s, s.to(ss_ptr.dtype.element_ty), mask=m_s)


@triton.jit
def _replay_loads(y_rows, gate_rows, t, kept, h, hv, o_k, m_k, o_v, m_v, stride_yt, stride_gt, H: tl.constexpr,
                  HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Position t's raw (q, k, v) and stored (g, beta) for value head hv; nothing loaded past the kept positions."""
    use = t < kept
    q, k, v = _token_loads(y_rows + t * stride_yt, h, hv, o_k, m_k & use, o_v, m_v & use, H, K, V)
    gate_row = gate_rows + t * stride_gt
    return q, k, v, tl.load(gate_row, mask=use, other=0.0), tl.load(gate_row + HV, mask=use, other=0.0)


def replay_kept_states(*, states: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor, slots: torch.Tensor,
                       rows: torch.Tensor, num_kept: torch.Tensor, num_k_heads: int, head_k_dim: int,
                       num_v_heads: int, head_v_dim: int) -> None:
    """ref.replay_kept_states in one launch over every layer, the recurrence tiled as decode_config tiles as many
    rows (the verify step's own tiling follows its padded row count, so the two may round the K reductions in another
    order: the last fp32 ulps, as decode steps at other batch sizes); no host sync, CUDA-graph safe (slots, rows and
    num_kept are read on the device)."""
    num_layers, n, k = states.shape[0], slots.shape[0], ys.shape[2]
    hk, hv, dk, dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    if hv % hk or states.dtype not in _STATE_DTYPES or states.shape[2:] != (hv, dk, dv) or \
            not _inner_contiguous(states, 2):
        raise ValueError(f"states must be float32 or bfloat16 [L, S, {hv}, {dk}, {dv}] with each state contiguous "
                         f"({hv} value heads over {hk} key heads), got {states.dtype} {tuple(states.shape)} strides "
                         f"{states.stride()}")
    conv_dim = 2 * hk * dk + hv * dv
    if ys.shape[0] != num_layers or ys.shape[3] != conv_dim or ys.stride(3) != 1 or gates.dtype != torch.float32 or \
            gates.shape[:3] != ys.shape[:3] or gates.shape[3:] != (2, hv) or gates.stride()[3:] != (hv, 1):
        raise ValueError(f"ys must be [L, R, k, {conv_dim}] and gates float32 [L, R, k, 2, {hv}] with the states' L, "
                         f"got {tuple(ys.shape)} and {gates.dtype} {tuple(gates.shape)}")
    if rows.shape != (n,) or num_kept.shape != (n,) or slots.dim() != 1:
        raise ValueError(f"slots, rows and num_kept must be [n], got {tuple(slots.shape)}, {tuple(rows.shape)}, "
                         f"{tuple(num_kept.shape)}")
    if n == 0 or num_layers == 0:
        return
    if num_layers > _MAX_GRID_Y:
        raise ValueError(f"{num_layers} layers exceed the grid ({_MAX_GRID_Y})")
    block_v, num_warps = decode_config(n, hv)
    block_v = min(block_v, triton.next_power_of_2(dv))
    num_tiles = triton.cdiv(dv, block_v)
    _replay_kernel[(n * hv * num_tiles, num_layers)](
        states, ys, gates, slots, rows, num_kept, states.stride(0), states.stride(1), ys.stride(0), ys.stride(1),
        ys.stride(2), gates.stride(0), gates.stride(1), gates.stride(2), _L2_EPS, T=k, H=hk, HV=hv, K=dk, V=dv,
        BK=triton.next_power_of_2(dk), BV=block_v, NV=num_tiles, num_warps=num_warps)
