"""The cache manager: allocations per request, reference-counted pages shared through a prefix match, the state
copy a match brings, and pools back to full after every kind of end."""

from __future__ import annotations

import random

import pytest

from deltaserve.cache.allocator import PageAllocator, pages_for_tokens
from deltaserve.cache.manager import CacheManager, PageCopy, StateCopy


def test_page_geometry_is_one_formula() -> None:
    assert [pages_for_tokens(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert CacheManager(num_pages=4, num_slots=1, page_size=16).pages_needed(17) == 2


def test_shared_pages_return_when_the_last_holder_frees() -> None:
    pool = PageAllocator(4)
    a = pool.allocate(2)
    pool.share(a)
    assert pool.ref_count(a[0]) == 2 and pool.free(a) == [] and pool.num_free == 2
    assert sorted(pool.free(a)) == sorted(a) and pool.num_free == 4
    with pytest.raises(ValueError, match="not allocated"):
        pool.share([0])
    b = pool.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        pool.free(b + b)  # two drops of a page held once: nothing is freed
    assert pool.ref_count(b[0]) == 1


def test_admit_grow_free() -> None:
    cache = CacheManager(num_pages=6, num_slots=2, page_size=4)
    a = cache.admit("a", 5)
    assert len(a.pages) == 2 and cache.num_free_pages == 4 and a.state_copy is None
    assert cache.grow("a", 8) and len(a.pages) == 2
    assert cache.grow("a", 9) and len(a.pages) == 3
    assert not cache.grow("a", 100) and len(a.pages) == 3  # too few free: nothing allocated
    with pytest.raises(ValueError, match="already holds"):
        cache.admit("a", 1)
    cache.admit("b", 12)
    assert not cache.can_admit(1)  # no slot left
    with pytest.raises(ValueError, match="can_admit"):
        cache.admit("c", 1)
    cache.free("a")
    cache.free("b")
    cache.free("unknown")
    assert cache.is_empty()


def test_a_checkpoint_shares_its_pages_and_brings_its_state_and_partial_page() -> None:
    cache = CacheManager(num_pages=16, num_slots=3, page_size=4, num_checkpoints=2)
    tokens = list(range(100, 120))
    owner = cache.admit("owner", 10)
    pending = cache.reserve_checkpoint("owner", tokens, 10)  # 2 full pages + 2 tokens of the third
    assert pending.snapshot == StateCopy(owner.slot, pending.checkpoint.slot) and pending.checkpoint.slot >= 3
    assert cache.match_prefix(tokens).num_tokens == 0  # not launched yet: not matchable
    cache.publish(pending)
    assert cache.reserve_checkpoint("owner", tokens, 10) is None  # the same prefix twice: kept once
    match = cache.match_prefix(tokens[:15])
    assert (match.num_tokens, match.pages, match.partial_page) == (10, tuple(owner.pages[:2]), owner.pages[2])
    assert cache.match_prefix(tokens[:10]).num_tokens == 0  # one token at least is left to compute
    assert cache.match_prefix([1] + tokens[1:]).num_tokens == 0
    hit = cache.admit("hit", 15, match)
    assert hit.pages[:2] == owner.pages[:2] and hit.pages[2] != owner.pages[2]
    assert hit.state_copy == StateCopy(pending.checkpoint.slot, hit.slot)
    assert hit.page_copy == PageCopy(owner.pages[2], hit.pages[2])
    cache.free("owner")  # the checkpoint and "hit" still hold the shared pages
    cache.free("hit")
    assert cache.is_empty() and cache.num_checkpoints == 1 and cache.num_free_pages == 16 - 3
    cache.reset_prefix_cache()
    assert cache.is_empty() and cache.num_free_pages == 16


def test_checkpoints_are_evicted_for_pages_and_slots_by_value() -> None:
    cache = CacheManager(num_pages=8, num_slots=2, page_size=4, num_checkpoints=2, state_tokens=8)
    for i, length in enumerate((8, 4)):
        cache.admit(f"r{i}", length)
        cache.publish(cache.reserve_checkpoint(f"r{i}", list(range(i * 100, i * 100 + 8)), length))
        cache.free(f"r{i}")
    assert cache.num_checkpoints == 2 and cache.num_free_pages == 8 - 3
    cache.admit("third", 8)  # a third checkpoint needs a slot: the least valuable goes (the shorter, as old)
    cache.publish(cache.reserve_checkpoint("third", list(range(300, 308)), 8))
    assert sorted(c.position for c in cache._index.checkpoints) == [8, 8]
    assert cache.stats()["checkpoint_evictions"] == 1
    assert cache.grow("third", 4 * 7)  # pages run short: checkpoints give theirs up
    assert cache.stats()["checkpoint_evictions"] >= 2
    cache.free("third")
    cache.reset_prefix_cache()
    assert cache.is_empty() and cache.num_free_pages == 8


def test_a_cancelled_reservation_gives_everything_back() -> None:
    cache = CacheManager(num_pages=4, num_slots=1, page_size=4, num_checkpoints=1)
    cache.admit("a", 8)
    pending = cache.reserve_checkpoint("a", list(range(8)), 8)
    cache.cancel(pending)
    cache.free("a")
    assert cache.is_empty() and cache.num_free_pages == 4 and cache.num_checkpoints == 0


def test_random_admissions_checkpoints_and_ends_leave_the_pools_full() -> None:
    rng = random.Random(0)
    cache = CacheManager(num_pages=40, num_slots=6, page_size=4, num_checkpoints=5)
    base = [rng.randrange(50) for _ in range(64)]
    live: dict[str, tuple[list[int], int]] = {}
    for i in range(2000):
        op = rng.random()
        if op < 0.35:
            tokens = base[:rng.randint(1, 40)] + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
            match = cache.match_prefix(tokens)
            n = min(len(tokens), match.num_tokens + rng.randint(1, 12))
            if cache.can_admit(n, match):
                cache.admit(f"r{i}", n, match)
                live[f"r{i}"] = (tokens, n)
        elif op < 0.6 and live:
            rid = rng.choice(sorted(live))
            tokens, n = live[rid]
            n = min(len(tokens), n + rng.randint(1, 8))
            if cache.grow(rid, n):
                live[rid] = (tokens, n)
            else:
                cache.free(rid)  # what a preemption does
                del live[rid]
        elif op < 0.8 and live:
            rid = rng.choice(sorted(live))
            tokens, n = live[rid]
            pending = cache.reserve_checkpoint(rid, tokens, n)
            if pending is not None:
                (cache.publish if rng.random() < 0.9 else cache.cancel)(pending)
        elif live:
            rid = rng.choice(sorted(live))
            cache.free(rid)
            del live[rid]
        used = {p for rid in live for p in cache.allocation(rid).pages} | {
            p for c in cache._index.checkpoints for p in c.pages}
        assert cache.num_free_pages == cache.num_pages - len(used)
    for rid in list(live):
        cache.free(rid)
    assert cache.is_empty()
    cache.reset_prefix_cache()
    assert cache.num_free_pages == cache.num_pages and cache.num_checkpoints == 0


# ---- eviction order and admission under pressure -------------------------------------------------------------------
def _checkpoint(cache: CacheManager, rid: str, tokens: list[int], position: int, generated: bool = False) -> None:
    pending = cache.reserve_checkpoint(rid, tokens, position, generated=generated)
    if pending is not None:
        cache.publish(pending)


def _turn(cache: CacheManager, rid: str, prompt: list[int], rng: random.Random, reply_len: int = 4
          ) -> tuple[int, list[int]]:
    """One chat turn as the scheduler runs it: admit on the longest match, checkpoint the last prompt position,
    generate, checkpoint the end of the generation, end. Returns the matched tokens and prompt + reply."""
    cache.tick += 1
    match = cache.match_prefix(prompt, rid)
    cache.admit(rid, len(prompt), match)
    _checkpoint(cache, rid, prompt, len(prompt) - 1)
    sequence = prompt + [rng.randrange(50) for _ in range(reply_len)]
    cache.tick += 1
    assert cache.grow(rid, len(sequence))
    _checkpoint(cache, rid, sequence, len(sequence) - 1, generated=True)
    cache.free(rid)
    return match.num_tokens, sequence


def _chat(num_checkpoints: int, rewrite: bool, conversations: int = 4, turns: int = 6) -> list[list[int]]:
    """Conversations returning in a fixed cycle at concurrency 1; the tokens each turn resumed with, round by round.
    rewrite: the next prompt drops the start of the reply (a template rewriting history, as Qwen3.5 drops past
    <think> blocks), so only the prompt checkpoint can match."""
    rng = random.Random(0)
    cache = CacheManager(num_pages=400, num_slots=2, page_size=4, num_checkpoints=num_checkpoints)
    prompts = [[rng.randrange(50) for _ in range(40)] for _ in range(conversations)]
    rounds = []
    for turn in range(turns):
        matched = []
        for c in range(conversations):
            got, sequence = _turn(cache, f"c{c}t{turn}", prompts[c], rng)
            matched.append(got)
            kept = prompts[c] + sequence[len(prompts[c]) + 2:] if rewrite else sequence
            prompts[c] = kept + [rng.randrange(50) for _ in range(8)]
        rounds.append(matched)
    assert cache.is_empty()
    cache.reset_prefix_cache()
    assert cache.is_empty() and cache.num_free_pages == cache.num_pages
    return rounds


def test_eviction_order_is_superseded_then_end_of_generation_then_resume_point() -> None:
    rng = random.Random(0)
    cache = CacheManager(num_pages=64, num_slots=2, page_size=4, num_checkpoints=8)
    _, first = _turn(cache, "t1", [rng.randrange(50) for _ in range(20)], rng)  # checkpoints at 19, 23
    matched, _ = _turn(cache, "t2", first + [rng.randrange(50) for _ in range(8)], rng)  # at 31, 35
    assert matched == 23  # the second turn resumed from the end of the first's generation
    evicted = []
    while cache.num_checkpoints:
        before = {c.position for c in cache._index.checkpoints}
        assert cache._evict_one()
        evicted += before - {c.position for c in cache._index.checkpoints}
    # 19 and 23 are superseded (turn 2 went past both on their one path); 35 only extends 31 by the reply, which
    # a template may drop from the next prompt; 31 is the one resume point left
    assert evicted == [19, 23, 35, 31]
    assert cache.is_empty() and cache.num_free_pages == 64


def test_an_end_of_generation_does_not_evict_a_resume_point() -> None:
    rng = random.Random(1)
    cache = CacheManager(num_pages=64, num_slots=2, page_size=4, num_checkpoints=2)
    _, first = _turn(cache, "a", [rng.randrange(50) for _ in range(20)], rng)  # a's prompt and end of generation
    cache.admit("b", 20)
    _checkpoint(cache, "b", [rng.randrange(50) for _ in range(20)], 19)  # evicts a's end of generation
    assert sorted(c.position for c in cache._index.checkpoints) == [19, 19]
    assert cache.grow("b", 24)
    assert cache.reserve_checkpoint("b", list(range(24)), 23, generated=True) is None  # refused, nothing evicted
    assert cache.num_checkpoints == 2 and cache.stats()["checkpoint_evictions"] == 1
    cache.free("b")
    assert cache.is_empty()


@pytest.mark.parametrize("rewrite", [False, True])
def test_chat_with_one_checkpoint_per_conversation_hits_every_return(rewrite: bool) -> None:
    """4 slots for 4 conversations (each turn takes 2 checkpoints): recency alone evicted every conversation's
    checkpoints just before it returned."""
    for matched in _chat(num_checkpoints=4, rewrite=rewrite)[1:]:
        assert all(matched)


@pytest.mark.parametrize("rewrite", [False, True])
def test_a_pool_smaller_than_the_conversations_keeps_some_until_they_return(rewrite: bool) -> None:
    """3 slots, 4 conversations in a cycle: once a miss shows how long conversations take to return, new
    checkpoints no longer push out the younger ones, and 3 of the 4 keep hitting."""
    rounds = _chat(num_checkpoints=3, rewrite=rewrite)
    assert [sum(map(bool, m)) for m in rounds[2:]] == [3] * (len(rounds) - 2)


def test_a_shared_prefix_outlives_the_requests_that_resume_from_it() -> None:
    rng = random.Random(2)
    cache = CacheManager(num_pages=200, num_slots=2, page_size=4, num_checkpoints=3)
    system = [rng.randrange(50) for _ in range(32)]
    for i in range(8):
        prompt = system + [rng.randrange(50) for _ in range(rng.randint(4, 12))]
        cache.tick += 1
        match = cache.match_prefix(prompt, f"r{i}")
        assert match.num_tokens == (32 if i else 0)
        cache.admit(f"r{i}", len(prompt), match)
        _checkpoint(cache, f"r{i}", prompt, 32)  # the system prompt's cache point
        _checkpoint(cache, f"r{i}", prompt, len(prompt) - 1)
        assert cache.grow(f"r{i}", len(prompt) + 4)
        _checkpoint(cache, f"r{i}", prompt + [1, 2, 3, 4], len(prompt) + 3, generated=True)
        cache.free(f"r{i}")
    assert cache.is_empty()
