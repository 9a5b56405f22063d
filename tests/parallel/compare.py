"""What 'the same output as one process' means for the tensor-parallel tests."""

from __future__ import annotations

import math


def assert_same(got, ref, atol: float) -> None:
    """Completions `got` and `ref` (one per prompt): identical greedy tokens and top-k ids, logprobs within atol."""
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for lg, lr in zip(g.logprobs, r.logprobs):
            assert math.isclose(lg.logprob, lr.logprob, abs_tol=atol)
            assert [t for t, _ in lg.top] == [t for t, _ in lr.top]
            assert all(math.isclose(a, b, abs_tol=atol) for (_, a), (_, b) in zip(lg.top, lr.top))
