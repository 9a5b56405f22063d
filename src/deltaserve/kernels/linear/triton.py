"""Triton linear for decode: x [M <= 64, K] @ W [N, K]^T reads the whole weight for a handful of rows, so it is a
weight stream. Programs tile the output columns by BN and, for outputs too narrow to fill the SMs that way, K by
SPLIT (split-K), so every SM streams its own slab of W through a software-pipelined loop (loads STAGES - 1 tiles
ahead). `tile_config` says where it beats torch's GEMM (gpu.py routes every call by it).

Split-K runs in the same launch: each program writes its fp32 partial [M, BN] to a workspace, then bumps its column
block's counter (acq_rel); the program that arrives last adds the SPLIT partials in split order (so the result does
not depend on which program finished last: deterministic), writes the output and sets the counter back to 0, so
the next call, and every CUDA-graph replay, starts clean. No program ever waits on another (no spin), so any
schedule completes. The workspace and counters are one pair per device, shared by every call: calls must not run
concurrently on two streams (the engine runs the model on one stream; stream order serialises the calls)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

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


@triton.jit(do_not_specialize=["M"])  # the row count changes every step: one compiled kernel per row bucket
def _skinny_linear_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, K_SPLIT, stride_xm, stride_ym,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                          SPLIT: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                          PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)  # this program reduces K columns [pid_k * K_SPLIT, min(K, (pid_k + 1) * K_SPLIT))
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_m = rm < M
    m_n = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT  # K_SPLIT is a multiple of BK: only the last range can end in a partial tile
    # PDL: wait for the previous kernel (x is its output) before any load. Loading the first W tile before the
    # wait (a peeled first step) held 168 registers instead of 96 and lost on the H200: 9B batch 1 0.97x, 35B-A3B
    # 1.07x against 1.00x / 1.09x waiting first (RESULTS.md, 2026-12-04).
    wait_then_release(PDL)
    for k in tl.range(k_lo, tl.minimum(K, k_lo + K_SPLIT), BK, num_stages=STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs + k, mask=m_m[:, None], other=0.0)
            w = tl.load(w_ptrs + k, mask=m_n[:, None], other=0.0)
        else:
            m_k = rk + k < K
            x = tl.load(x_ptrs + k, mask=m_m[:, None] & m_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bits (docs/KERNELS.md, "Testing Triton kernels on CPU")
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    m_y = m_m[:, None] & m_n[None, :]
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


_SMEM_BUDGET = 200 << 10  # of the 227 KB a Hopper CTA may use; the rest for layout conversions


def _fit_stages(bm: int, bn: int, bk: int, stages: int) -> int:
    """Pipeline depth that fits shared memory: each stage holds an x tile and a W tile (2-byte elements)."""
    per_stage = (bm + bn) * bk * 2
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


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, ...],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, unit stride in K); weight: [N, K] contiguous -> [M, N] with an explicit tile (a
    Tile or a plain (BN, BK, num_warps, stages[, split]) tuple), into `out` ([M, N], unit stride in N) if given.
    A split call whose scratch is missing during a CUDA-graph capture (no eager call of that size ran first) runs
    torch's GEMM instead."""
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
            return y.copy_(torch.nn.functional.linear(x, weight))
        ws, counts = scratch
    _skinny_linear_kernel[(blocks, split)](
        x, weight, y, ws, counts, m, n, k, k_split, x.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk,
        STAGES=_fit_stages(bm, bn, bk, stages), SPLIT=split, EVEN_K=k % bk == 0, UPCAST=not x.is_cuda,
        num_warps=num_warps, **pdl_launch(x.device))
    return y
