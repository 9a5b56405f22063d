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
