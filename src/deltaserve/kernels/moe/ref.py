"""Reference mixture-of-experts routing and expert computation (docs/MODEL.md, "Sparse MoE")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_topk_softmax(*, router_logits: torch.Tensor, top_k: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E]. Softmax over all E experts in fp32, keep the top_k, renormalise them to sum to 1.

    Returns (weights [T, top_k] rounded once to `dtype`, ids int64 [T, top_k]), both ordered by descending weight.
    """
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(dtype), ids.to(torch.int64)


def fused_moe(
    *,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x[t]) + sigmoid(shared_gate[t]) * Shared(x[t]),
    fp32 math (the shared term only when shared_w13 is given).

    x: [T, D]; w13: [E, 2I, D] (rows [0, I) gate, [I, 2I) up); w2: [E, D, I]; topk_weights: [T, top_k];
    topk_ids: [T, top_k] int64; shared_w13: [2I_s, D]; shared_w2: [D, I_s]; shared_gate: [T, 1] logits.
    Expert(x) = (silu(x @ G^T) * (x @ U^T)) @ Down^T. Returns y: [T, D] in x.dtype.
    """
    inter = w2.shape[2]
    x32 = x.float()
    y = torch.zeros_like(x32)
    if shared_w13 is not None:
        gate_up = x32 @ shared_w13.float().T
        half = shared_w13.shape[0] // 2
        y += torch.sigmoid(shared_gate.float()) * ((F.silu(gate_up[:, :half]) * gate_up[:, half:])
                                                   @ shared_w2.float().T)
    for e in torch.unique(topk_ids).tolist():  # only the experts some token was routed to
        if e < 0:
            continue  # a negative id marks a routing slot with no expert to run (e.g. one owned by another rank)
        tokens, picks = (topk_ids == e).nonzero(as_tuple=True)
        gate_up = x32[tokens] @ w13[e].float().T
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out = hidden @ w2[e].float().T
        y.index_add_(0, tokens, out * topk_weights[tokens, picks].float().unsqueeze(-1))
    return y.to(x.dtype)


def moe_combine(*, y: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[pos[t, j]] over the slots with topk_ids[t, j] >= 0
    (+ sigmoid(shared_gate[t]) * shared[t]), fp32 math in slot order, then the shared term; one rounding.

    y: [P, D] routed-expert outputs, one row per (token, slot) pair in any order (the grouped path's expert-sorted
    one); pos: [T, k] the row of y holding pair (t, j) (not read where topk_ids < 0); topk_weights, topk_ids:
    [T, k]; shared: [T, D]; shared_gate: [T, 1] logits. Returns [T, D] in y.dtype (written into out if given).
    """
    valid = topk_ids >= 0
    rows = torch.where(valid, pos, 0)
    acc = torch.zeros(topk_ids.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(topk_ids.shape[1]):
        term = topk_weights[:, j, None].float() * y[rows[:, j]].float()
        acc += torch.where(valid[:, j, None], term, 0.0)  # where, not a 0 weight: an unused row may hold NaN
    if shared is not None:
        acc += torch.sigmoid(shared_gate.float()) * shared.float()
    if out is None:
        return acc.to(y.dtype)
    return out.copy_(acc)


def grouped_mm(*, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What the grouped path asks of torch._grouped_mm: x [M, K] rows grouped by expert, w [E, N, K], offs int32 [E]
    the groups' exclusive row ends -> [M, N] in x.dtype, rows [offs[e-1], offs[e]) times w[e]^T, fp32 math. Rows
    past offs[-1] are zero here (left unspecified by torch). Syncs the host: tests only."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = (x[start:end].float() @ w[e].float().T).to(x.dtype)
        start = end
    return out
