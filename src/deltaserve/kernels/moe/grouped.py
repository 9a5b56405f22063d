"""Routed experts as grouped GEMMs: pairs (token, slot) sorted by expert, two grouped GEMMs (torch._grouped_mm,
CUTLASS on SM90), no host syncs and no data-dependent shapes, so the step stays CUDA-graph capturable. bf16 only.

The glue keeps every [pairs, .] tensor in bf16 and touches it once: the gather of x rows in sorted order (the GEMM
wants contiguous rows), the gate|up GEMM's output read by the Triton silu_and_mul, and the down GEMM's output read by
the Triton gather-sum combine (moe_combine), which also adds the shared expert. No fp32 copies in HBM, no atomics.
The GEMM is a parameter (`mm`) so that the glue runs on CPU against ref.grouped_mm in the tests."""

from __future__ import annotations

from typing import Callable

import torch

from deltaserve.kernels._device import capability
from deltaserve.kernels.activation.triton import silu_and_mul
from deltaserve.kernels.moe.sort import sort_expert_ids
from deltaserve.kernels.moe.triton import moe_combine


def grouped_mm_available(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and capability(x.device)[0] >= 9)


def cutlass_mm(*, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] grouped by expert, w [E, N, K] (the checkpoint's layout) -> [M, N], as ref.grouped_mm."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (token_of_row [T*k]: the token of each expert-sorted row, offs int32 [E]: each expert's
    exclusive row end, pos [T, k]: the sorted row of each pair, i.e. the inverse permutation).

    ids < 0 (experts on another rank) sort first and so join expert 0's group: computed, then masked by the combine.
    offs by a binary search of the sorted ids, in int32 as the GEMM takes it: no bincount (it reads the max id on the
    host, breaking CUDA-graph capture) and no int64 -> int32 copy. The ids are sorted as int16 keys: past 4,096 pairs
    torch sorts by radix (CUB, 8 bits of key a pass), and the int64 ids took eight launches a sort."""
    T, k = topk_ids.shape
    ids, order = sort_expert_ids(topk_ids, num_experts)
    experts = torch.arange(num_experts, dtype=ids.dtype, device=ids.device)
    offs = torch.searchsorted(ids, experts, right=True, out_int32=True)
    rows = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    pos = torch.empty_like(order).scatter_(0, order, rows)
    return order // k, offs, pos.view(T, k)


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
              mm: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """x: [T, D]; w13: [E, 2I, D]; w2: [E, D, I]; topk_weights/ids: [T, k] -> [T, D] in x.dtype. With shared (the
    shared expert's output [T, D]) and shared_gate ([T, 1] logits), adds sigmoid(shared_gate) * shared in the same
    fp32 sum. mm: the grouped GEMM (default torch._grouped_mm, which needs grouped_mm_available(x))."""
    if (shared is None) != (shared_gate is None):
        raise ValueError("shared and shared_gate come together")
    if mm is None:
        if not grouped_mm_available(x):
            raise ValueError("torch._grouped_mm needs bf16 CUDA tensors on SM90+ (gpu.fused_moe picks the path)")
        mm = cutlass_mm
    token_of_row, offs, pos = sort_pairs(topk_ids, w13.shape[0])
    h = mm(x=x[token_of_row], w=w13, offs=offs)  # [T*k, 2I], gate | up
    y = mm(x=silu_and_mul(x=h), w=w2, offs=offs)  # [T*k, D]
    return moe_combine(y=y, pos=pos, topk_weights=topk_weights, topk_ids=topk_ids, shared=shared,
                       shared_gate=shared_gate)
