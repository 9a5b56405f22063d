"""Reference: forbid the tokens a bitmask leaves out, in place.

bitmask: [R, W] int32, bit b of word w allows token 32 * w + b (little-endian bits, as llguidance fills it); ids at
or past W * 32 are forbidden. rows: [R] int64, the logits row each bitmask row applies to (distinct)."""

from __future__ import annotations

import torch


def apply_token_bitmask_(*, logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] fp32, written in place: logits[rows[r], t] = -inf where bitmask row r forbids t. Returns
    logits."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, :vocab].bool()
    if allowed.shape[1] < vocab:  # a mask narrower than the logits forbids the ids it does not cover
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    # index_select / index_copy_: advanced-index assignment (logits[rows] = ...) is ~10x slower on CPU
    logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(~allowed, float("-inf")))
    return logits
