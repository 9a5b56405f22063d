"""Per-sequence output state: detokenizer, stop checks, logprobs of one of a request's n samples (no tensors, no
scheduling)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deltaserve.engine.request import Request, RequestStatus
from deltaserve.outputs import SequenceDelta, TokenLogprob
from deltaserve.sampling_params import SamplingParams


@dataclass
class SequenceState:
    """Owns the text side of one sequence (one of a request's n samples); the scheduler owns its Request."""

    request: Request
    parent_id: str
    index: int
    params: SamplingParams
    eos_ids: frozenset[int]
    max_model_len: int
    detokenizer: IncrementalDetokenizer | None
    stop_checker: StopChecker
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # prompt logprobs by the position of the logits that scored them (position p scores prompt token p + 1);
    # None once sent, or when not asked for
    prompt_scores: dict[int, TokenLogprob] | None = None
    started: bool = False  # a delta went out (the first carries the prompt tokens served from the prefix cache)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_scores = {}

    def add_prompt_logprobs(self, entries: list[tuple[int, TokenLogprob]]) -> None:
        """Scores of prompt tokens from one step; a chunk recomputed after preemption repeats some, the first
        answer is kept."""
        if self.prompt_scores is not None:
            for position, logprob in entries:
                self.prompt_scores.setdefault(position, logprob)

    def _take_prompt_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        """The whole list once every prompt token is scored (then never again)."""
        scores = self.prompt_scores
        if scores is None or len(scores) < self.request.num_prompt_tokens - 1:
            return None
        self.prompt_scores = None
        return (None, *(scores[p] for p in range(self.request.num_prompt_tokens - 1)))

    def on_tokens(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> SequenceDelta:
        """Account for the tokens one step appended to the request (in order, already in its output list): stop
        checks run token by token, so a stop token, a stop string or the length limit inside the list ends the
        sequence there; the tokens after it are dropped (from the request too) and never reported."""
        out = self.request.output_token_ids
        before = len(out) - len(token_ids)
        text, status, stop_reason, kept = "", None, None, 0
        for token_id in token_ids:
            kept += 1
            status, stop_reason, piece = self._after_one(token_id, before + kept)
            text += piece
            if status is not None:
                break
        if kept < len(token_ids):
            del out[before + kept:]
        if logprobs is not None:
            self.pending_logprobs.extend(logprobs[:kept])
        if status is not None and not isinstance(stop_reason, str):  # a stop string truncates: nothing to release
            text += self._flush_text()
        return self._delta(tuple(token_ids[:kept]), text, status, stop_reason)

    def on_token(self, token_id: int, logprob: TokenLogprob | None) -> SequenceDelta:
        """on_tokens for one token."""
        return self.on_tokens([token_id], None if logprob is None else [logprob])

    def _after_one(self, token_id: int, num_out: int) -> tuple[RequestStatus | None, str | int | None, str]:
        """Stop checks for the num_out-th output token: (status if it ends the sequence, stop reason, text)."""
        status, stop_reason = self._token_stop(token_id, num_out)
        text = ""
        # a stop token's own text shows only with include_stop_str_in_output (vLLM's rule)
        if self.detokenizer is not None and (status is None or self.params.include_stop_str_in_output):
            # as for stop ids (which the sampler suppresses at outputs 1..min_tokens), a stop string completed by
            # one of the first min_tokens outputs ends nothing (vLLM's rule)
            can_stop = status is None and num_out > self.params.min_tokens
            result = self.stop_checker.feed(self.detokenizer.add(token_id), can_stop=can_stop)
            text = result.text
            if result.stopped:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, result.matched
        if status is None and (num_out >= (self.params.max_tokens or 1 << 62)
                               or self.request.num_prompt_tokens + num_out >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        return status, stop_reason, text

    def _token_stop(self, token_id: int, num_out: int) -> tuple[RequestStatus | None, int | None]:
        if num_out < self.params.min_tokens:
            return None, None
        if token_id in self.params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if token_id in self.eos_ids and not self.params.ignore_eos:
            # stop_reason names only a stop the request asked for (a stop string or stop_token_ids); the end
            # token gives None, as in vLLM and its API docs
            return RequestStatus.FINISHED_STOPPED, None
        return None, None

    def _flush_text(self) -> str:
        """Release text held back for a possible stop string or an incomplete UTF-8 character."""
        if self.detokenizer is None:
            return ""
        tail = self.stop_checker.feed(self.detokenizer.flush())
        return tail.text + ("" if tail.stopped else self.stop_checker.finish())

    def _delta(self, token_ids: tuple[int, ...], text: str, status: RequestStatus | None,
               stop_reason: str | int | None) -> SequenceDelta:
        logprobs = tuple(self.pending_logprobs) if self.params.logprobs is not None else None
        self.pending_logprobs = []
        cached = None if self.started else (self.request.num_cached_tokens or 0)
        self.started = True
        return SequenceDelta(request_id=self.parent_id, index=self.index, token_ids=token_ids, text=text,
                             prompt_logprobs=self._take_prompt_logprobs(), num_cached_tokens=cached,
                             logprobs=logprobs, finished=status is not None,
                             finish_reason=status.default_finish_reason if status is not None else None,
                             stop_reason=stop_reason)
