"""Triton gated activation (same keyword-only signature as ref.py): one pass, fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, I: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    wait_then_release(PDL)  # x is the gate/up projection's output
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(*, x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I] in x.dtype, fp32 math."""
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((*x.shape[:-1], half), dtype=x.dtype, device=x.device)
    if x2.shape[0] and half:
        block = min(1024, triton.next_power_of_2(half))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(half, block))](
            x2, y, x2.stride(0), half, I=half, BLOCK=block, num_warps=4, **pdl_launch(x.device))
    return y


@triton.jit
def _sigmoid_gate_mul_kernel(x_ptr, g_ptr, y_ptr, stride_gt, stride_gh, HD: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HD
    wait_then_release(PDL)
    x = tl.load(x_ptr + t * HD + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t * stride_gt + (cols // D) * stride_gh + cols % D, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * HD + cols, (x * tl.sigmoid(g)).to(y_ptr.dtype.element_ty), mask=mask)


def sigmoid_gate_mul(*, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], gate: [T, H, D] (may be a strided view) -> x * sigmoid(gate): [T, H, D] in x.dtype, fp32 math.
    One pass that reads the gate where the projection left it (the unfused chain copies it, then runs two
    elementwise kernels)."""
    if gate.shape != x.shape or gate.stride(-1) != 1:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)} and unit stride in the last dim, got "
                         f"{tuple(gate.shape)} strides {gate.stride()}")
    x = x.contiguous()
    T, H, D = x.shape
    y = torch.empty_like(x)
    if T and H * D:
        block = min(1024, triton.next_power_of_2(H * D))
        _sigmoid_gate_mul_kernel[(T, triton.cdiv(H * D, block))](
            x, gate, y, gate.stride(0), gate.stride(1), HD=H * D, D=D, BLOCK=block, num_warps=4,
            **pdl_launch(x.device))
    return y
