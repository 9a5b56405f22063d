"""The routing sort of the expert-centric and block-grouped MoE paths (midbatch.py, blocked.py): the (token, slot)
pairs of topk_ids [T, k] in expert order, with no host sync:

- order [T*k] int64: the flat pair (t * k + j) of each expert-sorted row; a stable sort, so an expert's rows are
  its pairs in token order; ids < 0 (experts on another rank) sort first and belong to no expert, as do ids of E or
  more (a bug upstream), which sort last; those rows, outside [bounds[0], bounds[E]), are never computed, and come
  in pair order here, by value in the reference;
- bounds [E + 1] int32: expert e's rows are [bounds[e], bounds[e + 1]) (bounds[0]: the ids < 0);
- pos [T, k] int64 = arange: the row of y holding pair (t, j) (y is written in pair order);
- starts [E + 1] int32 (with block_m > 0): expert e's blocks of block_m rows are [starts[e], starts[e + 1]).

`sort_rows_reference` is torch's chain (the int16 cast, the sort, two aranges and a searchsorted: 5-6 kernels; six
more for the block starts); `sort_rows` does the same in one Triton program where the pairs fit it (decode, the MTP
verify, short prefill chunks: SORT_PROGRAM_MAX), by one tl.sort of keys (expert + 1) * BLOCK_P + pair, unique, so
the sort is stable, and one tl.histogram of the experts, whose cumulative sums are the bounds and the starts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.kernels._device import pdl_launch
from deltaserve.kernels._pdl import wait_then_release

SORT_PROGRAM_MAX = 4096  # pairs one program sorts (512 tokens at top-8); past it torch's chain
EXPERTS_MAX = 1024  # histogram bins one program holds (Qwen3.5's largest MoE has 512 experts)


def sort_expert_ids(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat ids of topk_ids [T, k] sorted (int16), and the flat pair of each, a group's pairs in token order.
    int16 keys: torch sorts by radix, a pass per 8 bits of key (one block's sort up to 4,096 pairs, CUB's beyond)."""
    if num_experts > torch.iinfo(torch.int16).max:
        raise ValueError(f"{num_experts} experts do not fit the int16 sort keys (at most 32767)")
    return torch.sort(topk_ids.reshape(-1).to(torch.int16), stable=True)


def block_starts(bounds: torch.Tensor, bm: int) -> torch.Tensor:
    """bounds int32 [E + 1] (expert e's sorted rows are [bounds[e], bounds[e + 1])) -> int32 [E + 1]: expert e's
    blocks of bm rows are [starts[e], starts[e + 1]); starts[E] blocks in all."""
    blocks = (bounds[1:] - bounds[:-1] + (bm - 1)) // bm
    return torch.cat([blocks.new_zeros(1), torch.cumsum(blocks, 0, dtype=torch.int32)])


def sort_rows_reference(topk_ids: torch.Tensor, num_experts: int,
                        block_m: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(order, bounds, pos, starts) as the module docstring says, by torch ops; starts None without block_m."""
    T, k = topk_ids.shape
    ids, order = sort_expert_ids(topk_ids, num_experts)
    queries = torch.arange(-1, num_experts, dtype=ids.dtype, device=ids.device)
    bounds = torch.searchsorted(ids, queries, right=True, out_int32=True)
    pos = torch.arange(T * k, device=ids.device).view(T, k)
    return order, bounds, pos, block_starts(bounds, block_m) if block_m else None


@triton.jit(do_not_specialize=["P"])  # the pair count changes every step: one compiled kernel per BLOCK_P
def _sort_rows_kernel(ids_ptr, order_ptr, pos_ptr, bounds_ptr, starts_ptr, P, E, BLOCK_M,
                      BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, STARTS: tl.constexpr,
                      PDL: tl.constexpr = False):
    """One program: P <= BLOCK_P pairs; bin 0 holds the ids < 0, bin e + 1 expert e, bin E + 1 the ids past the
    experts and the padding lanes the last bin (BLOCK_E >= E + 2: neither is stored). Every bin lies in
    [0, BLOCK_E): compiled, tl.histogram does not range-check (it keys on the low bits). PDL: launched while the
    top-k kernel finishes (_pdl.py)."""
    wait_then_release(PDL)
    i = tl.arange(0, BLOCK_P)
    live = i < P
    ids = tl.load(ids_ptr + i, mask=live, other=0)
    bins = tl.where(live, tl.minimum(tl.maximum(ids, -1), E).to(tl.int32) + 1, BLOCK_E - 1)
    keys = tl.sort(bins * BLOCK_P + i)
    tl.store(order_ptr + i, (keys & (BLOCK_P - 1)).to(tl.int64), mask=live)
    tl.store(pos_ptr + i, i.to(tl.int64), mask=live)
    counts = tl.histogram(bins, BLOCK_E)
    j = tl.arange(0, BLOCK_E)
    tl.store(bounds_ptr + j, tl.cumsum(counts, 0), mask=j <= E)
    if STARTS:
        blocks = tl.where(j > 0, (counts + BLOCK_M - 1) // BLOCK_M, 0)
        tl.store(starts_ptr + j, tl.cumsum(blocks, 0), mask=j <= E)


def sort_rows(topk_ids: torch.Tensor, num_experts: int,
              block_m: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sort_rows_reference in one launch where the pairs and experts fit one program; torch's chain otherwise."""
    T, k = topk_ids.shape
    pairs = T * k
    if not 0 < pairs <= SORT_PROGRAM_MAX or num_experts > EXPERTS_MAX:
        return sort_rows_reference(topk_ids, num_experts, block_m)
    device = topk_ids.device
    order = torch.empty(pairs, dtype=torch.int64, device=device)
    pos = torch.empty(T, k, dtype=torch.int64, device=device)
    bounds = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    starts = torch.empty_like(bounds) if block_m else None
    block_p = max(16, triton.next_power_of_2(pairs))
    _sort_rows_kernel[(1,)](
        topk_ids.contiguous(), order, pos, bounds, bounds if starts is None else starts, pairs, num_experts,
        max(block_m, 1), BLOCK_P=block_p, BLOCK_E=triton.next_power_of_2(num_experts + 2), STARTS=bool(block_m),
        num_warps=4 if block_p <= 1024 else 8, **pdl_launch(device))
    return order, bounds, pos, starts
