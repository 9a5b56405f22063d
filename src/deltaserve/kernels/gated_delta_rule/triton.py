"""GPU gated delta rule: a fused single-token decode kernel (Triton) and chunked prefill through fla-core.

Same contracts as ``ref.py``. The recurrent state pool [S, HV, K, V] fp32 is read and written in place through the
slot indices; slot < 0 is padding (output rows written as zeros, no state touched).

Decode (``fused_gdn_decode``) is one launch per layer, in one of two tilings of the same per-tile step:
load the fp32 state tile S[slot, hv, :, tile] ([K, BV], the bulk of the bytes) first so it is in flight while the
rest is computed; depthwise conv + SiLU of the token for the q/k channels of key head h = hv // (HV/H) and the tile's
v channels, rounded to the activation dtype as the unfused layer does; g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b); L2-normalise q and k, scale q; one delta-rule step; write o and the tile back.

- packed (large batches): one program per (row n, key head h) owns the q/k conv window and every state tile of its
  HV/H value heads, streamed tile by tile with the next tile's load issued before the current one is processed.
  No program shares anything with another, and the q/k conv is computed once per key head.
- split (small batches, where packed would leave SMs idle): one program per (row n, value head hv, V tile).
  The q/k window of (n, h) is read by all (HV/H) * (V/BV) programs of (n, h); each arrives on an atomic counter once
  its reads are done (release), and the last to arrive resets the counter (acquire) and rolls the q/k window. The
  counters live in a persistent zeroed workspace (one int32 per (n, h)), zero again after every launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels.conv1d.triton import conv_silu_window, roll_window

_L2_EPS = 1e-6


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (threshold 20); exp(x) where 1 + exp(x) would round to 1
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _qk(x_row, w_ptr, cs_slot, stride_cs_w, h, valid, scale, eps,
        H: tl.constexpr, K: tl.constexpr, W: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr):
    """Post-conv q (L2-normalised, scaled) and k (L2-normalised) of key head h, fp32 [BK]."""
    act = x_row.dtype.element_ty
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    q = conv_silu_window(x_row, w_ptr, cs_slot, stride_cs_w, h * K + o_k, m_k, valid, W, WP).to(act).to(tl.float32)
    k = conv_silu_window(x_row, w_ptr, cs_slot, stride_cs_w, H * K + h * K + o_k, m_k, valid, W, WP)
    k = k.to(act).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + eps) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + eps)
    return q, k


@triton.jit
def _gates(a_row, b_row, alog_ptr, dtb_ptr, hv, act: tl.constexpr):
    """(decay = exp(g), beta) of value head hv, fp32 scalars; beta rounded to the activation dtype."""
    a = tl.load(a_row + hv).to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * _softplus(a + tl.load(dtb_ptr + hv).to(tl.float32))
    beta = tl.sigmoid(tl.load(b_row + hv).to(tl.float32)).to(act).to(tl.float32)
    return tl.exp(g), beta


@triton.jit
def _step(s, q, k, v, decay, beta):
    """One delta-rule step on a [K, BV] tile: returns (new tile, o [BV])."""
    s = s * decay
    delta = beta * (v - tl.sum(s * k[:, None], 0))
    s = s + k[:, None] * delta[None, :]
    return s, tl.sum(s * q[:, None], 0)


@triton.jit
def _decode_split_kernel(
    x_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, w_ptr, cs_ptr, ss_ptr, slot_ptr, o_ptr, cnt_ptr,
    stride_x, stride_a, stride_b, stride_cs_s, stride_cs_w, stride_ss_s,
    scale, eps,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, WP: tl.constexpr,
):
    pid = tl.program_id(0)
    i_v = pid % NV
    i_nh = pid // NV
    n = i_nh // HV
    hv = i_nh % HV
    h = hv // (HV // H)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_s = ss_ptr + slot * stride_ss_s + hv * (K * V) + o_k[:, None] * V + o_v[None, :]
    m_s = valid & (o_k[:, None] < K) & m_v[None, :]
    s = tl.load(p_s, mask=m_s, other=0.0)

    act = x_ptr.dtype.element_ty
    x_row = x_ptr + n * stride_x
    cs_slot = cs_ptr + slot * stride_cs_s
    ch_v = 2 * H * K + hv * V + o_v
    q, k = _qk(x_row, w_ptr, cs_slot, stride_cs_w, h, valid, scale, eps, H, K, W, BK, WP)
    v = conv_silu_window(x_row, w_ptr, cs_slot, stride_cs_w, ch_v, m_v, valid, W, WP).to(act).to(tl.float32)
    decay, beta = _gates(a_ptr + n * stride_a, b_ptr + n * stride_b, alog_ptr, dtb_ptr, hv, act)
    s, o = _step(s, q, k, v, decay, beta)

    # All of this CTA's reads of the q/k window are consumed (barrier) and no store is pending yet, so the release
    # costs no store drain; the result is only needed at the end.
    tl.debug_barrier()
    p_cnt = cnt_ptr + n * H + h
    arrived = tl.atomic_add(p_cnt, 1, mask=valid, sem="release")
    tl.store(o_ptr + i_nh * V + o_v, tl.where(valid, o, 0.0).to(o_ptr.dtype.element_ty), mask=m_v)
    tl.store(p_s, s, mask=m_s)
    roll_window(x_row, cs_slot, stride_cs_w, ch_v, m_v, valid, W, WP)
    last = valid & (arrived == (HV // H) * NV - 1)
    tl.atomic_xchg(p_cnt, 0, mask=last, sem="acquire")  # reset; orders the roll after every other reader's release
    roll_window(x_row, cs_slot, stride_cs_w, h * K + o_k, o_k < K, last, W, WP)
    roll_window(x_row, cs_slot, stride_cs_w, H * K + h * K + o_k, o_k < K, last, W, WP)


@triton.jit
def _packed_tile(s, i, ss_slot, x_row, a_row, b_row, alog_ptr, dtb_ptr, w_ptr, cs_slot, stride_cs_w, o_ptr, n, h,
                 valid, q, k, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, WP: tl.constexpr):
    """Tile i (value head h*G + i // NV, V tile i % NV) of key head h, its state tile s already loaded: conv of the
    tile's v channels, gates, one step, then o, the state tile and the v window written back."""
    G: tl.constexpr = HV // H
    act = x_row.dtype.element_ty
    o_k = tl.arange(0, BK)
    o_v = (i % NV) * BV + tl.arange(0, BV)
    m_v = o_v < V
    hv = h * G + i // NV
    ch_v = 2 * H * K + hv * V + o_v
    v = conv_silu_window(x_row, w_ptr, cs_slot, stride_cs_w, ch_v, m_v, valid, W, WP).to(act).to(tl.float32)
    decay, beta = _gates(a_row, b_row, alog_ptr, dtb_ptr, hv, act)
    s, o = _step(s, q, k, v, decay, beta)
    tl.store(o_ptr + (n * HV + hv) * V + o_v, tl.where(valid, o, 0.0).to(o_ptr.dtype.element_ty), mask=m_v)
    tl.store(ss_slot + (i // NV) * (K * V) + o_k[:, None] * V + o_v[None, :], s,
             mask=valid & (o_k[:, None] < K) & m_v[None, :])
    roll_window(x_row, cs_slot, stride_cs_w, ch_v, m_v, valid, W, WP)


@triton.jit
def _state_tile(ss_slot, i, valid, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                NV: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = (i % NV) * BV + tl.arange(0, BV)
    return tl.load(ss_slot + (i // NV) * (K * V) + o_k[:, None] * V + o_v[None, :],
                   mask=valid & (o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)


@triton.jit
def _decode_packed_kernel(
    x_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, w_ptr, cs_ptr, ss_ptr, slot_ptr, o_ptr,
    stride_x, stride_a, stride_b, stride_cs_s, stride_cs_w, stride_ss_s,
    scale, eps,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, WP: tl.constexpr, STAGES: tl.constexpr,
):
    G: tl.constexpr = HV // H
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    ss_slot = ss_ptr + slot * stride_ss_s + (h * G) * (K * V)  # this key head's G value heads are contiguous
    x_row = x_ptr + n * stride_x
    a_row = a_ptr + n * stride_a
    b_row = b_ptr + n * stride_b
    cs_slot = cs_ptr + slot * stride_cs_s
    o_k = tl.arange(0, BK)
    if STAGES == 0:
        # Unrolled over the G * NV tiles of this key head (head-major, then V tiles), one tile load ahead in
        # registers; the first load is issued before the q/k conv so it is in flight meanwhile.
        s_next = _state_tile(ss_slot, 0, valid, K, V, BK, BV, NV)
        q, k = _qk(x_row, w_ptr, cs_slot, stride_cs_w, h, valid, scale, eps, H, K, W, BK, WP)
        roll_window(x_row, cs_slot, stride_cs_w, h * K + o_k, o_k < K, valid, W, WP)
        roll_window(x_row, cs_slot, stride_cs_w, H * K + h * K + o_k, o_k < K, valid, W, WP)
        for i in tl.static_range(G * NV):
            s = s_next
            if i + 1 < G * NV:
                s_next = _state_tile(ss_slot, i + 1, valid, K, V, BK, BV, NV)
            _packed_tile(s, i, ss_slot, x_row, a_row, b_row, alog_ptr, dtb_ptr, w_ptr, cs_slot, stride_cs_w, o_ptr,
                         n, h, valid, q, k, H, HV, K, V, W, BK, BV, NV, WP)
    else:
        # Software-pipelined loop: Triton issues the state loads STAGES - 1 tiles ahead as asynchronous copies into
        # shared memory, so more bytes are in flight per SM than registers allow.
        q, k = _qk(x_row, w_ptr, cs_slot, stride_cs_w, h, valid, scale, eps, H, K, W, BK, WP)
        roll_window(x_row, cs_slot, stride_cs_w, h * K + o_k, o_k < K, valid, W, WP)
        roll_window(x_row, cs_slot, stride_cs_w, H * K + h * K + o_k, o_k < K, valid, W, WP)
        for i in tl.range(0, G * NV, num_stages=STAGES):
            s = _state_tile(ss_slot, i, valid, K, V, BK, BV, NV)
            _packed_tile(s, i, ss_slot, x_row, a_row, b_row, alog_ptr, dtb_ptr, w_ptr, cs_slot, stride_cs_w, o_ptr,
                         n, h, valid, q, k, H, HV, K, V, W, BK, BV, NV, WP)


# Arrival counters of the split decode kernel, per device; zero between launches.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, needed: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fused_gdn_decode needs {needed} arrival counters but has {0 if buf is None else buf.numel()}; run it "
                "once eagerly at the largest captured batch size before CUDA graph capture")
        buf = torch.zeros(max(needed, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def decode_config(num_rows: int, num_k_heads: int, num_v_heads: int,
                  head_v_dim: int) -> tuple[bool, int, int, int]:
    """(packed, BV, num_warps, stages) for the decode kernel (stages 0: the packed loop unrolled, one tile ahead).

    From benchmarks/bench_gdn.py --sweep on an H100 (2026-11-27, 27B and 35B-A3B shapes, CUDA graph): split BV=16
    with 1 warp is best at batch 1 (7.3-7.7 us); packed BV=32 with 4 warps is best at batch 16 (5% ahead of split)
    and ties split BV=16 at batch 64. Packed with 2 warps or BV=128 falls off a cliff (register spills).
    H200 sweep (2026-11-27, third session): the pipelined packed loop (stages 2; 3 and 4 time the same) is 7% faster
    than the unrolled one at batch 64 (27B 161 vs 172 us) and 7% at batch 16 (35B-A3B)."""
    if num_rows * num_k_heads >= 256:
        return True, min(32, triton.next_power_of_2(head_v_dim)), 4, 2
    return False, min(16, triton.next_power_of_2(head_v_dim)), 1, 0


def fused_gdn_decode_launch(
    *, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
    conv_weight: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor,
    num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int, scale: float,
    packed: bool, block_v: int, num_warps: int, stages: int = 0,
) -> torch.Tensor:
    """fused_gdn_decode with an explicit tiling (the tests and the benchmark sweep them). `stages` (packed only):
    0 unrolls the tile loop with one tile load ahead in registers; >= 2 lets Triton pipeline it that deep."""
    n, conv_dim = mixed_qkv.shape
    hk, hv, dk, dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    width = conv_weight.shape[1]
    if conv_dim != 2 * hk * dk + hv * dv or hv % hk:
        raise ValueError(f"mixed_qkv has {conv_dim} channels, expected 2*H*K + HV*V = {2 * hk * dk + hv * dv} "
                         f"with HV % H == 0 (H={hk}, K={dk}, HV={hv}, V={dv})")
    if ssm_state.dtype != torch.float32 or ssm_state.shape[1:] != (hv, dk, dv) or \
            ssm_state.stride()[1:] != (dk * dv, dv, 1):
        raise ValueError(f"ssm_state must be an fp32 pool [S, {hv}, {dk}, {dv}] contiguous per slot, got "
                         f"{ssm_state.dtype} {tuple(ssm_state.shape)} strides {ssm_state.stride()}")
    if conv_state.shape[1:] != (width - 1, conv_dim) or conv_state.stride(2) != 1:
        raise ValueError(f"conv_state must be [S, {width - 1}, {conv_dim}] contiguous in channels, got "
                         f"{tuple(conv_state.shape)} strides {conv_state.stride()}")
    # Rows may be strided (column slices of the merged input projection); only the last dim must be unit-stride.
    mixed_qkv, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (mixed_qkv, a, b))
    conv_weight = conv_weight.contiguous()
    o = mixed_qkv.new_empty(n, hv, dv)
    if n == 0:
        return o
    num_tiles = triton.cdiv(dv, block_v)
    common = (mixed_qkv.stride(0), a.stride(0), b.stride(0), conv_state.stride(0), conv_state.stride(1),
              ssm_state.stride(0), float(scale), _L2_EPS)
    meta = {"H": hk, "HV": hv, "K": dk, "V": dv, "W": width, "BK": triton.next_power_of_2(dk), "BV": block_v,
            "NV": num_tiles, "WP": triton.next_power_of_2(width - 1), "num_warps": num_warps}
    if packed:
        _decode_packed_kernel[(n * hk,)](
            mixed_qkv, a, b, A_log, dt_bias, conv_weight, conv_state, ssm_state, slots, o, *common, STAGES=stages,
            **meta)
    elif stages:
        raise ValueError("stages applies to the packed tiling only")
    else:
        _decode_split_kernel[(n * hv * num_tiles,)](
            mixed_qkv, a, b, A_log, dt_bias, conv_weight, conv_state, ssm_state, slots, o,
            _counters(mixed_qkv.device, n * hk), *common, **meta)
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
    """One decode step of a GDN layer's core for N single-token rows, one kernel launch (see the module docstring).

    mixed_qkv: [N, conv_dim = 2*H*K + HV*V] pre-conv; a, b: [N, HV]; A_log, dt_bias: [HV]; conv_weight: [conv_dim, W];
    conv_state: [S, W-1, conv_dim]; ssm_state: [S, HV, K, V] fp32; slots: [N] int64 (< 0: skip).
    Returns o: [N, HV, V] in mixed_qkv.dtype. CUDA-graph safe once run eagerly at the largest captured N."""
    packed, block_v, num_warps, stages = decode_config(mixed_qkv.shape[0], num_k_heads, num_v_heads, head_v_dim)
    return fused_gdn_decode_launch(
        mixed_qkv=mixed_qkv, a=a, b=b, A_log=A_log, dt_bias=dt_bias, conv_weight=conv_weight, conv_state=conv_state,
        ssm_state=ssm_state, slots=slots, num_k_heads=num_k_heads, head_k_dim=head_k_dim, num_v_heads=num_v_heads,
        head_v_dim=head_v_dim, scale=scale, packed=packed, block_v=block_v, num_warps=num_warps, stages=stages,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Prefill: fla-core's chunk kernel over sequence-ordered states, with a gather from and a scatter to the slot pool.


@triton.jit
def _gather_states_kernel(pool_ptr, out_ptr, slot_ptr, init_ptr, stride_pool, NUMEL: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[n] = pool[slot[n]] if slot[n] >= 0 and init[n] else zeros."""
    n = tl.program_id(0)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = off < NUMEL
    slot = tl.load(slot_ptr + n).to(tl.int64)
    keep = (slot >= 0) & (tl.load(init_ptr + n) != 0)
    val = tl.load(pool_ptr + slot * stride_pool + off, mask=m & keep, other=0.0)
    tl.store(out_ptr + n.to(tl.int64) * NUMEL + off, val, mask=m)


@triton.jit
def _scatter_states_kernel(src_ptr, pool_ptr, slot_ptr, stride_pool, NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    """pool[slot[n]] = src[n] where slot[n] >= 0."""
    n = tl.program_id(0)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    m = (off < NUMEL) & (slot >= 0)
    val = tl.load(src_ptr + n.to(tl.int64) * NUMEL + off, mask=m)
    tl.store(pool_ptr + slot * stride_pool + off, val, mask=m)


_COPY_BLOCK = 2048


def gather_states(state: torch.Tensor, slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    """[S, ...] pool -> [N, ...] fp32: each row's slot state, zeros where slot < 0 or not has_initial_state."""
    numel = state[0].numel()
    out = state.new_empty(slots.shape[0], *state.shape[1:])
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
    if state.dtype != torch.float32 or not state[0].is_contiguous():
        raise ValueError(f"state must be an fp32 pool [S, HV, K, V] contiguous per slot, got {state.dtype} "
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


# Chunk metadata of the last step's cu_seqlens: (the caller's tensor, its version, int64 copy, chunk indices).
_CHUNK_META: list[tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor]] = []


def _chunk_meta(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 cu_seqlens, fla's [num_chunks, 2] chunk indices), built once per step and shared by every GDN layer.
    From the host copy when the caller has one: building them from the device tensor costs a host sync."""
    if _CHUNK_META:
        tensor, version, size, cu, indices = _CHUNK_META[0]
        if tensor is cu_seqlens and version == cu_seqlens._version and size == chunk_size:
            return cu, indices
    from fla.ops.utils.index import prepare_chunk_indices

    cu = cu_seqlens.to(torch.int64)
    if cu_seqlens_cpu is None:
        indices = prepare_chunk_indices(cu, chunk_size)
    else:  # built on the host, sent from pinned memory without blocking (a pageable copy would wait for the GPU)
        host = cu_seqlens_cpu.to(torch.int64)
        indices = prepare_chunk_indices(host, chunk_size, cu_seqlens_cpu=host).pin_memory()
        indices = indices.to(cu.device, non_blocking=True)
    _CHUNK_META[:] = [(cu_seqlens, cu_seqlens._version, chunk_size, cu, indices)]
    return cu, indices


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
    cu_seqlens_cpu: torch.Tensor | None = None,
    any_padding: bool = True,
) -> torch.Tensor:
    """Prefill over N sequences packed flat through fla-core's chunk forward; reads and writes their states in place.

    q, k: [T, H, K] (may be strided views of the conv output); v: [T, HV, V]; g: [T, HV] fp32 log-decay;
    beta: [T, HV]; state: [S, HV, K, V] fp32; cu_seqlens: [N+1] int32; slots: [N] int64 (< 0: skip, rows stay zero,
    no state write); has_initial_state: [N] bool. Returns o: [T, HV, V] in v.dtype. Calls fla's forward function
    directly (no autograd Function, no input copies beyond v's); with cu_seqlens_cpu given it syncs nothing.
    any_padding=False: the caller guarantees every slot is >= 0, so the zeroing pass over the output is skipped."""
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd  # optional dependency, GPU only

    _check_state_pool(state)
    total = q.shape[0]
    if slots.shape[0] == 0 or total == 0:
        return v.new_zeros(v.shape)
    if use_qk_l2norm:
        q, k = l2norm_qk(q, k)
    cu, chunk_indices = _chunk_meta(cu_seqlens, cu_seqlens_cpu, chunk_size)
    h0 = gather_states(state, slots, has_initial_state)
    _, o, _, final, _, _ = chunk_gated_delta_rule_fwd(
        q=q.contiguous()[None], k=k.contiguous()[None], v=v.contiguous()[None], g=g.float().contiguous()[None],
        beta=beta.contiguous()[None], scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu,
        chunk_indices=chunk_indices, chunk_size=chunk_size)
    scatter_states(final, state, slots)
    o = o[0].to(v.dtype)
    if not any_padding:
        return o
    keep = torch.repeat_interleave(slots >= 0, cu.diff(), output_size=total)
    return o.masked_fill_(~keep[:, None, None], 0)
