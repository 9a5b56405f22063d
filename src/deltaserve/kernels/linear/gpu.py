"""The GPU linear: the Triton weight-streaming kernel (triton.py) for few-row bf16/fp16 calls where it beats
torch's GEMM (`tile_config` decides the tile and whether K is split), torch's GEMM (cuBLAS) for everything else.
Split-K calls share one workspace per device: they must run on one stream at a time (triton.py).

rms_norm_linear folds a decoder layer's input RMSNorm into the same kernel (a prologue) where `norm_fold_tile`
has a tile for the call; `fold_tile` says whether it would (the layer asks before handing its norm over)."""

from __future__ import annotations

import torch

from deltaserve.kernels._device import num_sms
from deltaserve.kernels.linear.triton import NormPrologue, norm_fold_tile, skinny_linear, tile_config


def _streamable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel's input contract: half-precision x and weight of one dtype, a contiguous weight, K a multiple
    of 8 (16-byte rows)."""
    return x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.is_contiguous() and \
        not x.shape[-1] % 8


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _sms(x: torch.Tensor) -> int:
    return num_sms(x.device) if x.is_cuda else 132


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ref.linear. Few-row bf16/fp16 calls run the weight-streaming kernel; the rest torch's GEMM."""
    rows = _rows(x)
    if not _streamable(x, weight):
        return torch.nn.functional.linear(x, weight)
    tile = tile_config(rows, weight.shape[0], weight.shape[1], _sms(x))
    if tile is None:
        return torch.nn.functional.linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = skinny_linear(x2, weight, tile)
    return y.view(*x.shape[:-1], weight.shape[0])


def fold_tile(x: torch.Tensor, weight: torch.Tensor):
    """The tile rms_norm_linear would run x [..., K] x weight [N, K]^T with, the norm folded in; None: it would run
    the norm kernel and then `linear`, as unfused."""
    if not _streamable(x, weight):
        return None
    return norm_fold_tile(_rows(x), weight.shape[0], weight.shape[1], _sms(x))


def _row_view(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_linear(*, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None,
                    residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ref.rms_norm_linear: one kernel where fold_tile has a tile, else the norm kernel and then
    `linear`."""
    tile = fold_tile(x, weight)
    if tile is None:
        from deltaserve.kernels.norm import rms_norm

        if residual is None:
            return linear(x=rms_norm(x=x, weight=norm_weight, eps=eps), weight=weight)
        normed, h = rms_norm(x=x, weight=norm_weight, eps=eps, residual=residual)
        residual_out.copy_(h)
        return linear(x=normed, weight=weight)
    h_rows = None
    if residual is not None:  # written in place: a view, never a copy
        if residual_out.stride(-1) != 1:
            raise ValueError("rms_norm_linear: residual_out needs a unit stride in its last dim")
        h_rows = residual_out.view(-1, residual_out.shape[-1])
    norm = NormPrologue(norm_weight, eps, _row_view(residual) if residual is not None else None, h_rows)
    y = skinny_linear(_row_view(x), weight, tile, norm=norm)
    return y.view(*x.shape[:-1], weight.shape[0])
