"""Tokenizing prompts without paying for text far beyond the context window.

A prompt longer than the model's context is refused anyway, yet tokenizing it whole costs time and memory in
proportion to its size (a 50 MB body took 88 s and 11.6 GiB). `encode_bounded` tokenizes a prefix first, growing it
geometrically, and stops as soon as a prefix alone has more tokens than the context can hold; a prompt that fits is
tokenized exactly once more, whole, so its ids are exactly the tokenizer's.
"""

from __future__ import annotations

from typing import Any

from deltaserve.server.errors import APIError, bad_request

_FIRST_WINDOW_CHARS = 64 * 1024  # prompts up to this size are tokenized once, as before
_CHARS_PER_TOKEN_GUESS = 8  # a window of 8 characters per allowed token almost always settles it in one probe
# Cutting text can change how its last few characters tokenize; a prefix counts as too long only with this margin.
_BOUNDARY_SLACK = 16


def encode_bounded(tokenizer: Any, text: str, max_tokens: int, *, add_special_tokens: bool, field: str) -> list[int]:
    """`tokenizer.encode(text)`, or a context_length_exceeded 400 for `field` once a prefix of text is known to have
    more than max_tokens tokens."""
    window = max(_FIRST_WINDOW_CHARS, _CHARS_PER_TOKEN_GUESS * max_tokens)
    while len(text) > window:
        count = len(tokenizer.encode(text[:window], add_special_tokens=add_special_tokens)) - _BOUNDARY_SLACK
        if count > max_tokens:
            raise context_exceeded(field, f"at least {count}", max_tokens + 1)
        window *= 4
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def kept_prompt_tokens(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many of a prompt's last tokens a request keeps (vLLM's `truncate_prompt_tokens`: k, or -1 for the whole
    context); None: the prompt is not truncated."""
    k = truncate_prompt_tokens
    if k is None:
        return None
    if k == 0 or k < -1:
        raise bad_request(f"'truncate_prompt_tokens' is {k}; use an integer >= 1 (keep the prompt's last k tokens) or "
                          "-1 (as many as the context holds)", param="truncate_prompt_tokens")
    if k > max_model_len:
        raise bad_request(f"'truncate_prompt_tokens' is {k} but this model's context is {max_model_len} tokens; use at "
                          f"most {max_model_len}, or -1", param="truncate_prompt_tokens")
    return max_model_len if k == -1 else k


def encode_prompt(tokenizer: Any, text: str, max_tokens: int, keep: int | None, *, add_special_tokens: bool,
                  field: str) -> list[int]:
    """encode_bounded's ids, or with `keep` the last keep of the whole text's ids (a truncated prompt is tokenized
    whole, within the server's body size limit, since its end is what stays)."""
    if keep is None:
        return encode_bounded(tokenizer, text, max_tokens, add_special_tokens=add_special_tokens, field=field)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)[-keep:]


def context_exceeded(field: str, tokens: str, max_model_len: int) -> APIError:
    return bad_request(f"'{field}' is {tokens} tokens but this model's context is {max_model_len} tokens; shorten it",
                       param=field, code="context_length_exceeded")
