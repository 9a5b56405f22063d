"""Per-request sampling parameters, in the shape vLLM users already know.

Pure Python (no torch import): the scheduler and the server read these and must never import torch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaserve.structured.spec import StructuredSpec

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; the sampler's top-k gather is sized by it
PENALTY_RANGE = 2.0  # OpenAI's documented range for presence/frequency penalties
# Below this, logits / temperature leaves float32's range (1e-46 gave NaN and token 0): such a temperature is greedy.
GREEDY_TEMPERATURE = 1e-5
# repetition_penalty divides (or multiplies) logits: within these bounds a logit stays far inside float range.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's documented range is [-100, 100]; 1e308 would make the logit inf
_COLLECTIONS = (list, tuple, set, frozenset)  # what `stop` / `stop_token_ids` may be given as (a str is one stop)
# The keys of generation_config.json that vLLM (--generation-config auto, its default) makes the defaults of requests
# that leave them out; Qwen3.5 ships its recommended sampling there
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

log = logging.getLogger(__name__)


def _check(cond: bool, name: str, value: object, valid: str) -> None:
    if not cond:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: expected {valid}")


def _is_int(value: object) -> bool:
    # bool is an int subclass; `max_tokens=True` is a bug in the caller, not a request for one token.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    temperature == 0 means greedy (argmax after penalties; top_k/top_p/min_p/seed are then irrelevant); a
    temperature below GREEDY_TEMPERATURE is stored as 0.
    top_k 0 or -1 disables top-k. logprobs=None returns no logprobs, 0 only the sampled token's, k>0 also the k
    most likely alternatives. prompt_logprobs (same values) returns the logprob of every prompt token but the first
    under the model, with its alternatives, as vLLM's option of that name does. max_tokens=None means "until the context window is full" (the engine caps it).
    structured: constrain the output to a JSON schema, regex, choice, grammar or tool call (StructuredSpec); the
    output then ends with an end token once the structure is complete, or at max_tokens ("length") before that.
    `stop` accepts a single string (or None) and is normalised to a list. Lists are copied, so the caller's later
    mutations do not leak in; the instance is never mutated afterwards (derive with dataclasses.replace).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these ids
    # vLLM's bad_words: words never to complete; the engine tokenizes them into bad_words_token_ids (a sequence's last
    # token is banned once the output ends with the rest of it), which may also be given directly
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._validate_sampling()
        self._validate_lengths()
        self._validate_stops()
        self._validate_outputs()
        self._validate_structured()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def reads_outputs(self) -> bool:
        """Whether sampling reads the tokens output so far: the penalties, a bad word of several tokens."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or \
            any(len(q) > 1 for q in self.bad_words_token_ids)

    def _normalise(self) -> None:
        # None (vLLM's default) means no stop strings, as it means no stop ids below
        stop = [self.stop] if isinstance(self.stop, str) else [] if self.stop is None else self.stop
        _check(isinstance(stop, _COLLECTIONS) and all(isinstance(s, str) for s in stop), "stop", self.stop,
               "a string or a list of strings")
        object.__setattr__(self, "stop", list(stop))
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        _check(isinstance(ids, _COLLECTIONS), "stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", list(ids))
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                   "a dict from token id to bias, or None")
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        words = [] if self.bad_words is None else self.bad_words
        _check(isinstance(words, _COLLECTIONS) and all(isinstance(w, str) and w.strip() for w in words), "bad_words",
               self.bad_words, "a list of words (non-blank strings)")
        object.__setattr__(self, "bad_words", list(words))
        seqs = self.bad_words_token_ids
        _check(isinstance(seqs, _COLLECTIONS) and all(isinstance(q, _COLLECTIONS) and q and
                                                       all(_is_int(t) and t >= 0 for t in q) for q in seqs),
               "bad_words_token_ids", seqs, "a list of non-empty lists of token ids >= 0")
        object.__setattr__(self, "bad_words_token_ids", [list(q) for q in seqs])
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, _COLLECTIONS), "allowed_token_ids", self.allowed_token_ids,
                   "a non-empty list of token ids >= 0, or None")
            object.__setattr__(self, "allowed_token_ids", list(self.allowed_token_ids))
        if _is_number(self.temperature) and 0 < self.temperature < GREEDY_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)

    def _validate_sampling(self) -> None:
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 means greedy)")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 to disable top-k")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        _check(_is_number(self.repetition_penalty) and low <= self.repetition_penalty <= high, "repetition_penalty",
               self.repetition_penalty, f"a number in [{low:g}, {high:g}] (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE, name, value,
                   f"a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                _check(_is_int(token_id) and token_id >= 0, "logit_bias", self.logit_bias,
                       "a dict whose keys are token ids >= 0")
                _check(_is_number(bias) and abs(bias) <= LOGIT_BIAS_LIMIT, "logit_bias", self.logit_bias,
                       f"a dict whose values are numbers in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        allowed = self.allowed_token_ids
        _check(allowed is None or (len(allowed) > 0 and all(_is_int(t) and t >= 0 for t in allowed)),
               "allowed_token_ids", allowed, "a non-empty list of token ids >= 0 (sampling picks among them), or None")

    def _validate_lengths(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               self.max_tokens, "an integer >= 1, or None for no limit")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "an integer >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               f"an integer <= max_tokens ({self.max_tokens})")

    def _validate_stops(self) -> None:
        _check(all(len(s) > 0 for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of token ids >= 0")

    def _validate_outputs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                   f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")

    def _validate_structured(self) -> None:
        if self.structured is None:
            return
        _check(isinstance(self.structured, StructuredSpec), "structured", self.structured,
               "a deltaserve.structured.StructuredSpec or None")
        # The grammar ends the output with an end token: ignoring it, or forbidding it early, leaves no valid token.
        _check(not self.ignore_eos, "ignore_eos", self.ignore_eos, "False when the output is constrained (structured)")
        _check(self.min_tokens == 0, "min_tokens", self.min_tokens, "0 when the output is constrained (structured)")


def generation_defaults(model_dir: str | None) -> dict[str, Any]:
    """The sampling defaults the checkpoint's generation_config.json sets (GENERATION_CONFIG_KEYS). A value that
    SamplingParams refuses is left out with a warning: it would fail every request that does not set its field."""
    path = Path(model_dir or "") / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if model_dir and path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): requests get no sampling defaults from it", path, e)
        return {}
    defaults = {}
    for key in GENERATION_CONFIG_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if value is None:
            continue
        try:
            SamplingParams(**{key: value})
        except ValueError as e:
            log.warning("%s: ignoring %s: %s", path, key, e)
            continue
        defaults[key] = value
    if defaults:
        log.info("sampling defaults from %s for requests that do not set them: %s", path, defaults)
    return defaults
