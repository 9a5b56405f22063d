"""The GPU linear: the Triton weight-streaming kernel (triton.py) for few-row bf16/fp16 calls where it beats
torch's GEMM (`tile_config` decides the tile and whether K is split, unless tuned.py lists a tile measured on this card
for the call's shape), torch's GEMM (cuBLAS) for everything else. silu_mul_linear (the dense MLP's down projection)
runs the same kernel with the SiLU-and-mul folded into its x loads wherever that kernel would run the call.
Split-K calls share one workspace per device: they must run on one stream at a time (triton.py)."""

from __future__ import annotations

import torch

from deltaserve.kernels._device import device_name, num_sms
from deltaserve.kernels.activation import silu_and_mul
from deltaserve.kernels.linear.ref import check_silu_mul_shapes
from deltaserve.kernels.linear.triton import Tile, skinny_linear, tile_config
from deltaserve.kernels.linear.tuned import _MISSING, tuned_tile

# Fold the MLP's activation into the down projection's kernel. Benchmarks flip it in-process (bench_decode.py
# --silu-fold off on; off: silu_and_mul's own launch, then linear, as before the fold); CUDA graphs captured before a
# flip keep what they were captured with.
SILU_FOLD = True
# Rows up to which the fold runs. Every program of the grid computes its own copy of the activation for its K range
# (on next_power_of_2(rows) rows): sm_90a loop SASS a tile at the 9B down tile, 377 / 514 / 1181 at 1 / 4 / 16 rows
# against the plain kernel's 397 (compile_check.py); at 16 rows issuing them outlasts the tile's weight stream
# (about 24 tiles x 2 programs an SM), at 4 rows it should not. An estimate from instruction counts, to be measured
# (bench_decode.py --silu-fold off on --batches 1 2 4 8).
SILU_FOLD_MAX_ROWS = 4


def _skinny_tile(x: torch.Tensor, weight: torch.Tensor, rows: int) -> Tile | None:
    """The weight-streaming kernel's tile for `rows` rows times weight [N, K]^T, or None where torch's GEMM runs."""
    n, k = weight.shape
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or not weight.is_contiguous() or \
            k % 8:
        return None
    tile = tuned_tile(device_name(x.device), rows, n, k) if x.is_cuda else _MISSING
    if tile is _MISSING:
        tile = tile_config(rows, n, k, num_sms(x.device) if x.is_cuda else 132)
    return tile


def _run(x: torch.Tensor, weight: torch.Tensor, rows: int, tile: Tile, silu_mul: bool = False) -> torch.Tensor:
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = skinny_linear(x2, weight, tile, silu_mul=silu_mul)
    return y.view(*x.shape[:-1], weight.shape[0])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ref.linear. Few-row bf16/fp16 calls run the weight-streaming kernel; the rest torch's GEMM."""
    rows = _rows(x)
    tile = _skinny_tile(x, weight, rows) if x.shape[-1] == weight.shape[-1] else None
    if tile is None:
        return torch.nn.functional.linear(x, weight)
    return _run(x, weight, rows, tile)


def silu_mul_linear(*, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ref.silu_mul_linear. Where linear would run the weight-streaming kernel on the activation
    of up to SILU_FOLD_MAX_ROWS rows (and SILU_FOLD is on), that kernel computes the activation as it loads its x
    tiles: one launch and no [rows, K] activation in memory. Elsewhere silu_and_mul, then linear."""
    check_silu_mul_shapes(x, weight)
    rows = _rows(x)
    tile = _skinny_tile(x, weight, rows) if SILU_FOLD and rows <= SILU_FOLD_MAX_ROWS else None
    if tile is None:
        return linear(x=silu_and_mul(x=x), weight=weight)
    return _run(x, weight, rows, tile, silu_mul=True)
