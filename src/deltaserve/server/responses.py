"""Pieces of OpenAI response bodies shared by the routes: usage, logprobs in both API shapes, SSE framing, ids."""

from __future__ import annotations

import json
import math
import uuid
from functools import lru_cache
from typing import Any

from deltaserve.outputs import TokenLogprob
from deltaserve.server.errors import error_body

DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI clients expect a number


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, code: str | None = None) -> str:
    """A failure after the 200 headers went out: an error event (the shape vLLM and OpenAI streams use)."""
    return sse(error_body(status, message, code=code))


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0,
          cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object. cached_tokens: the prompt tokens served from the prefix cache; reasoning_tokens: the
    tokens generated inside the reasoning block."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def _clamp(logprob: float) -> float:
    return _MIN_LOGPROB if math.isnan(logprob) or logprob < _MIN_LOGPROB else logprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (Qwen's tokenizers use it): character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenStrings:
    """Token id -> (text, UTF-8 bytes) for logprobs. A byte-level token that is part of a multi-byte character
    shows as U+FFFD in `text`; its `bytes` are exact, so clients can join them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): str(t) for i, t in added.items()}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            text = f"token_id:{token_id}"
            return text, list(text.encode())
        if token_id in self._added:
            text = self._added[token_id]
            return text, list(text.encode())
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if isinstance(piece, str) and piece and all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8", errors="replace"))


ID_STRINGS = TokenStrings(None)  # every token as "token_id:{id}"


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], strings: TokenStrings,
                  ) -> list[dict[str, Any]]:
    content = []
    for entry in entries:
        text, raw = strings.get(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            t, b = strings.get(token_id)
            top.append({"token": t, "logprob": _clamp(logprob), "bytes": b})
        content.append({"token": text, "logprob": _clamp(entry.logprob), "bytes": raw, "top_logprobs": top})
    return content


def completion_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], strings: TokenStrings,
                        offset: int) -> tuple[dict[str, Any], int]:
    """The legacy completions shape; `offset` is where this piece's text starts in the choice's text. Returns the
    piece and the offset after it. Each token has a top_logprobs entry (_legacy_top)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        text, _ = strings.get(entry.token_id)
        tokens.append(text)
        token_logprobs.append(_clamp(entry.logprob))
        offsets.append(offset)
        offset += len(text)
        tops.append(_legacy_top(entry, strings))
    piece = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
    return piece, offset


def _legacy_top(entry: TokenLogprob, strings: TokenStrings) -> dict[str, float]:
    """A token's top_logprobs in the legacy completions shape: the token itself (first) and its k most likely
    alternatives, so k + 1 entries when the token is not among them (OpenAI's legacy API documents up to
    logprobs + 1, and vLLM answers so); with logprobs=0 the token alone."""
    top = {entry.token_id: entry.logprob, **dict(entry.top)}
    return {strings.get(t)[0]: _clamp(lp) for t, lp in top.items()}


def prompt_completion_logprobs(prompt_ids: list[int], entries: tuple[TokenLogprob | None, ...],
                               strings: TokenStrings) -> tuple[dict[str, Any], int]:
    """The echoed prompt's piece of the legacy completions logprobs: one entry per prompt token, the first null
    (nothing predicts it), as OpenAI's legacy API and vLLM answer. Returns the piece and the text offset after it."""
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for token_id, entry in zip(prompt_ids, entries):
        text, _ = strings.get(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_clamp(entry.logprob))
        tops.append(_legacy_top(entry, strings))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


def vllm_prompt_logprobs(entries: tuple[TokenLogprob | None, ...], strings: TokenStrings) -> list[dict | None]:
    """vLLM's `prompt_logprobs` answer: per prompt token (null for the first: nothing predicts it) the token and its
    k most likely alternatives, {"token id": {"logprob", "rank", "decoded_token"}}; the alternatives' ranks are their
    places in that list."""
    def item(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _clamp(logprob), "rank": rank, "decoded_token": strings.get(token_id)[0]}

    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = {str(entry.token_id): item(entry.token_id, entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            ranked.setdefault(str(token_id), item(token_id, logprob, rank))
        out.append(ranked)
    return out


def merge_completion_logprobs(pieces: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not pieces:
        return None
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in pieces:
        for key in out:
            out[key] += p[key]
    return out
