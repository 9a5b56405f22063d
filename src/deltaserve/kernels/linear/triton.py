"""Triton linear for decode: x [M <= 64, K] @ W [N, K]^T reads the whole weight for a handful of rows, so it is a
weight stream. Programs tile the output columns by BN and, for outputs too narrow to fill the SMs that way, K by
SPLIT (split-K), so every SM streams its own slab of W through a software-pipelined loop (loads STAGES - 1 tiles
ahead). `tile_config` says where it beats torch's GEMM (gpu.py routes every call by it).

Split-K runs in the same launch: each program writes its fp32 partial [M, BN] to a workspace, then bumps its column
block's counter (acq_rel); the program that arrives last adds the SPLIT partials in split order (so the result does
not depend on which program finished last: deterministic), writes the output and sets the counter back to 0, so
the next call, and every CUDA-graph replay, starts clean. No program ever waits on another (no spin), so any
schedule completes. The workspace and counters are one pair per device, shared by every call: calls must not run
concurrently on two streams (the engine runs the model on one stream; stream order serialises the calls).

`_norm_skinny_linear_kernel` is the same main loop with a decoder layer's input RMSNorm folded in (NormPrologue,
docs/KERNELS.md "The input norm folded into the in-projection"); `norm_fold_tile` picks its tiles."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deltaserve.config import env_flag
from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release

log = logging.getLogger(__name__)

MAX_ROWS = 64  # above this the call is no longer a weight stream: torch's GEMM


class Tile(NamedTuple):
    """A launch configuration: BN output columns and BK reduction columns per tile, warps, pipeline depth, and the
    number of K ranges (split-K; 1: each program reduces all of K)."""
    bn: int
    bk: int
    num_warps: int
    stages: int
    split: int = 1

    def __str__(self) -> str:
        return f"{self.bn}x{self.bk} w{self.num_warps} s{self.stages}" + (f" k{self.split}" if self.split > 1 else "")


@triton.jit
def _x_tile(x_ptrs, r_ptrs, g_ptrs, rk, k, K, m_m, rstd, EVEN_K: tl.constexpr, NORM: tl.constexpr,
            RESIDUAL: tl.constexpr):
    """The [BM, BK] input tile at column k: x itself, or with NORM the norm kernel's output for it,
    bf16(round(x + residual) * rstd * (1 + g)), in the same fp32 operation order (kernels/norm/triton.py)."""
    if EVEN_K:
        mask = m_m[:, None]
    else:
        mask = m_m[:, None] & (rk + k < K)[None, :]
    x = tl.load(x_ptrs + k, mask=mask, other=0.0)
    if NORM:
        x = _residual_sum(x, r_ptrs + k, mask, RESIDUAL)
        g = tl.load(g_ptrs + k, mask=rk + k < K, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * rstd[:, None] * (1.0 + g)[None, :]).to(x.dtype)
    return x


@triton.jit
def _residual_sum(x, r_ptrs, mask, RESIDUAL: tl.constexpr):
    """x + residual summed in fp32 and rounded to x's dtype, as the norm kernel (and the model) adds them."""
    if RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _row_rstd(x_ptr, r_ptr, h_ptr, M, K, stride_xm, stride_rm, stride_hm, eps, write_h,
              BM: tl.constexpr, RB: tl.constexpr, CK: tl.constexpr, RESIDUAL: tl.constexpr):
    """The RMSNorm prologue: fp32 1 / rms of rows 0 .. M-1 (M <= RB) of round(x + residual) over all K columns, as
    a [BM] vector (row i at i). Every program reads the whole rows (a few KB, from L2); the one with write_h also
    stores the rounded sums to h, the next residual stream. RB x CK tiles: CK is wide at few rows, so that one or
    two dependent loads cover K (a row of 4096 in one step at M = 1)."""
    rows = tl.arange(0, RB)
    cols = tl.arange(0, CK)
    m_r = rows < M
    sq = tl.zeros([RB, CK], dtype=tl.float32)
    for k in range(0, K, CK):
        mask = m_r[:, None] & (cols + k < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + (cols + k)[None, :], mask=mask, other=0.0)
        v = _residual_sum(v, r_ptr + rows[:, None] * stride_rm + (cols + k)[None, :], mask, RESIDUAL)
        if RESIDUAL:
            tl.store(h_ptr + rows[:, None] * stride_hm + (cols + k)[None, :], v, mask=mask & write_h)
        v = v.to(tl.float32)
        sq += v * v
    rstd = tl.rsqrt(tl.sum(sq, 1) / K + eps)
    # [RB] -> [BM], row i at i % RB: rows M .. BM-1 are masked to 0 in the main loop, so their repeats do not matter
    return tl.reshape(tl.broadcast_to(rstd[None, :], (BM // RB, RB)), (BM,))


@triton.jit
def _stream_weights(x_ptr, r_ptr, g_ptr, w_ptr, rstd, M, N, K, K_SPLIT, stride_xm, stride_rm, pid_n, pid_k,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """The main loop: this program's [BM, BN] fp32 partial over K columns [pid_k * K_SPLIT, min(K, (pid_k + 1) *
    K_SPLIT))."""
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_m = rm < M
    m_n = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    r_ptrs = r_ptr + rm[:, None] * stride_rm + rk[None, :]
    g_ptrs = g_ptr + rk
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT  # K_SPLIT is a multiple of BK: only the last range can end in a partial tile
    for k in tl.range(k_lo, tl.minimum(K, k_lo + K_SPLIT), BK, num_stages=STAGES):
        x = _x_tile(x_ptrs, r_ptrs, g_ptrs, rk, k, K, m_m, rstd, EVEN_K, NORM, RESIDUAL)
        if EVEN_K:
            w = tl.load(w_ptrs + k, mask=m_n[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs + k, mask=m_n[:, None] & (rk + k < K)[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bits (docs/KERNELS.md, "Testing Triton kernels on CPU")
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _write_output(acc, y_ptr, ws_ptr, count_ptr, M, N, stride_ym, pid_n, pid_k, BM: tl.constexpr, BN: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Store the partial (SPLIT 1), or hand it to the split-K reduction (the module docstring)."""
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    m_y = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_y)
    else:
        # workspace [SPLIT, BM, N] fp32: strides from constexprs and N, never from M (which would recompile per M)
        ws_ptrs = ws_ptr + (rm[:, None] * N + rn[None, :])
        tl.store(ws_ptrs + pid_k * BM * N, acc, mask=m_y)
        tl.debug_barrier()  # every thread's partial is stored before thread 0's release below publishes them
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last of this column block's programs: the others' partials are visible
            total = tl.zeros([BM, BN], dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # fixed order, whichever program got here
                total += tl.load(ws_ptrs + s * BM * N, mask=m_y, other=0.0, cache_modifier=".cg")  # L2, not a stale L1
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=m_y)
            tl.store(count_ptr + pid_n, 0)  # every program of the block has arrived: nobody else touches it now


@triton.jit(do_not_specialize=["M"])  # the row count changes every step: one compiled kernel per row bucket
def _skinny_linear_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, K_SPLIT, stride_xm, stride_ym,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                          SPLIT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                          PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # PDL: wait for the previous kernel (x is its output) before any load. Loading the first W tile before the
    # wait (a peeled first step) held 168 registers instead of 96 and lost on the H200: 9B batch 1 0.97x, 35B-A3B
    # 1.07x against 1.00x / 1.09x waiting first (RESULTS.md, 2026-12-04).
    wait_then_release(PDL)
    acc = _stream_weights(x_ptr, x_ptr, x_ptr, w_ptr, 0.0, M, N, K, K_SPLIT, stride_xm, 0, pid_n, pid_k,
                          BM, BN, BK, STAGES, EVEN_K, UPCAST, False, False)
    _write_output(acc, y_ptr, ws_ptr, count_ptr, M, N, stride_ym, pid_n, pid_k, BM, BN, SPLIT)


@triton.jit(do_not_specialize=["M"])
def _norm_skinny_linear_kernel(x_ptr, r_ptr, g_ptr, h_ptr, w_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, K_SPLIT,
                               stride_xm, stride_rm, stride_hm, stride_ym, eps,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                               SPLIT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                               RESIDUAL: tl.constexpr, RB: tl.constexpr, CK: tl.constexpr,
                               PDL: tl.constexpr = False):
    """The skinny linear of rms_norm(x + residual) with weight (1 + g): the layer's input norm folded in (no
    separate norm launch). Program (0, 0) writes h = x + residual, the next residual stream."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    wait_then_release(PDL)  # x and the residual are the previous kernels' outputs
    rstd = _row_rstd(x_ptr, r_ptr, h_ptr, M, K, stride_xm, stride_rm, stride_hm, eps, (pid_n == 0) & (pid_k == 0),
                     BM, RB, CK, RESIDUAL)
    acc = _stream_weights(x_ptr, r_ptr, g_ptr, w_ptr, rstd, M, N, K, K_SPLIT, stride_xm, stride_rm, pid_n, pid_k,
                          BM, BN, BK, STAGES, EVEN_K, UPCAST, True, RESIDUAL)
    _write_output(acc, y_ptr, ws_ptr, count_ptr, M, N, stride_ym, pid_n, pid_k, BM, BN, SPLIT)


# split-K: rows <= 16, 256 <= N <= 8192 output columns and K >= 2048
SPLIT_ROWS, SPLIT_MIN_N, SPLIT_MAX_N, SPLIT_MIN_K = 16, 256, 8192, 2048
SPLIT_PROGRAMS_PER_SM = 2  # aim at about this many programs per SM
SPLIT_MIN_BYTES = 32 << 10  # of weight per program, so each still pipelines a few tiles


def split_for(out_features: int, in_features: int, bn: int, bk: int, num_sms: int) -> int:
    """K ranges for a grid of about SPLIT_PROGRAMS_PER_SM programs per SM (rounded to the nearest: 128 column
    blocks on 132 SMs take 2, not 3), each streaming at least SPLIT_MIN_BYTES of bf16 weight and a whole number of
    BK tiles, none of them empty."""
    blocks, k_tiles = triton.cdiv(out_features, bn), triton.cdiv(in_features, bk)
    want = round(SPLIT_PROGRAMS_PER_SM * num_sms / blocks)
    split = max(1, min(want, bn * in_features * 2 // SPLIT_MIN_BYTES, k_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def tile_config(rows: int, out_features: int, in_features: int, num_sms: int = 132) -> Tile | None:
    """The Tile for an [rows, in] x [out, in]^T call, or None where torch's GEMM is as fast.

    The rule, from the sweep in benchmarks/RESULTS.md (2026-11-27, H100, `bench_linear.py --sweep`, 9B, 27B and
    35B-A3B decode projections): up to 16 rows, 64 x 256 tiles beat cuBLAS on most projections with K >= 4096; at
    up to 64 rows only vocab-sized outputs win (128 x 128 tiles), since each program re-reads all of x. Narrow
    outputs (256 to 8192 columns: out_proj / o_proj / MLP down, the MoE router) with K >= 2048 split K (`split_for`)
    so that the grid fills the SMs; wider ones with K >= 4096 have enough column blocks without it; wider ones with
    K = 2048 stay with torch (the pipeline never fills) unless the output is vocab-sized. The split-K part (two
    programs per SM, at least 32 KB each, BN 32, 16 below 1024 columns) is a first estimate, not yet swept: the
    k1 / k2 / k4 / k8 columns of bench_linear.py time its alternatives."""
    if rows <= 16 and out_features >= 1 << 16:
        return Tile(64, 256, 4, 4)
    if rows <= SPLIT_ROWS and SPLIT_MIN_N <= out_features <= SPLIT_MAX_N and in_features >= SPLIT_MIN_K:
        bn = 32 if out_features >= 1024 else 16
        return Tile(bn, 256, 4, 4, split_for(out_features, in_features, bn, 256, num_sms))
    if rows <= 16 and in_features >= 4096:
        bn = 64 if triton.cdiv(out_features, 64) >= num_sms // 2 else 32
        return Tile(bn, 256, 4, 4) if triton.cdiv(out_features, bn) >= num_sms // 2 else None
    if rows <= MAX_ROWS and out_features >= 1 << 16:
        return Tile(128, 128, 8, 3)
    return None


# The folded input norm (NormPrologue) runs at up to FOLD_MAX_ROWS rows, with tile_config's tile, or where that
# leaves a wide output (> SPLIT_MAX_N columns, K >= SPLIT_MIN_K) to torch, FOLD_WIDE_TILE: 35B-A3B's in-projections
# (N = 12352 and 9216 at K = 2048), where the saved norm launch has to pay for a kernel cuBLAS beats unfused. A first
# estimate, not yet measured (BK 128: 16 steps of a 2048 row; 6 stages keep about 64 KB of W in flight per SM):
# DELTASERVE_FOLD_WIDE_TILE=BN,BK,warps,stages[,split] or `bench_decode.py --fold-wide-tile` overrides it.
FOLD_MAX_ROWS = 16  # the prologue holds all rows in one tile, and BM is 16 up to here


def parse_tile(text: str) -> Tile | None:
    """"64,128,4,6" (BN, BK, warps, stages[, split]) -> Tile; "" -> None."""
    return Tile(*(int(v) for v in text.split(","))) if text.strip() else None


FOLD_WIDE_TILE: Tile = parse_tile(env_flag("DELTASERVE_FOLD_WIDE_TILE")) or Tile(64, 128, 4, 6)


def norm_fold_tile(rows: int, out_features: int, in_features: int, num_sms: int = 132) -> Tile | None:
    """The Tile for an [rows, in] x [out, in]^T call with the input norm folded in, or None: run the norm alone."""
    if not 1 <= rows <= FOLD_MAX_ROWS:
        return None
    tile = tile_config(rows, out_features, in_features, num_sms)
    if tile is None and out_features > SPLIT_MAX_N and in_features >= SPLIT_MIN_K:
        return FOLD_WIDE_TILE
    return tile


_SMEM_BUDGET = 200 << 10  # of the 227 KB a Hopper CTA may use; the rest for layout conversions


def _fit_stages(bm: int, bn: int, bk: int, stages: int, x_tiles: int = 1) -> int:
    """Pipeline depth that fits shared memory: each stage holds x_tiles input tiles (x, and with a folded norm the
    residual's) and a W tile (2-byte elements)."""
    per_stage = (x_tiles * bm + bn) * bk * 2
    return max(1, min(stages, _SMEM_BUDGET // per_stage))


# Split-K scratch, one (workspace, counters) pair per device, allocated on the first eager call and grown (never
# during a CUDA-graph capture, where it would be memory of the graph's pool that no eager code has zeroed) to the
# largest call. Replaced buffers stay alive in _retired: graphs captured earlier still point at them.
SPLIT_WORKSPACE_FLOATS = 1 << 20  # 4 MB: every split tile_config picks for N <= 8192 fits (about 2 * 132 * 32 * 16)
SPLIT_COUNTERS = 1024
_split_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[torch.Tensor] = []
_warned: set[tuple[int, int, int]] = set()


def _scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's workspace (>= floats fp32) and zeroed counters (>= counters int32); None when they are too small
    and cannot grow because the stream is capturing a CUDA graph."""
    key = str(device) if device.type != "cuda" or device.index is not None else f"cuda:{torch.cuda.current_device()}"
    have = _split_buffers.get(key)
    if have is not None and have[0].numel() >= floats and have[1].numel() >= counters:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _retired.extend(have)
    floats = max(floats, SPLIT_WORKSPACE_FLOATS, have[0].numel() if have else 0)
    counters = max(counters, SPLIT_COUNTERS, have[1].numel() if have else 0)
    have = (torch.empty(floats, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device))
    _split_buffers[key] = have
    return have


class NormPrologue(NamedTuple):
    """The layer's input RMSNorm, folded into the skinny linear: the linear's input is rms_norm(x + residual) with
    the zero-centred weight (1 + weight), and h = x + residual (rounded to x's dtype) is written to residual_out.
    residual None: the input is rms_norm(x) and nothing is written."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None


# The norm prologue's tile holds about this many elements of each of x and the residual (32 fp32 per thread at 4
# warps): [1, 4096] at one row, [16, 256] at 16, so that at few rows one or two loads cover a whole row.
NORM_PROLOGUE_ELEMS = 4096


def _norm_tiles(m: int, k: int) -> tuple[int, int]:
    """(RB, CK) of the prologue: rows per tile (a power of two >= m, so one tile holds them all) and columns."""
    rb = triton.next_power_of_2(m)
    return rb, max(16, min(triton.next_power_of_2(k), NORM_PROLOGUE_ELEMS // rb))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, ...],
                  out: torch.Tensor | None = None, norm: NormPrologue | None = None) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, unit stride in K); weight: [N, K] contiguous -> [M, N] with an explicit tile (a
    Tile or a plain (BN, BK, num_warps, stages[, split]) tuple), into `out` ([M, N], unit stride in N) if given.
    norm: apply this RMSNorm to x (and its residual) first, inside the kernel (M <= 16; the residual and
    residual_out [M, K] with unit stride in K; residual_out must not overlap x or the residual).
    A split call whose scratch is missing during a CUDA-graph capture (no eager call of that size ran first) runs
    torch's GEMM instead (after the norm, unfused)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    bn, bk, num_warps, stages, split = Tile(*tile)
    bm = max(16, triton.next_power_of_2(m))
    k_tiles = triton.cdiv(k, bk)
    k_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles))) * bk
    split = triton.cdiv(k, k_split)  # no empty K range
    blocks = triton.cdiv(n, bn)
    ws = counts = y  # unused without split
    if split > 1:
        scratch = _scratch(x.device, split * bm * n, blocks)
        if scratch is None:
            if (m, n, k) not in _warned:
                _warned.add((m, n, k))
                log.warning("split-K linear [%d, %d] x [%d, %d]^T first called inside a CUDA-graph capture: torch's "
                            "GEMM runs instead (warm up eagerly first)", m, k, n, k)
            return y.copy_(torch.nn.functional.linear(x if norm is None else _unfused_norm(x, norm), weight))
        ws, counts = scratch
    common = dict(BM=bm, BN=bn, BK=bk, SPLIT=split, EVEN_K=k % bk == 0, UPCAST=not x.is_cuda, num_warps=num_warps,
                  **pdl_launch(x.device))
    if norm is None:
        _skinny_linear_kernel[(blocks, split)](x, weight, y, ws, counts, m, n, k, k_split, x.stride(0), y.stride(0),
                                               STAGES=_fit_stages(bm, bn, bk, stages), **common)
        return y
    assert m <= 16, "the norm prologue holds all rows in one tile: at most 16"
    has_residual = norm.residual is not None
    r = norm.residual if has_residual else x
    h = norm.residual_out if has_residual else x  # never written without a residual
    rb, ck = _norm_tiles(m, k)
    _norm_skinny_linear_kernel[(blocks, split)](
        x, r, norm.weight, h, weight, y, ws, counts, m, n, k, k_split, x.stride(0), r.stride(0), h.stride(0),
        y.stride(0), norm.eps, STAGES=_fit_stages(bm, bn, bk, stages, 2 if has_residual else 1),
        RESIDUAL=has_residual, RB=rb, CK=ck, **common)
    return y


def _unfused_norm(x: torch.Tensor, norm: NormPrologue) -> torch.Tensor:
    """The norm kernel's output for x (and the residual stream written to residual_out), for the rare call that
    cannot run the fused kernel."""
    from deltaserve.kernels.norm import rms_norm

    if norm.residual is None:
        return rms_norm(x=x, weight=norm.weight, eps=norm.eps)
    normed, h = rms_norm(x=x, weight=norm.weight, eps=norm.eps, residual=norm.residual)
    norm.residual_out.copy_(h)
    return normed
