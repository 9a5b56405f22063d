from __future__ import annotations

import dataclasses

import pytest

from deltaserve.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs, p.logit_bias) == (None, 16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_stop_accepts_a_string_and_copies_lists() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    # None is vLLM's default for both (no stop strings / ids), so code written for vLLM may pass it explicitly
    p = SamplingParams(stop=None, stop_token_ids=None)  # type: ignore[arg-type]
    assert p.stop == [] and p.stop_token_ids == []
    stops = ["a", "b"]
    p = SamplingParams(stop=stops)
    stops.append("c")
    assert p.stop == ["a", "b"]


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert dataclasses.replace(p, temperature=0.5).temperature == 0.5


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("n", 0), ("n", 1.5),
    ("max_tokens", 0), ("max_tokens", -3),
    ("min_tokens", -1),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("logprobs", -1), ("logprobs", 21),
    ("seed", 1.5),
    ("stop", [""]), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["x"]), ("stop_token_ids", 7), ("stop_token_ids", "12"),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {3: float("nan")}), ("logit_bias", {"3": 1.0}), ("logit_bias", [1]),
    ("ignore_eos", "yes"),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", ["5"]), ("allowed_token_ids", 5),
    ("bad_words", [" "]), ("bad_words", "word"), ("bad_words", [3]),
    ("bad_words_token_ids", [[]]), ("bad_words_token_ids", [[-1]]), ("bad_words_token_ids", [5]),
])
def test_invalid_values_name_field_value_and_range(field: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert field in message and "expected" in message
    assert repr(value) in message or field in ("stop", "stop_token_ids", "logit_bias", "allowed_token_ids",
                                               "bad_words", "bad_words_token_ids")


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens.*max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=-1), dict(top_k=0), dict(top_k=1),
    dict(min_p=0.0), dict(min_p=1.0), dict(presence_penalty=-2.0), dict(frequency_penalty=2.0),
    dict(logprobs=0), dict(logprobs=20), dict(seed=-5), dict(max_tokens=None), dict(logit_bias={0: -100}),
])
def test_boundary_values_are_valid(kwargs: dict) -> None:
    SamplingParams(**kwargs)
