"""Streaming text out of token ids: an incremental detokenizer and a stop-string checker.

Both are pure Python over strings (no torch); one instance of each lives with each request's output stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of a transformers tokenizer the detokenizer uses."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, one call per new token (or several).

    Decodes a short window of recent ids, not the whole sequence (the prefix/read offset technique of TGI and
    vLLM): `prefix_offset` is where the window starts, `read_offset` where the already-emitted text ends. The
    delta is decode(ids[prefix:]) minus decode(ids[prefix:read]); both windows start at a point where the
    emitted text ended on a whole character, so decoding one does not depend on the bytes before it.

    While the window's text ends with U+FFFD (a byte-level token split a multi-byte character) nothing is
    emitted; `flush()` releases such a tail when the sequence ends, so the concatenation of all deltas plus
    flush() equals tokenizer.decode(all_ids, skip_special_tokens=...) for byte-level tokenizers like Qwen's.
    (A tokenizer whose decode rewrites text across token boundaries, e.g. clean_up_tokenization_spaces=True,
    cannot be streamed exactly by any method that never retracts text.)
    """

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text: str | None = ""  # decode(ids[prefix:read]); None until computed for new offsets

    @property
    def token_ids(self) -> Sequence[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        """Append one token id; return the text that is now safe to show (possibly "")."""
        return self.extend((token_id,))

    def extend(self, token_ids: Iterable[int]) -> str:
        """Append several ids (e.g. accepted speculative tokens) and decode once."""
        self._ids.extend(int(t) for t in token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """The held-back tail (an incomplete character, or a real U+FFFD): call once when the sequence ends."""
        return self._delta(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text):
            return ""  # only skipped special tokens (or empty tokens) so far: nothing new to show
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # maybe half a character; the next token may complete it
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return delta


class StopResult(NamedTuple):
    """text: safe to emit now; stopped: a stop string matched (emit `text`, then finish); matched: which one."""

    text: str
    stopped: bool
    matched: str | None


class StopChecker:
    """Finds stop strings in streamed text, even across delta boundaries, and decides what may be shown.

    Without include_stop_str_in_output, any tail that could still grow into a stop string is held back, so a
    client never sees the start of a stop string that then matches; with it, text streams out at once (a match
    only ends the output after the stop string, and everything shown before is part of the final text).
    When several stop strings occur, the one that completes first wins (the longest, on a tie), so the result
    does not depend on how the text was split into deltas.

    One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest suffix of the text so
    far that is a prefix of that string, carried across deltas. Memory is linear in the stop strings (their failure
    tables are shared by every checker of the process), held text is shorter than the longest stop string, and each
    character costs amortised O(1) per stop string, whatever the strings are.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._fail = [self._failure_table(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # matched prefix length per stop string
        self._held = ""  # not yet emitted (always a suffix of the text, at most the longest partial match)
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str, can_stop: bool = True) -> StopResult:
        """can_stop=False (an output still short of min_tokens): a stop string completed in this text does not end
        the output, though text that may begin one is still held back, as it may complete once stops count."""
        if self.stopped:
            return StopResult("", True, self.matched)
        if not self.stop:
            return StopResult(delta, False, None)
        text = self._held + delta
        base = len(self._held)
        for i, ch in enumerate(delta):
            done = self._advance(ch)
            if done is not None and can_stop:
                end = base + i + 1
                emit_end = end if self.include_stop_str_in_output else end - len(done)
                self.stopped, self.matched, self._held = True, done, ""
                return StopResult(text[:max(emit_end, 0)], True, done)
        hold = 0 if self.include_stop_str_in_output else max(self._state)
        emit_end = len(text) - hold
        self._held = text[emit_end:]
        return StopResult(text[:emit_end], False, None)

    def finish(self) -> str:
        """No more text is coming (eos, max_tokens, ...): release whatever was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _advance(self, ch: str) -> str | None:
        """Step every automaton over one character; the stop string completed by it (the longest, on a tie)."""
        done: str | None = None
        for k, stop_str in enumerate(self.stop):
            q = self._state[k]
            fail = self._fail[k]
            while q and stop_str[q] != ch:
                q = fail[q - 1]
            if stop_str[q] == ch:
                q += 1
            if q == len(stop_str):
                if done is None or len(stop_str) > len(done):
                    done = stop_str
                q = fail[q - 1]
            self._state[k] = q
        return done


    _TABLES: dict[str, tuple[int, ...]] = {}  # stop string -> failure table, shared by all checkers
    _MAX_TABLES = 1024

    @classmethod
    def _failure_table(cls, s: str) -> tuple[int, ...]:
        """KMP: table[i] is the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
        table = cls._TABLES.get(s)
        if table is not None:
            return table
        out = [0] * len(s)
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = out[k - 1]
            if s[i] == s[k]:
                k += 1
            out[i] = k
        if len(cls._TABLES) >= cls._MAX_TABLES:
            cls._TABLES.clear()  # a bounded cache: distinct stop strings are few in practice
        table = cls._TABLES[s] = tuple(out)
        return table
