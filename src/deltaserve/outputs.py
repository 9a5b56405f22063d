"""Results returned to users, in the shape vLLM users know (RequestOutput.outputs[i].text / token_ids / ...)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (best first), under the model's distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # prompt logprobs: token_id's 1-based rank under the distribution (None elsewhere)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop_token_ids id that ended it; None on the end token

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served (the first sample's)


@dataclass(frozen=True)
class SequenceDelta:
    """What one sequence (sample `index` of request `request_id`) produced in one engine step."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on a sample's first delta, when asked for
    num_cached_tokens: int | None = None  # on a sample's first delta: prompt tokens served from the prefix cache


def apply_delta(output: RequestOutput, delta: SequenceDelta) -> None:
    """Accumulate one step's delta into the request's output (finished once every sample is)."""
    seq = output.outputs[delta.index]
    if delta.prompt_logprobs is not None and output.prompt_logprobs is None:
        output.prompt_logprobs = list(delta.prompt_logprobs)
    if delta.num_cached_tokens is not None and delta.index == 0:
        output.num_cached_tokens = delta.num_cached_tokens
    seq.token_ids.extend(delta.token_ids)
    seq.text += delta.text
    if delta.logprobs is not None:
        seq.logprobs = (seq.logprobs or []) + list(delta.logprobs)
    if delta.finished:
        seq.finish_reason, seq.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.error:
            output.error = delta.error
    output.finished = all(o.finish_reason is not None for o in output.outputs)
