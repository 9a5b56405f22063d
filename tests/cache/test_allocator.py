"""PageAllocator / SlotAllocator: O(1) free lists of integer ids with strict double-free detection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltaserve.cache.allocator import PageAllocator, PoolExhaustedError, SlotAllocator

SRC = Path(__file__).resolve().parents[2] / "src"


def test_page_allocate_and_free_roundtrip() -> None:
    pool = PageAllocator(8)
    assert (pool.num_total, pool.num_free, pool.num_used) == (8, 8, 0)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert a == [0, 1, 2] and sorted(a + b) == list(range(8))
    assert (pool.num_free, pool.num_used) == (0, 8)
    assert pool.allocate(0) == []
    pool.free(a)
    assert pool.num_free == 3 and not pool.is_allocated(1) and pool.is_allocated(3)
    assert sorted(pool.allocate(3)) == a


def test_page_allocate_too_many_raises_and_allocates_nothing() -> None:
    pool = PageAllocator(4)
    pool.allocate(3)
    assert not pool.can_allocate(2) and pool.can_allocate(1)
    with pytest.raises(PoolExhaustedError, match="asked for 2 pages but only 1"):
        pool.allocate(2)
    assert pool.num_free == 1
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_page_double_free_and_unknown_id_name_the_id_and_free_nothing() -> None:
    pool = PageAllocator(4)
    pages = pool.allocate(2)
    pool.free([pages[0]])
    with pytest.raises(ValueError, match=f"page {pages[0]}"):
        pool.free([pages[1], pages[0]])  # pages[1] is valid, but the call as a whole must free nothing
    assert pool.is_allocated(pages[1]) and pool.num_free == 3
    with pytest.raises(ValueError, match="page 7"):
        pool.free([7])
    with pytest.raises(ValueError, match="page -1"):
        pool.free([-1])
    with pytest.raises(ValueError, match=f"page {pages[1]}"):
        pool.free([pages[1], pages[1]])  # duplicate inside one call
    assert pool.num_free == 3
    with pytest.raises(ValueError, match="page 3"):
        pool.free([3])  # in range but never allocated


def test_slot_allocator() -> None:
    slots = SlotAllocator(2)
    s0, s1 = slots.allocate(), slots.allocate()
    assert {s0, s1} == {0, 1} and slots.num_free == 0
    with pytest.raises(PoolExhaustedError):
        slots.allocate()
    slots.free(s0)
    with pytest.raises(ValueError, match=f"slot {s0}"):
        slots.free(s0)
    with pytest.raises(ValueError, match="slot 2"):
        slots.free(2)
    assert slots.allocate() == s0 and slots.num_free + slots.num_used == slots.num_total


@pytest.mark.parametrize("cls", [PageAllocator, SlotAllocator])
@pytest.mark.parametrize("bad", [0, -3, 2.0])
def test_pool_size_must_be_positive_int(cls: type, bad: object) -> None:
    with pytest.raises(ValueError):
        cls(bad)


def test_allocator_does_not_import_torch() -> None:
    code = "import sys, deltaserve.cache.allocator; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
