from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deltaserve.engine.detokenizer import IncrementalDetokenizer, StopChecker

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 你好 🙂 naïve café ñandú 日本語のテキスト 😀👍 Ωμέγα",
    "hello world, the quick brown fox jumps over the lazy dog. 1234567890",
    "<|im_start|>user\nwhat is 你好?<|im_end|>\n<|im_start|>assistant\n",
]
TEXTS = [
    "héllo wörld 你好 🙂",
    "<|im_start|>assistant\n日本語 😀👍 café<|im_end|>",
    "naïve 🙂🙂 Ωμέγα ñandú, the fox",
    "🙂",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE uses as its base alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def _byte_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte, so every multi-byte character is split across tokens."""
    table = _bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in text.encode("utf-8")]


def _stream(tokenizer: PreTrainedTokenizerFast, ids: list[int], skip: bool) -> str:
    """Feed ids one by one, checking every step, and return the concatenated deltas."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    emitted = ""
    for i, token_id in enumerate(ids):
        emitted += detok.add(token_id)
        so_far = tokenizer.decode(ids[: i + 1], skip_special_tokens=skip)
        # Never ahead of (or different from) the decode of what exists now ...
        assert so_far.startswith(emitted), (ids[: i + 1], emitted, so_far)
        # ... and never behind it without cause: only an undecodable tail may be held back.
        if "\ufffd" not in so_far:
            assert emitted == so_far
    return emitted + detok.flush()


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encoded_text_round_trips(tokenizer: PreTrainedTokenizerFast, text: str, skip: bool) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert _stream(tokenizer, ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_split_multibyte_characters_are_held_until_complete(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    text = "aé你🙂b"
    ids = _byte_ids(tokenizer, text)
    assert len(ids) == 1 + 2 + 3 + 4 + 1
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in ids]
    assert deltas == ["a", "", "é", "", "", "你", "", "", "", "🙂", "b"]
    assert detok.flush() == ""


def test_mixed_byte_merged_and_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    special_ids = tokenizer.convert_tokens_to_ids(SPECIALS)
    for _ in range(50):
        ids: list[int] = []
        for word in rng.sample("héllo wörld 你好 🙂 日本語 😀👍 fox".split(" "), 5):
            piece = _byte_ids(tokenizer, word) if rng.random() < 0.5 else tokenizer.encode(word)
            ids += piece
            if rng.random() < 0.3:  # a special token in the middle of a split character
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special_ids))
        for skip in (True, False):
            assert _stream(tokenizer, ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        assert _stream(tokenizer, ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_flush_releases_an_incomplete_tail(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _byte_ids(tokenizer, "ok 你")[:-1]  # the last character misses its final byte
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add(t) for t in ids)
    assert streamed == "ok "
    tail = detok.flush()
    assert streamed + tail == tokenizer.decode(ids) and tail.endswith("\ufffd")
    assert detok.flush() == ""


def test_extend_matches_add(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(TEXTS[1]) + _byte_ids(tokenizer, "你好🙂") + tokenizer.encode(TEXTS[0])
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.extend(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert list(detok.token_ids) == ids


class _CountingTokenizer:
    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.window_sizes.append(len(token_ids))
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_bounded_window(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = (tokenizer.encode(" ".join(CORPUS)) + _byte_ids(tokenizer, "你好🙂")) * 10
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 300 and max(counting.window_sizes) <= 7  # a 3-byte char, then a 4-byte one held over 4 tokens
    assert len(counting.window_sizes) <= 2 * len(ids) + 1


# ---- StopChecker --------------------------------------------------------------------------------------------------

def _feed_all(checker: StopChecker, deltas: list[str]) -> tuple[list[str], bool, str | None]:
    parts = []
    for delta in deltas:
        result = checker.feed(delta)
        parts.append(result.text)
        if result.stopped:
            return parts, True, result.matched
    parts.append(checker.finish())
    return parts, False, None


def test_stop_split_over_deltas_is_never_partially_shown() -> None:
    parts, stopped, matched = _feed_all(StopChecker(["STOP"]), ["abc S", "TO", "P tail"])
    assert parts == ["abc ", "", ""] and stopped and matched == "STOP"


def test_stop_split_over_deltas_included() -> None:
    parts, stopped, matched = _feed_all(StopChecker(["STOP"], include_stop_str_in_output=True),
                                        ["abc S", "TO", "P tail"])
    assert "".join(parts) == "abc STOP" and stopped and matched == "STOP"
    assert parts[0] == "abc S"  # with the stop string shown anyway, nothing needs holding back


def test_overlapping_partial_matches() -> None:
    assert _feed_all(StopChecker(["ab"]), list("aab")) == (["", "a", ""], True, "ab")
    assert _feed_all(StopChecker(["ab"]), ["aab"]) == (["a"], True, "ab")
    assert _feed_all(StopChecker(["aab"]), list("aaab")) == (["", "", "a", ""], True, "aab")
    assert _feed_all(StopChecker(["abab"]), ["abaa", "babx"]) == (["aba", ""], True, "abab")


def test_first_completed_stop_wins_then_longest() -> None:
    assert _feed_all(StopChecker(["world", "or"]), ["hello world"])[0] == ["hello w"]
    assert _feed_all(StopChecker(["bc", "abc"]), ["xab", "cd"]) == (["x", ""], True, "abc")
    assert _feed_all(StopChecker(["bc", "abc"], True), ["xab", "cd"]) == (["xab", "c"], True, "abc")


def test_no_match_releases_everything_on_finish() -> None:
    checker = StopChecker(["world"])
    assert checker.feed("hello wor").text == "hello "
    assert checker.finish() == "wor"
    assert _feed_all(StopChecker([]), ["a", "b"]) == (["a", "b", ""], False, None)


def test_after_a_stop_nothing_more_comes_out() -> None:
    checker = StopChecker(["x"])
    assert checker.feed("ax").stopped
    assert checker.feed("more") == ("", True, "x") and checker.finish() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, neg_len, stop = min(hits)
    return text[: end if include else end + neg_len], stop


@pytest.mark.parametrize("include", [False, True])
def test_result_does_not_depend_on_chunking(include: bool) -> None:
    rng = random.Random(2)
    for _ in range(400):
        text = "".join(rng.choice("ab你") for _ in range(rng.randrange(0, 14)))
        stops = ["".join(rng.choice("ab你") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(1, max(len(text), 1)), rng.randrange(0, max(len(text) - 1, 1))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        parts, stopped, matched = _feed_all(StopChecker(stops, include), deltas)
        expected, expected_stop = _reference(text, stops, include)
        assert ("".join(parts), matched) == (expected, expected_stop), (text, stops, deltas, parts)
        assert stopped == (expected_stop is not None)
