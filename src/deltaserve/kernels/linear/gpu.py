"""The GPU linear: the Triton weight-streaming kernel (triton.py) for few-row bf16/fp16 calls where it beats
torch's GEMM (`tile_config` decides the tile and whether K is split, unless tuned.py lists a tile measured on this card
for the call's shape), torch's GEMM (cuBLAS) for everything else.
Split-K calls share one workspace per device: they must run on one stream at a time (triton.py)."""

from __future__ import annotations

import torch

from deltaserve.kernels._device import device_name, num_sms
from deltaserve.kernels.linear.triton import skinny_linear, tile_config
from deltaserve.kernels.linear.tuned import _MISSING, tuned_tile


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ref.linear. Few-row bf16/fp16 calls run the weight-streaming kernel; the rest torch's GEMM."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or not weight.is_contiguous() or \
            x.shape[-1] % 8:
        return torch.nn.functional.linear(x, weight)
    n, k = weight.shape
    tile = tuned_tile(device_name(x.device), rows, n, k) if x.is_cuda else _MISSING
    if tile is _MISSING:
        tile = tile_config(rows, n, k, num_sms(x.device) if x.is_cuda else 132)
    if tile is None:
        return torch.nn.functional.linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = skinny_linear(x2, weight, tile)
    return y.view(*x.shape[:-1], weight.shape[0])
