"""Prompt logprobs: how likely the model finds each prompt token given the ones before it (vLLM's prompt_logprobs,
OpenAI's legacy `echo` with `logprobs`). Computed by the runner from the logits of the prompt positions a step
covers, in slices, so a long prompt never materialises [T, V] in fp32."""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltaserve.engine.step_input import StepInput
from deltaserve.outputs import TokenLogprob

_SLICE_ROWS = 256  # rows of [rows, V] fp32 at a time (256 x 248k x 4 B = 254 MB)


class PromptScores(NamedTuple):
    """logprobs: [R] fp32 of each scored prompt token; top_ids / top_logprobs: [R, k], k the most any request
    asks for (0: none); ranks: [R] each prompt token's 1-based rank (1 + the ids with a larger logit)."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    ranks: torch.Tensor


def prompt_logprobs(logits: torch.Tensor, step: StepInput) -> PromptScores:
    """logits: [R, V] of the step's prompt_logits_rows, in row order -> their scores (on the logits' device)."""
    targets = torch.tensor([t for r in step.prompt_logprobs for t in r.target_ids], dtype=torch.long)
    targets = targets.to(logits.device, non_blocking=True)
    k = min(max(r.num_top for r in step.prompt_logprobs), logits.shape[1])
    rows = logits.shape[0]
    scored = torch.empty(rows, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty(rows, k, dtype=torch.long, device=logits.device)
    top_lp = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    ranks = torch.empty(rows, dtype=torch.long, device=logits.device)
    for lo in range(0, rows, _SLICE_ROWS):
        hi = min(lo + _SLICE_ROWS, rows)
        raw = logits[lo:hi].float()
        lse = raw.logsumexp(dim=1, keepdim=True)
        target = raw.gather(1, targets[lo:hi, None])
        scored[lo:hi] = (target - lse).squeeze(1)
        ranks[lo:hi] = (raw > target).sum(dim=1) + 1
        values, ids = raw.topk(k, dim=1)
        top_ids[lo:hi], top_lp[lo:hi] = ids, values - lse
    return PromptScores(scored, top_ids, top_lp, ranks)


def prompt_logprobs_lists(scores: PromptScores, step: StepInput) -> dict[str, list[tuple[int, TokenLogprob]]]:
    """Host lists per request: (position of the scoring logits, TokenLogprob of the prompt token after it)."""
    scored, top_ids, top_lp, ranks = (t.tolist() for t in scores)
    out: dict[str, list[tuple[int, TokenLogprob]]] = {}
    row = 0
    for r in step.prompt_logprobs:
        entries = out.setdefault(r.request_id, [])
        for j, target in enumerate(r.target_ids):
            top = tuple(zip(top_ids[row][:r.num_top], top_lp[row][:r.num_top]))
            entries.append((r.first_position + j, TokenLogprob(target, scored[row], top, ranks[row])))
            row += 1
    return out
