"""Where a request's GDN state is worth a checkpoint (prefix caching), and how its chunks end there.

A checkpoint is a snapshot of the request's slot after a step, so the positions are planned when the request is
admitted and its prefill chunks are cut to end on them. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from deltaserve.engine.request import Request


def checkpoint_positions(request: Request, matched: int, branch: int, interval: int, page_size: int) -> list[int]:
    """Sorted positions in (matched, last prompt position] to checkpoint at:
    - the request's cache points: where the stable part of a prompt ends (a chat history before the generation
      prompt, the system prompt), given by whoever rendered it; by default the last prompt position, so the same
      prompt again, or a longer one, resumes with one token to compute;
    - where the prompt branches off a cached path (another request will likely branch there too);
    - every `interval` tokens along a long prompt.
    Positions under one page are not worth a state."""
    last = request.num_prompt_tokens - 1
    wanted = set(request.cache_points or (last,))
    wanted.add(branch)
    wanted.update(range(interval, last + 1, interval))
    return sorted(p for p in wanted if max(matched, page_size - 1) < p <= last)


def next_checkpoint(positions: Sequence[int], computed: int, num_new: int) -> int:
    """Where a chunk of num_new tokens from `computed` ends: at the first planned position inside it, if any."""
    for p in positions:
        if computed < p < computed + num_new:
            return p
    return computed + num_new


def without_tail(positions: Sequence[int], num_prompt_tokens: int, page_size: int, keep: Sequence[int] = ()
                 ) -> list[int]:
    """positions less those within a page of the prompt's end (the default checkpoint at its last position, an
    interval's that falls there), except those in `keep` (the points whoever rendered the prompt marked, such as a
    chat's history end before its generation prompt, where the next turn resumes): a checkpoint there splits the
    prompt's last chunk into two steps, and when other prompts wait the second (a few tokens, the one that samples
    the first token) rides with the next prompt's whole chunk."""
    return [p for p in positions if p < num_prompt_tokens - page_size or p in keep]
