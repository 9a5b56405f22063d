"""Triton RMSNorms (same keyword-only signatures as ref.py): one pass over each row, fp32 math.

Rows are tiled [BLOCK_R, BLOCK_D] with BLOCK_D >= D (the whole row in registers), so short rows (q/k norm, D = 256;
GDN output norm, V = 128) pack several rows per program and long rows (D = 5120) take one program each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release


@triton.jit(do_not_specialize=["n_rows"])  # the token count varies every step: one compiled kernel
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, n_rows, eps,
    stride_x, stride_r, stride_y, stride_h,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    wait_then_release(PDL)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # the sum is rounded to the activation dtype first, as the reference (and the model) does
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * (1.0 + w)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _gated_rms_norm_kernel(
    x_ptr, g_ptr, w_ptr, y_ptr, n_rows, eps, stride_x, stride_g_outer, stride_g_head, stride_y,
    G_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    wait_then_release(PDL)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g_off = (rows64 // G_HEADS) * stride_g_outer + (rows64 % G_HEADS) * stride_g_head
    g = tl.load(g_ptr + g_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    y = w[None, :] * (x * rstd[:, None]) * (g * tl.sigmoid(g))
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [R, D] with a unit last stride (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tiling(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): about 4k elements per program for short rows, one row for long ones."""
    block_d = triton.next_power_of_2(n_cols)
    block_r = max(1, 4096 // block_d)
    warps = max(1, min(16, block_r * block_d // 512))
    return block_r, block_d, warps


def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (1 + weight), fp32 math.

    x: [..., D]; weight: [D]; residual: [..., D] or None.
    Without residual returns y in x.dtype. With residual returns (y, h): h = x + residual is summed in x.dtype
    (the model adds residuals in activation dtype, so h is the next residual stream, bit for bit) and y = norm(h).
    """
    D = x.shape[-1]
    x2 = _rows(x)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    if n_rows:
        r2 = _rows(residual) if residual is not None else x2
        block_r, block_d, warps = _tiling(D)
        _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, r2, weight, y, h, n_rows, eps, x2.stride(0), r2.stride(0), D, D,
            D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_RESIDUAL=residual is not None, num_warps=warps,
            **pdl_launch(x.device),
        )
    return y if residual is None else (y, h)


def gated_rms_norm(*, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Norm-before-gate RMSNorm with a plain weight (not 1 + w): y = weight * norm(x) * silu(gate), fp32 math.

    x, gate: [..., V]; weight: [V]. Returns y: [..., V] in x.dtype. The gate may be a column slice of a wider
    projection output ([T, H, V] with row stride > H*V): it is read in place, not copied.
    """
    D = x.shape[-1]
    x2 = _rows(x)
    heads = gate.shape[-2] if gate.dim() > 2 else 1
    g3 = gate.reshape(-1, heads, D)
    if g3.stride(-1) != 1:
        g3 = g3.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows:
        block_r, block_d, warps = _tiling(D)
        _gated_rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, g3, weight, y, n_rows, eps, x2.stride(0), g3.stride(0), g3.stride(1), D,
            G_HEADS=heads, D=D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, **pdl_launch(x.device),
        )
    return y
