"""Triton grammar mask (same keyword-only signature as ref.py): reads the bitmask words, writes -inf only where a
token is forbidden; the logits themselves are never read, so a step's mask costs about the bitmask's bytes plus the
forbidden entries' writes (the reference expands the bits to a [R, V] tensor and copies the rows twice)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, rows_ptr, mask_ptr, stride_l, stride_m, vocab, words,
                                BLOCK: tl.constexpr):
    r = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + r)
    word = tl.load(mask_ptr + r.to(tl.int64) * stride_m + tok // 32, mask=tok < words * 32, other=0)
    forbidden = ((word >> (tok % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_l + tok, tl.full([BLOCK], float("-inf"), tl.float32),
             mask=forbidden & (tok < vocab))


def apply_token_bitmask_(*, logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] fp32, written in place: logits[rows[r], t] = -inf where bitmask row r forbids t. Returns
    logits."""
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be fp32 with a contiguous last dim, got {logits.dtype} {logits.stride()}")
    if bitmask.dtype != torch.int32 or bitmask.stride(-1) != 1 or bitmask.shape[0] != rows.shape[0]:
        raise ValueError(f"bitmask must be int32 [R, W] contiguous in W with R = len(rows), got {bitmask.dtype} "
                         f"{list(bitmask.shape)} for {rows.shape[0]} rows")
    if rows.numel():
        block = 4096
        _apply_token_bitmask_kernel[(rows.shape[0], triton.cdiv(logits.shape[1], block))](
            logits, rows, bitmask, logits.stride(0), bitmask.stride(0), logits.shape[1], bitmask.shape[1],
            BLOCK=block, num_warps=4)
    return logits
