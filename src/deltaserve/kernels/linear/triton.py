"""Triton linear for decode: x [M <= 64, K] @ W [N, K]^T reads the whole weight for a handful of rows, so it is a
weight stream. One program per BN output columns walks all of K through a software-pipelined loop (loads STAGES - 1
tiles ahead), so every SM streams its own slab of W; no split-K, so no second pass. `tile_config` says where it beats
torch's GEMM (gpu.py routes every call by it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


MAX_ROWS = 64  # above this the call is no longer a weight stream: torch's GEMM


@triton.jit(do_not_specialize=["M"])  # the row count changes every step: one compiled kernel per row bucket
def _skinny_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                          EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_m = rm < M
    m_n = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
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
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def tile_config(rows: int, out_features: int, in_features: int,
                num_sms: int = 132) -> tuple[int, int, int, int] | None:
    """(BN, BK, num_warps, stages) for an [rows, in] x [out, in]^T call, or None where torch's GEMM is as fast.

    The rule, from the sweep in benchmarks/RESULTS.md (2026-11-27, H100, `bench_linear.py --sweep`, 9B, 27B and
    35B-A3B decode projections): up to 16 rows, 64 x 256 tiles beat cuBLAS on most projections with K >= 4096; at
    up to 64 rows only vocab-sized outputs win (128 x 128 tiles), since each program re-reads all of x. With no
    split over K the grid is one program per BN columns, so narrow outputs take BN=32, and outputs too narrow to give
    half the SMs a program (a 2048-wide projection, a router) stay with torch, as do short reductions (K = 2048: the
    pipeline never fills) unless the output is vocab-sized."""
    if rows <= 16 and out_features >= 1 << 16:
        return 64, 256, 4, 4
    if rows <= 16 and in_features >= 4096:
        bn = 64 if triton.cdiv(out_features, 64) >= num_sms // 2 else 32
        return (bn, 256, 4, 4) if triton.cdiv(out_features, bn) >= num_sms // 2 else None
    if rows <= MAX_ROWS and out_features >= 1 << 16:
        return 128, 128, 8, 3
    return None


_SMEM_BUDGET = 200 << 10  # of the 227 KB a Hopper CTA may use; the rest for layout conversions


def _fit_stages(bm: int, bn: int, bk: int, stages: int) -> int:
    """Pipeline depth that fits shared memory: each stage holds an x tile and a W tile (2-byte elements)."""
    per_stage = (bm + bn) * bk * 2
    return max(1, min(stages, _SMEM_BUDGET // per_stage))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, int, int, int]) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, unit stride in K); weight: [N, K] contiguous -> [M, N] with an explicit tile."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bn, bk, num_warps, stages = tile
    bm = max(16, triton.next_power_of_2(m))
    _skinny_linear_kernel[(triton.cdiv(n, bn),)](
        x, weight, y, m, n, k, x.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk, STAGES=_fit_stages(bm, bn, bk, stages),
        EVEN_K=k % bk == 0, UPCAST=not x.is_cuda, num_warps=num_warps)
    return y
