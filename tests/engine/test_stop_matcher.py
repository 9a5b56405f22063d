"""StopChecker as a linear matcher (issue 20, item 9): the same answers as a brute-force search over the whole text,
for every way of splitting the text into deltas, in memory linear in the stop strings."""

from __future__ import annotations

import random
import sys

from deltaserve.engine.detokenizer import StopChecker


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The whole text at once: the stop string that ends first wins (the longest on a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            best = max(done, key=len)
            return text[:end] if include else text[:end - len(best)], best
    return text, None


def _streamed(text: str, stops: list[str], include: bool, cuts: list[int]) -> tuple[str, str | None, int]:
    checker = StopChecker(stops, include)
    shown, held_max, prev = "", 0, 0
    for cut in [*cuts, len(text)]:
        result = checker.feed(text[prev:cut])
        prev = cut
        shown += result.text
        held_max = max(held_max, len(checker._held))
        if result.stopped:
            return shown, result.matched, held_max
    return shown + checker.finish(), None, held_max


def test_matches_a_brute_force_search_for_any_split():
    rnd = random.Random(20)
    for trial in range(3000):
        alphabet = "ab" if trial % 2 else "abc"
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        stops = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 6))) for _ in range(rnd.randint(1, 4))]
        include = rnd.random() < 0.5
        cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(0, 8))))
        shown, matched, held_max = _streamed(text, stops, include, cuts)
        assert (shown, matched) == _reference(text, stops, include), (text, stops, include, cuts)
        assert held_max < max(map(len, stops))  # never more than a partial match is held back


def test_memory_is_linear_in_the_stop_strings():
    """The old checker kept every prefix of every stop string per sequence: a 30 KiB stop list with n = 4 cost
    1.7 GiB. Now a checker holds one int per stop string, and the failure tables are shared."""
    stops = ["ab" * 4000 + "c", "x" * 8000]
    first, second = StopChecker(stops), StopChecker(stops)
    assert all(a is b for a, b in zip(first._fail, second._fail))
    per_checker = sys.getsizeof(second._state) + sum(sys.getsizeof(s) for s in second._state)
    assert per_checker < 1024
    assert first.feed("ab" * 5000).text == "ab" * 1000  # held: the 8000 characters that may still become a stop
    assert first.feed("c").stopped and first.matched == stops[0]
