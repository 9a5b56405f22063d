"""The cache manager: allocations per request, reference-counted pages shared through a prefix match, the state
copy a match brings, and pools back to full after every kind of end."""

from __future__ import annotations

import random

import pytest

from deltaserve.cache.allocator import PageAllocator, pages_for_tokens
from deltaserve.cache.manager import DEMOTED_TICKS, EFFICIENCY_WEIGHT, CacheManager, PageCopy, StateCopy


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


def test_a_reserve_counts_checkpoint_pages_as_room_and_evicts_nothing_it_cannot_meet() -> None:
    """can_admit's reserve: pages that must stay free or be held by checkpoints alone (evicted later, when taken).
    One it cannot meet refuses the admission and evicts nothing, so the prefix cache outlives a refused one."""
    cache = CacheManager(num_pages=8, num_slots=2, page_size=4, num_checkpoints=2, state_tokens=8)
    cache.admit("r", 8)
    cache.publish(cache.reserve_checkpoint("r", list(range(8)), 8))
    cache.free("r")  # its checkpoint keeps its 2 pages: 6 free, 2 held by the checkpoint alone
    assert cache.num_free_pages == 6 and cache.num_checkpoints == 1
    assert not cache.can_admit(4, reserve=8) and cache.num_checkpoints == 1  # 1 + 8 > 6 + 2: nothing evicted
    assert cache.can_admit(4, reserve=7) and cache.num_checkpoints == 1  # 1 + 7 fits; the pages it needs are free
    cache.admit("s", 4)
    assert cache.can_admit(28, reserve=0)  # 7 pages: the checkpoint's are taken now
    assert cache.num_checkpoints == 0


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


@pytest.mark.parametrize("position", [8, 10])
def test_a_resume_that_rewrites_the_last_position_copies_its_page(position: int) -> None:
    """rewrites_last (an MTP head: a resumed request computes the head's KV at the checkpoint's last position again,
    from its own next token): the page holding that position is copied into the request's own, never shared, also
    when the position is a page multiple; the pages before it are shared as always."""
    tokens = list(range(100, 120))
    for rewrites in (False, True):
        cache = CacheManager(num_pages=16, num_slots=3, page_size=4, num_checkpoints=2, rewrites_last=rewrites)
        owner = cache.admit("owner", 12)
        cache.publish(cache.reserve_checkpoint("owner", tokens, position))
        match = cache.match_prefix(tokens)
        shared = (position - 1 if rewrites else position) // 4  # the pages wholly before (the last) position
        copied = owner.pages[shared] if rewrites or position % 4 else None
        assert (match.num_tokens, match.pages, match.partial_page) == (position, tuple(owner.pages[:shared]), copied)
        hit = cache.admit("hit", 16, match)
        assert hit.pages[:shared] == owner.pages[:shared] and len(set(hit.pages) & set(owner.pages)) == shared
        assert hit.page_copy == (None if copied is None else PageCopy(copied, hit.pages[shared]))
        cache.free("owner")
        cache.free("hit")
        cache.reset_prefix_cache()
        assert cache.is_empty() and cache.num_free_pages == 16


# ---- eviction order under pressure ----------------------------------------------------------------------------------
def _checkpoint(cache: CacheManager, rid: str, tokens: list[int], position: int, generated: bool = False) -> bool:
    pending = cache.reserve_checkpoint(rid, tokens, position, generated=generated)
    if pending is not None:
        cache.publish(pending)
    return pending is not None


def _turn(cache: CacheManager, rid: str, prompt: list[int], reply: list[int], cache_point: int | None = None
          ) -> int:
    """One turn as the scheduler runs it: admit on the longest match, checkpoint the cache point (default: the last
    prompt position), generate, checkpoint the end of the generation, end. Returns the matched tokens."""
    cache.tick += 1
    match = cache.match_prefix(prompt, rid)
    cache.admit(rid, len(prompt), match)
    _checkpoint(cache, rid, prompt, len(prompt) - 1 if cache_point is None else cache_point)
    cache.tick += len(reply)
    assert cache.grow(rid, len(prompt) + len(reply))
    _checkpoint(cache, rid, prompt + reply, len(prompt) + len(reply) - 1, generated=True)
    cache.free(rid)
    return match.num_tokens


def _eviction_order(cache: CacheManager) -> list[int]:
    order = []
    while cache.num_checkpoints:
        before = {c.position for c in cache._index.checkpoints}
        assert cache._evict_one()
        order += before - {c.position for c in cache._index.checkpoints}
    assert cache.is_empty()
    return order


def test_a_generation_end_goes_before_its_prompt_until_a_turn_resumes_from_one() -> None:
    rng = random.Random(0)
    cache = CacheManager(num_pages=64, num_slots=2, page_size=4, num_checkpoints=8)
    first = [rng.randrange(50) for _ in range(20)]
    reply = [rng.randrange(50) for _ in range(4)]
    assert _turn(cache, "t1", first, reply) == 0  # checkpoints at 19 and 23 (the template is not known yet)
    second = first + reply + [rng.randrange(50) for _ in range(8)]
    assert _turn(cache, "t2", second, [rng.randrange(50) for _ in range(4)]) == 23  # at 31 and 35
    # 23 and the prompt it extends (19) are superseded: turn 2 went past both; turn 2 resumed from a generation's end
    # (the template resends replies), so its own prompt checkpoint (31) is demoted for its generation's end (35); 23
    # outlives 31, being the one turn 2 resumed from (used until turn 2 ended)
    assert _eviction_order(cache) == [19, 31, 23, 35]


def test_a_template_that_drops_the_reply_keeps_the_prompt_checkpoint() -> None:
    rng = random.Random(1)
    cache = CacheManager(num_pages=64, num_slots=2, page_size=4, num_checkpoints=8)
    history = [rng.randrange(50) for _ in range(20)]
    _turn(cache, "t1", history + [7], [rng.randrange(50) for _ in range(4)], cache_point=20)  # at 20 and 24
    history = history + [rng.randrange(50) for _ in range(8)]  # the reply is not resent
    assert _turn(cache, "t2", history + [7], [rng.randrange(50) for _ in range(4)], cache_point=28) == 20
    assert _eviction_order(cache) == [24, 20, 32, 28]  # 24 bypassed, 20 superseded, then 32 (a reply) before 28


def test_demotion_is_a_bonus_on_recency() -> None:
    """A demoted checkpoint still outlives a live one left unused for longer than DEMOTED_TICKS."""
    rng = random.Random(2)
    cache = CacheManager(num_pages=64, num_slots=2, page_size=4, num_checkpoints=8)
    _turn(cache, "stale", [rng.randrange(50) for _ in range(20)], [rng.randrange(50) for _ in range(4)])
    cache.tick += DEMOTED_TICKS + EFFICIENCY_WEIGHT + 10
    _turn(cache, "fresh", [rng.randrange(50) for _ in range(28)], [rng.randrange(50) for _ in range(4)])
    assert _eviction_order(cache) == [23, 19, 31, 27]  # the stale request's end and prompt, then the fresh one's


def _chat(num_checkpoints: int, rewrite: bool, conversations: int = 4, turns: int = 6
          ) -> list[list[tuple[int, int]]]:
    """Conversations returning in a fixed cycle; round by round, the tokens each turn resumed with and the most it
    could have. rewrite: the next history drops the reply (a template rewriting history), so only the prompt's cache
    point can match."""
    rng = random.Random(0)
    cache = CacheManager(num_pages=400, num_slots=2, page_size=4, num_checkpoints=num_checkpoints)
    histories = [[rng.randrange(50) for _ in range(40)] for _ in range(conversations)]
    rounds, best = [], [0] * conversations
    for turn in range(turns):
        matched = []
        for c in range(conversations):
            reply = [rng.randrange(50) for _ in range(4)]
            prompt = histories[c] + [7]  # the generation prompt: the cache point is the history before it
            matched.append((_turn(cache, f"c{c}t{turn}", prompt, reply, cache_point=len(histories[c])), best[c]))
            best[c] = len(histories[c]) if rewrite else len(prompt) + len(reply) - 1
            histories[c] = (histories[c] if rewrite else prompt + reply) + [rng.randrange(50) for _ in range(8)]
        rounds.append(matched)
    cache.reset_prefix_cache()
    assert cache.is_empty() and cache.num_free_pages == cache.num_pages
    return rounds


@pytest.mark.parametrize("rewrite", [False, True])
def test_chat_with_one_slot_per_conversation_hits_every_return(rewrite: bool) -> None:
    """4 slots for 4 conversations taking 2 checkpoints a turn: recency alone evicted each conversation's
    checkpoints just before it returned; demoting what a later turn went past keeps one per conversation."""
    for matched in _chat(num_checkpoints=4, rewrite=rewrite)[2:]:
        assert all(got == best for got, best in matched)  # with resent replies: from the generation's end


def test_a_pool_smaller_than_the_conversations_keeps_some_until_they_return() -> None:
    """3 slots, 4 conversations in a cycle: a request that resumed from nothing does not evict a path that came
    back and was used recently, so 3 of the 4 keep hitting instead of none."""
    rounds = _chat(num_checkpoints=3, rewrite=False)
    assert [sum(got > 0 for got, _ in m) for m in rounds[3:]] == [3] * (len(rounds) - 3)


def test_long_chats_keep_their_generation_ends_among_one_off_prompts() -> None:
    """Chats that resend long replies, with one-off prompts between their turns: the chats resume from the end of
    their last generation (after the first turn shows that the reply was resent), the one-offs give way."""
    rng = random.Random(3)
    cache = CacheManager(num_pages=4000, num_slots=2, page_size=16, num_checkpoints=8)
    histories = [[rng.randrange(1000) for _ in range(500)] for _ in range(2)]
    for turn in range(6):
        for c in range(2):
            prompt = histories[c] + [rng.randrange(1000) for _ in range(20)]
            reply = [rng.randrange(1000) for _ in range(200)]
            matched = _turn(cache, f"c{c}t{turn}", prompt, reply)
            assert matched == (len(histories[c]) - 1 if turn >= 2 else matched)
            histories[c] = prompt + reply
            for i in range(3):
                _turn(cache, f"o{turn}{c}{i}", [rng.randrange(1000) for _ in range(100)], [1, 2, 3])
    cache.reset_prefix_cache()
    assert cache.is_empty()


def test_a_shared_prefix_outlives_the_requests_that_resume_from_it() -> None:
    rng = random.Random(4)
    cache = CacheManager(num_pages=200, num_slots=2, page_size=4, num_checkpoints=3)
    system = [rng.randrange(50) for _ in range(32)]
    for i in range(12):
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


def test_the_lazy_eviction_heap_evicts_the_least_valuable() -> None:
    """Random turns on a small pool: each eviction's victim has the least value of the candidates."""
    rng = random.Random(5)
    cache = CacheManager(num_pages=300, num_slots=2, page_size=4, num_checkpoints=5)
    evict = cache._evict_one
    checked = []

    def checked_evict(keep=None, newcomer=None, path=None):
        candidates = [c for c in cache._index.checkpoints if c is not keep]
        least = min((cache._value(c) for c in candidates), default=None)
        before = set(map(id, cache._index.checkpoints))
        done = evict(keep, newcomer, path)
        gone = [c for c in candidates if id(c) in before and c not in cache._index.checkpoints]
        if done:
            assert len(gone) == 1 and cache._value(gone[0]) == least
            checked.append(least)
        return done

    cache._evict_one = checked_evict
    histories = [[rng.randrange(50) for _ in range(rng.randint(8, 30))] for _ in range(5)]
    for i in range(60):
        c = rng.randrange(5)
        prompt = histories[c] + [rng.randrange(50) for _ in range(rng.randint(1, 9))]
        reply = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
        _turn(cache, f"r{i}", prompt, reply)
        histories[c] = prompt + reply if rng.random() < 0.7 else histories[c]
    assert len(checked) > 20
    cache.reset_prefix_cache()
    assert cache.is_empty() and cache.num_free_pages == cache.num_pages


def test_evicted_checkpoints_are_not_kept_alive() -> None:
    """Lineage is kept as keys, the eviction heap drops what is evicted: after a reset nothing holds a checkpoint."""
    import gc
    import weakref

    rng = random.Random(6)
    cache = CacheManager(num_pages=200, num_slots=2, page_size=4, num_checkpoints=3)
    refs, publish = [], cache.publish
    cache.publish = lambda pending: (refs.append(weakref.ref(pending.checkpoint)), publish(pending))  # type: ignore
    histories = [[rng.randrange(50) for _ in range(20)] for _ in range(4)]
    for i in range(16):
        prompt = histories[i % 4] + [rng.randrange(50) for _ in range(5)]
        reply = [rng.randrange(50) for _ in range(4)]
        _turn(cache, f"r{i}", prompt, reply)
        histories[i % 4] = prompt + reply
    assert cache.stats()["checkpoint_evictions"] > 0
    cache.reset_prefix_cache()
    gc.collect()
    assert cache.is_empty() and not cache._heap and not cache._paths and all(r() is None for r in refs)
