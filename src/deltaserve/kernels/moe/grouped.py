"""Routed experts as grouped GEMMs: tokens sorted by expert, two grouped GEMMs (torch._grouped_mm, CUTLASS on SM90), no host
syncs, so the step stays CUDA-graph capturable. bf16 only; other dtypes take the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.kernels._device import capability
from deltaserve.kernels.moe import ref


def grouped_mm_available(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and capability(x.device)[0] >= 9)


def fused_moe(*, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, D]; w13: [E, 2I, D]; w2: [E, D, I]; topk_weights/ids: [T, k] -> [T, D] in x.dtype."""
    if not grouped_mm_available(x):
        return ref.fused_moe(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_row = order // k
    # ids < 0 (experts on another rank) sort first and fall outside every group's offsets, so they contribute 0.
    # scatter_add, not bincount: bincount reads the max id on the host, which breaks CUDA-graph capture.
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat.clamp(min=0), (flat >= 0).to(torch.int32))
    offs = (torch.cumsum(counts, 0) + (flat < 0).sum()).to(torch.int32)
    rows = x[token_of_row]
    h = torch._grouped_mm(rows, w13.transpose(-2, -1), offs=offs)
    inter = w13.shape[1] // 2
    act = F.silu(h[:, :inter].float()) * h[:, inter:].float()
    y = torch._grouped_mm(act.to(x.dtype), w2.transpose(-2, -1), offs=offs)
    valid = (flat[order] >= 0).to(torch.float32)
    y = y.float() * (topk_weights.reshape(-1)[order].float() * valid).unsqueeze(-1)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)
