"""The output side of the engine: one record per user request (its n samples, each with its detokenizer, stop
checker and pending logprobs), one atomic path in and one cleanup path out. Pure host code, no tensors.

A user request with n samples runs as n scheduler requests ("children"). Children are found through a dict from
their scheduler id to (record, index), never by parsing ids, and every id a new request would use is checked against
the live ones before anything is registered, so a duplicate or colliding id is refused whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from deltaserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deltaserve.engine.request import Request
from deltaserve.engine.sequence import SequenceState
from deltaserve.outputs import SequenceDelta, TokenLogprob
from deltaserve.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request that cannot be served as given (too long, bad token ids, duplicate id); nothing was queued."""


@dataclass
class RequestRecord:
    """One live user request: its samples by index (None once a sample has ended)."""

    request_id: str
    samples: list[SequenceState | None]

    @property
    def finished(self) -> bool:
        return all(s is None for s in self.samples)


class OutputProcessor:
    """Owns every live user request's output state; turns appended tokens into SequenceDeltas."""

    def __init__(self, tokenizer: object, eos_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self._records: dict[str, RequestRecord] = {}
        self._children: dict[str, tuple[RequestRecord, int]] = {}  # scheduler request id -> (record, sample index)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    @property
    def num_live_samples(self) -> int:
        return len(self._children)

    # ---- in --------------------------------------------------------------------------------------------------------
    def new_children(self, request_id: str, prompt: list[int], params: SamplingParams) -> list[Request]:
        """The scheduler requests of a new user request (not registered yet). RequestError, changing nothing, when
        its id or one of its children's ids is in use, or when it has stop strings but there is no tokenizer."""
        if params.stop and self.tokenizer is None:  # no text to match: the stop strings would be silently ignored
            raise RequestError(f"stop strings {params.stop[:3]!r} need a tokenizer, but the model directory has none; "
                               "use stop_token_ids instead, or add the checkpoint's tokenizer files")
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [i for i in dict.fromkeys([request_id, *ids]) if i in self._records or i in self._children]
        if taken:
            raise RequestError(f"request id {request_id!r} is already in use (or collides with the id of a running "
                               f"sample: {taken}); give each request a unique id")
        children = []
        for index, child_id in enumerate(ids):
            child_params = params if params.seed is None or index == 0 else dataclasses.replace(
                params, seed=params.seed + index)  # vLLM's convention: sample i draws from seed + i
            request = Request(child_id, list(prompt), sampling_params=child_params)
            request.max_output_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(prompt))
            children.append(request)
        return children

    def register(self, request_id: str, children: list[Request]) -> None:
        """Start tracking a request whose children the scheduler accepted (after new_children)."""
        record = RequestRecord(request_id, [])
        for index, request in enumerate(children):
            record.samples.append(self._sequence_state(request, request_id, index))
            self._children[request.request_id] = (record, index)
        self._records[request_id] = record

    def _sequence_state(self, request: Request, parent: str, index: int) -> SequenceState:
        params: SamplingParams = request.sampling_params  # type: ignore[assignment]
        detok = (IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        return SequenceState(request=request, parent_id=parent, index=index, params=params, eos_ids=self.eos_ids,
                             max_model_len=self.max_model_len, detokenizer=detok,
                             stop_checker=StopChecker(list(params.stop), params.include_stop_str_in_output))

    # ---- out -------------------------------------------------------------------------------------------------------
    def on_tokens(self, request: Request, tokens: list[int], logprobs: list[TokenLogprob] | None,
                  finish: Callable[[Request, SequenceDelta], None]) -> SequenceDelta | None:
        """The tokens a step appended to `request`; `finish(request, delta)` ends a sequence that is done (the
        engine's hook into the scheduler) before its state is dropped. None for an unknown (ended) request."""
        entry = self._children.get(request.request_id)
        if entry is None:
            return None
        record, index = entry
        delta = record.samples[index].on_tokens(tokens, logprobs)  # type: ignore[union-attr]
        if delta.finished:
            finish(request, delta)
            self._forget(request.request_id)
        return delta

    def add_prompt_logprobs(self, child_id: str, entries: list[tuple[int, TokenLogprob]]) -> None:
        """Prompt-token scores a step computed for a sample (delivered with its first delta)."""
        entry = self._children.get(child_id)
        if entry is not None:
            entry[0].samples[entry[1]].add_prompt_logprobs(entries)  # type: ignore[union-attr]

    def abort(self, request_id: str) -> tuple[list[str], list[SequenceDelta]]:
        """End every live sample of a user request: (their scheduler ids, an "abort" delta for each)."""
        record = self._records.get(request_id)
        if record is None:
            return [], []
        ended = [(s.request.request_id, s.index) for s in record.samples if s is not None]
        for child_id, _ in ended:
            self._forget(child_id)
        return [c for c, _ in ended], [SequenceDelta(request_id, i, (), "", None, True, "abort") for _, i in ended]

    def fail(self, child_id: str, message: str) -> SequenceDelta | None:
        """End one sample with an error (a failed step); None if it already ended."""
        entry = self._children.get(child_id)
        if entry is None:
            return None
        record, index = entry
        self._forget(child_id)
        return SequenceDelta(record.request_id, index, (), "", None, True, "error", error=message)

    def _forget(self, child_id: str) -> None:
        """The one cleanup path: drop a sample, and its request once no sample is left."""
        record, index = self._children.pop(child_id)
        record.samples[index] = None
        if record.finished:
            del self._records[record.request_id]
