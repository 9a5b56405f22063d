"""The cache manager: allocations per request, reference-counted pages shared through a prefix match, the state
copy a match brings, and pools back to full after every kind of end."""

from __future__ import annotations

import random

import pytest

from deltaserve.cache.allocator import PageAllocator, pages_for_tokens
from deltaserve.cache.manager import CacheManager, PrefixMatch, StateCopy


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


def test_a_prefix_match_shares_its_pages_and_brings_a_state_copy() -> None:
    cache = CacheManager(num_pages=8, num_slots=3, page_size=4)
    owner = cache.admit("owner", 8)
    match = PrefixMatch(num_tokens=8, pages=tuple(owner.pages), state_slot=owner.slot)
    assert cache.can_admit(10, match) and not cache.can_admit(8 + 4 * 7, match)
    hit = cache.admit("hit", 10, match)
    assert hit.pages[:2] == owner.pages and len(hit.pages) == 3 and cache.num_free_pages == 5
    assert hit.state_copy == StateCopy(owner.slot, hit.slot)
    cache.free("owner")  # the shared pages stay: "hit" still holds them
    assert cache.num_free_pages == 5
    cache.free("hit")
    assert cache.is_empty()


def test_random_admissions_and_ends_leave_the_pools_full() -> None:
    rng = random.Random(0)
    cache = CacheManager(num_pages=40, num_slots=6, page_size=4)
    live: dict[str, int] = {}
    for i in range(2000):
        op = rng.random()
        if op < 0.4 and cache.can_admit(n := rng.randint(1, 30)):
            donor = rng.choice(sorted(live)) if live and rng.random() < 0.3 else None
            match = PrefixMatch()
            if donor is not None:
                held = cache.allocation(donor)
                k = rng.randint(0, len(held.pages))
                match = PrefixMatch(4 * k, tuple(held.pages[:k]), held.slot)
            n = max(n, match.num_tokens)
            if cache.can_admit(n, match):
                cache.admit(f"r{i}", n, match)
                live[f"r{i}"] = n
        elif op < 0.7 and live:
            rid = rng.choice(sorted(live))
            live[rid] += rng.randint(1, 8)
            if not cache.grow(rid, live[rid]):
                cache.free(rid)  # what a preemption does
                del live[rid]
        elif live:
            rid = rng.choice(sorted(live))
            cache.free(rid)
            del live[rid]
        used = {p for rid in live for p in cache.allocation(rid).pages}
        assert cache.num_free_pages == cache.num_pages - len(used)
    for rid in list(live):
        cache.free(rid)
    assert cache.is_empty()
