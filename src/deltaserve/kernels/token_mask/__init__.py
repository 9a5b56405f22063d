"""Grammar masks on logits (structured outputs). Triton kernel on CUDA tensors, the reference otherwise."""

from __future__ import annotations

from deltaserve.kernels._dispatch import dispatch

from . import ref

apply_token_bitmask_ = dispatch(ref.apply_token_bitmask_, "deltaserve.kernels.token_mask.triton")

__all__ = ["apply_token_bitmask_"]
