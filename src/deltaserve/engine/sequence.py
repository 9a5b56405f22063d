"""Per-sequence output state kept by the engine: detokenizer, stop checks, logprobs (no tensors, no scheduling)."""

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

    def on_token(self, token_id: int, logprob: TokenLogprob | None) -> SequenceDelta:
        """Account for one appended token; decide whether the sequence is finished and what text to emit."""
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        out = self.request.output_token_ids
        status, stop_reason = self._token_stop(token_id, len(out))
        text = ""
        if status is None and self.detokenizer is not None:
            result = self.stop_checker.feed(self.detokenizer.add(token_id))
            text = result.text
            if result.stopped:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, result.matched
        if status is None and (len(out) >= (self.params.max_tokens or 1 << 62)
                               or self.request.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None and not isinstance(stop_reason, str):  # a stop string truncates: nothing to release
            text += self._flush_text()
        return self._delta(token_id, text, status, stop_reason)

    def _token_stop(self, token_id: int, num_out: int) -> tuple[RequestStatus | None, int | None]:
        if num_out < self.params.min_tokens:
            return None, None
        if token_id in self.params.stop_token_ids or (token_id in self.eos_ids and not self.params.ignore_eos):
            return RequestStatus.FINISHED_STOPPED, token_id
        return None, None

    def _flush_text(self) -> str:
        """Release text held back for a possible stop string or an incomplete UTF-8 character."""
        if self.detokenizer is None:
            return ""
        tail = self.stop_checker.feed(self.detokenizer.flush())
        return tail.text + ("" if tail.stopped else self.stop_checker.finish())

    def _delta(self, token_id: int, text: str, status: RequestStatus | None,
               stop_reason: str | int | None) -> SequenceDelta:
        logprobs = tuple(self.pending_logprobs) if self.params.logprobs is not None else None
        self.pending_logprobs = []
        return SequenceDelta(request_id=self.parent_id, index=self.index, token_ids=(token_id,), text=text,
                             logprobs=logprobs, finished=status is not None,
                             finish_reason=status.default_finish_reason if status is not None else None,
                             stop_reason=stop_reason)
