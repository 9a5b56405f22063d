"""The output side of one sequence (SequenceState): stop ids, stop strings, min_tokens and the text they leave, as
vLLM's SamplingParams document them."""

from __future__ import annotations

import pytest

from deltaserve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deltaserve.engine.output_processor import OutputProcessor, RequestError
from deltaserve.engine.request import Request
from deltaserve.engine.sequence import SequenceState
from deltaserve.outputs import SequenceDelta
from deltaserve.sampling_params import SamplingParams

EOS = 1


class CharTokenizer:
    """Token i decodes to chr(i) (EOS, a special token, to "<eos>" unless skipped): stop strings land exactly."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i == EOS and skip_special_tokens else "<eos>" if i == EOS else chr(i) for i in ids)


def sequence(params: SamplingParams) -> SequenceState:
    request = Request("r", [65, 66, 67], sampling_params=params)
    detok = IncrementalDetokenizer(CharTokenizer(), skip_special_tokens=params.skip_special_tokens)
    return SequenceState(request=request, parent_id="p", index=0, params=params, eos_ids=frozenset({EOS}),
                         max_model_len=100, detokenizer=detok,
                         stop_checker=StopChecker(params.stop, params.include_stop_str_in_output))


def run(params: SamplingParams, tokens: list[int]) -> tuple[str, list[SequenceDelta]]:
    """Feed tokens one step each (as the scheduler appends them) until the sequence ends: (text, deltas)."""
    state, deltas = sequence(params), []
    for token in tokens:
        state.request.output_token_ids.append(token)
        deltas.append(state.on_token(token, None))
        if deltas[-1].finished:
            break
    return "".join(d.text for d in deltas), deltas


def test_a_stop_string_ends_nothing_within_the_first_min_tokens() -> None:
    # The sampler suppresses stop ids at outputs 1..min_tokens; a stop string completed there must not end the
    # output either (vLLM checks stop strings only in text after the min_tokens-th token), else min_tokens=1 with
    # stop="\n" could still give an empty output.
    text, deltas = run(SamplingParams(min_tokens=1, stop=["\n"], max_tokens=10), [ord("\n"), ord("a"), ord("\n")])
    assert text == "\na" and len(deltas) == 3 and deltas[-1].stop_reason == "\n"
    text, deltas = run(SamplingParams(min_tokens=2, stop=["\n"], max_tokens=10), list(map(ord, "a\nb\nc")))
    assert text == "a\nb" and deltas[-1].finish_reason == "stop" and len(deltas) == 4
    # a stop string spanning the boundary counts once the token that completes it is past min_tokens
    text, deltas = run(SamplingParams(min_tokens=2, stop=["bc"], max_tokens=10), list(map(ord, "abcd")))
    assert text == "a" and len(deltas) == 3 and deltas[-1].stop_reason == "bc"


def test_include_stop_str_in_output_shows_the_stop_token_text() -> None:
    # vLLM renders the token that ended the output (a stop_token_ids entry, or EOS) only with
    # include_stop_str_in_output; text held back for a possible stop string comes out before it.
    ids = [ord("h"), ord("x"), ord("!"), ord("z")]
    for include, want in ((False, "hx"), (True, "hx!")):
        text, deltas = run(SamplingParams(stop=["xy"], stop_token_ids=[ord("!")], include_stop_str_in_output=include),
                           ids)
        assert (text, deltas[-1].stop_reason, len(deltas)) == (want, ord("!"), 3)
    text, deltas = run(SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False), [ord("a"), EOS])
    assert text == "a<eos>" and deltas[-1].finish_reason == "stop"
    text, _ = run(SamplingParams(include_stop_str_in_output=True), [ord("a"), EOS])  # EOS skipped as special
    assert text == "a"
    text, _ = run(SamplingParams(skip_special_tokens=False), [ord("a"), EOS])
    assert text == "a"


def test_stop_strings_without_a_tokenizer_are_refused() -> None:
    # Without a tokenizer no text exists to match: a stop string would be silently ignored, so the request is refused.
    outputs = OutputProcessor(None, frozenset({EOS}), max_model_len=100)
    with pytest.raises(RequestError, match="stop strings.*tokenizer"):
        outputs.new_children("a", [65, 66], SamplingParams(stop=["x"]))
    assert not outputs.num_live_samples and "a" not in outputs
    (child,) = outputs.new_children("a", [65, 66], SamplingParams(stop_token_ids=[7]))  # ids need no tokenizer
    assert child.request_id == "a"
