"""A generation request as the scheduler sees it.

Pure Python, never imports torch. The Scheduler owns every Request it was given (status and num_computed_tokens are
written by the scheduler only; the memory a running request holds is its CacheManager allocation); the engine
appends sampled tokens (through `Scheduler.resolve_step` / `update_from_step`) and reads the rest.

A token that was sampled on the device but has not reached the host yet is *pending*: it already counts as a
position to compute (so the next step can be scheduled while the sampling step still runs) but its id is not
known here; `token_ids` covers only the known tokens. Draft tokens (proposed by a drafter for the next step to
verify) are not part of the request until a step keeps them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING <-> PREEMPTED (back in the waiting queue) -> one FINISHED_* state."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def default_finish_reason(self) -> str | None:
        """The OpenAI-style finish_reason for a finished status (None while not finished)."""
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}


@dataclass(eq=False)  # identity equality: two requests with equal fields are still two requests
class Request:
    """One request: its tokens, and the resources the scheduler gave it.

    Tokens at positions [0, num_computed_tokens) have been run through the model, or are in a launched step (their
    K/V sit in the request's pages, their effect on the GDN state in its slot); positions [num_computed_tokens,
    num_tokens_with_pending) are still to compute.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: object = None  # opaque to the scheduler
    output_token_ids: list[int] = field(default_factory=list)
    arrival_index: int = -1  # assigned by Scheduler.add_request, increasing in arrival order
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0  # tokens a step still in flight may add: positions after the known tokens
    num_pending_drafts: int = 0  # of those, drafts the step verifies (how many it keeps is not known yet)
    draft_token_ids: list[int] = field(default_factory=list)  # proposed for the next step to verify
    # prefix caching: where the stable part of the prompt ends (given by whoever rendered it; empty: the prompt's
    # last position), the positions planned for checkpoints at admission, and the prompt tokens a match skipped
    cache_points: tuple[int, ...] = ()
    checkpoint_positions: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    max_output_tokens: int | None = None  # the engine's length limit: no step is scheduled to sample past it

    def __post_init__(self) -> None:
        # Copies, so that the caller's lists are never mutated or aliased.
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self._prompt_key: tuple[int, int] | None = None

    @property
    def prompt_key(self) -> tuple[int, int]:
        """(length, hash) of the prompt, computed once: requests with different keys have different prompts."""
        if self._prompt_key is None:
            self._prompt_key = (len(self.prompt_token_ids), hash(tuple(self.prompt_token_ids)))
        return self._prompt_key

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + appended outputs (pending tokens excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return self.num_tokens + self.num_pending_tokens

    @property
    def reached_max_output(self) -> bool:
        """A token is pending and, with it, the outputs reach max_output_tokens: a step for the pending token would
        only sample a token nobody keeps."""
        limit = self.max_output_tokens
        return (self.num_pending_tokens > 0 and limit is not None
                and len(self.output_token_ids) + self.num_pending_tokens >= limit)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list, prompt + output (O(num_tokens); use `token_ids(start, stop)` for a chunk)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    def append_output_token(self, token_id: int) -> None:
        """Append one sampled token (it becomes position num_tokens - 1, computed in a later step)."""
        if self.status.is_finished:
            raise ValueError(f"request {self.request_id!r} is {self.status.value}; cannot append token {token_id}")
        self.output_token_ids.append(token_id)
