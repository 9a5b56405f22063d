"""StructuredOutputs: the engine's matchers, one per constrained sequence (each of n samples has its own), and the
bitmask of a step built from them. Host-only; runs on the engine thread.

A matcher holds the grammar state after exactly the tokens appended to its sequence: it advances when a step's
tokens are resolved (after the stop checks, with the tokens kept), never when a step is launched. Preemption
recomputes tokens already appended, so it changes nothing here. Speculative decoding will check drafts with the
same matchers (llguidance: validate_tokens / rollback, and masks for every draft position in one call), which is
why GrammarMask names logits rows rather than requests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltaserve.engine.step_input import GrammarMask, SamplingRequest
from deltaserve.structured.compiler import GrammarCompiler
from deltaserve.structured.spec import StructuredSpec

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    matcher: Any  # llguidance.LLMatcher
    num_tokens: int = 0  # tokens consumed: must equal the sequence's output tokens when a step samples for it


class StructuredOutputs:
    """Owns the matchers of live constrained sequences and the executor that fills masks in parallel."""

    def __init__(self, compiler: GrammarCompiler, num_threads: int | None = None) -> None:
        self.compiler = compiler
        self._num_threads = num_threads
        self._executor: Any = None
        self._sequences: dict[str, _Sequence] = {}
        self.words = (compiler.vocab_size + 31) // 32

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._sequences

    def add(self, request_ids: Sequence[str], spec: StructuredSpec) -> None:
        """Matchers for new sequences of one request (compiled on the caller's thread if not cached)."""
        compiled = self.compiler.compile(spec)
        for rid in request_ids:
            self._sequences[rid] = _Sequence(compiled.new_matcher())

    def remove(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._sequences.pop(rid, None)

    def advance(self, request_id: str, tokens: Sequence[int]) -> str | None:
        """Feed the tokens a step appended to a sequence; the grammar's error if one is refused (None: fine)."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        for token in tokens:
            if not seq.matcher.consume_token(token):
                return f"the output left its grammar at token {token}: {seq.matcher.get_error()[:300]}"
            seq.num_tokens += 1
        return None

    def fill(self, sampling: Sequence[SamplingRequest]) -> GrammarMask | None:
        """The mask of a step's constrained rows (None if none is constrained). A row whose sequence ended meanwhile
        (its token will be dropped) is left open; a row whose grammar allows nothing gets the end tokens only, so
        that the sampler always has a token to pick."""
        rows, targets = [], []
        row = 0
        for s in sampling:
            if s.params.structured is not None:
                seq = self._sequences.get(s.request_id)
                if seq is not None and seq.num_tokens != s.num_output_tokens:
                    raise RuntimeError(f"request {s.request_id!r}: its matcher saw {seq.num_tokens} tokens, the step "
                                       f"samples after {s.num_output_tokens}")
                targets.append((seq.matcher if seq is not None else None, len(rows)))
                rows.append(row)
            row += s.num_logits_rows
        if not rows:
            return None
        bitmask = np.full((len(rows), self.words), -1, dtype=np.int32)
        live = [(m, k) for m, k in targets if m is not None]
        if live:
            self._fill(live, bitmask)
        self._allow_end_where_empty(bitmask)
        return GrammarMask(np.asarray(rows, dtype=np.int64), bitmask)

    def _fill(self, matchers: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
        import llguidance
        import llguidance.numpy

        if len(matchers) == 1:  # the thread pool costs more than it saves for one row
            matcher, k = matchers[0]
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, k)
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._num_threads)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, bitmask)

    def _allow_end_where_empty(self, bitmask: np.ndarray) -> None:
        empty = np.flatnonzero(~bitmask.any(axis=1))
        for k in empty:
            log.warning("a grammar allowed no token; ending that output")
            for token in self.compiler.eos_token_ids:
                bitmask[k, token >> 5] |= np.int32(np.uint32(1 << (token & 31)).view(np.int32))
