"""Reference causal depthwise conv1d (+ SiLU) over the pre-conv GDN ``in_proj_qkv`` outputs, with a slot pool of
conv states holding each sequence's last W-1 pre-conv inputs (oldest first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.kernels._varlen import live_sequences
from deltaserve.kernels.gated_delta_rule.ref import l2norm_qk


def _conv_silu(windows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """windows: [..., C, W] fp32, weight: [C, W] fp32 -> silu(conv) [..., C] fp32.

    Prefill and decode share this so that both reduce over W in the same order (bitwise-equal results)."""
    return F.silu((windows * weight).sum(-1))


def causal_conv1d_prefill(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Varlen causal conv over N sequences packed flat; updates their conv states in place.

    x: [T, C]; weight: [C, W] (weight[:, W-1] multiplies the current token); conv_state: [S, W-1, C] (model dtype);
    cu_seqlens: [N+1] int32; slots: [N] int64 (< 0: skip, rows stay zero, no state write);
    has_initial_state: [N] bool (False: history is zeros, the slot's content is ignored).
    Returns y: [T, C] in x.dtype. conv_state[slot] becomes the last W-1 inputs of [history; x_seq].
    """
    width = weight.shape[1]
    w = weight.float()
    y = torch.zeros_like(x)
    for lo, hi, slot, init in live_sequences(cu_seqlens, slots, has_initial_state):
        if init:
            hist = conv_state[slot].float()
        else:
            hist = torch.zeros(width - 1, x.shape[1], dtype=torch.float32, device=x.device)
        xx = torch.cat([hist, x[lo:hi].float()])  # [W-1+L, C]
        if hi > lo:  # an empty sequence has no outputs (and unfold needs W rows); its state is still written
            y[lo:hi] = _conv_silu(xx.unfold(0, width, 1), w).to(x.dtype)  # unfold: [L, C, W] sliding windows
        # keep the last W-1 rows of history+input, so a sequence shorter than W-1 keeps part of its old history
        conv_state[slot] = xx[xx.shape[0] - (width - 1):].to(conv_state.dtype)
    return y


def causal_conv1d_prefill_split(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_prefill with y returned as two contiguous tensors, y[:, :split] and y[:, split:] (the GDN layer
    splits q/k from v this way, because fla-core needs v contiguous)."""
    y = causal_conv1d_prefill(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens, slots=slots,
                              has_initial_state=has_initial_state)
    return y[:, :split].contiguous(), y[:, split:].contiguous()


def causal_conv1d_prefill_qkv(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    key_dim: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """causal_conv1d_prefill as the GDN layer consumes it: (q, k, v) = y[:, :key_dim], y[:, key_dim:2 key_dim],
    y[:, 2 key_dim:], each contiguous, q and k L2-normalised per head of head_dim (gated_delta_rule's l2norm_qk:
    fp32 math on y as rounded to x.dtype, the result rounded to it again)."""
    check_qkv(x, key_dim, head_dim)
    y = causal_conv1d_prefill(x=x, weight=weight, conv_state=conv_state, cu_seqlens=cu_seqlens, slots=slots,
                              has_initial_state=has_initial_state)
    total = y.shape[0]
    heads = (total, key_dim // head_dim, head_dim)  # explicit: a view cannot infer -1 with no tokens
    q, k = l2norm_qk(y[:, :key_dim].view(heads), y[:, key_dim:2 * key_dim].view(heads))
    return q.view(total, key_dim), k.view(total, key_dim), y[:, 2 * key_dim:].contiguous()


def check_qkv(x: torch.Tensor, key_dim: int, head_dim: int) -> None:
    if head_dim <= 0 or key_dim % head_dim or not 0 <= 2 * key_dim <= x.shape[1]:
        raise ValueError(f"key_dim {key_dim} must be a multiple of head_dim {head_dim} with 2 * key_dim <= C = "
                         f"{x.shape[1]}")


def causal_conv1d_update(
    *, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Single-token decode: one new token per sequence, rolling the conv window in place.

    x: [N, C]; weight: [C, W]; conv_state: [S, W-1, C]; slots: [N] int64 (< 0: skip, row stays zero).
    Returns y: [N, C] in x.dtype.
    """
    y = torch.zeros_like(x)
    valid = (slots >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return y
    idx = slots[valid]
    xx = torch.cat([conv_state[idx].float(), x[valid].float().unsqueeze(1)], dim=1)  # [n, W, C]
    y[valid] = _conv_silu(xx.transpose(1, 2), weight.float()).to(x.dtype)
    conv_state[idx] = xx[:, 1:].to(conv_state.dtype)
    return y
