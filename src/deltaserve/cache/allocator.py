"""Integer-id allocators for the KV page pool and the GDN state-slot pool.

Pure Python, no torch: the cache manager owns one of each and decides who gets what; these classes only hand out ids
0..n-1 and take them back. They own no memory themselves: the id indexes a tensor that the runner owns.
Every operation is O(1) per id (a free-list stack plus a per-id reference count for double-free detection). Pages
are reference-counted so that requests can share them (a page returns to the free list when its last holder frees
it); slots always have one holder.
"""

from __future__ import annotations

from collections.abc import Iterable


class PoolExhaustedError(RuntimeError):
    """An allocation asked for more ids than are free; nothing was allocated."""


class _FreeList:
    """Free-list stack of the ids 0..num_ids-1; owns only the bookkeeping of which ids are in use."""

    def __init__(self, num_ids: int, what: str) -> None:
        if not isinstance(num_ids, int) or num_ids <= 0:
            raise ValueError(f"number of {what}s must be a positive integer, got {num_ids!r}")
        self._what = what
        # Reversed so that pop() hands out 0, 1, 2, ... first: deterministic and easy to read in tests.
        self._free: list[int] = list(range(num_ids - 1, -1, -1))
        self._refs = [0] * num_ids  # holders of each id; 0: free

    @property
    def num_total(self) -> int:
        return len(self._refs)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs) - len(self._free)

    def is_allocated(self, id_: int) -> bool:
        return self._known(id_) and self._refs[id_] > 0

    def ref_count(self, id_: int) -> int:
        return self._refs[id_] if self._known(id_) else 0

    def _known(self, id_: object) -> bool:
        return isinstance(id_, int) and not isinstance(id_, bool) and 0 <= id_ < len(self._refs)

    def _take(self, n: int) -> list[int]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} {self._what}s: the count must be a non-negative integer")
        if n > len(self._free):
            raise PoolExhaustedError(f"asked for {n} {self._what}s but only {len(self._free)} of "
                                     f"{len(self._refs)} are free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
        return ids

    def _release(self, ids: list[int]) -> list[int]:
        """Drop one reference to each id; returns the ids that became free. Validates everything first, so a bad
        call changes nothing (the pool stays consistent)."""
        drops: dict[int, int] = {}
        for i in ids:
            if not self._known(i):
                raise ValueError(f"cannot free {self._what} {i!r}: not an id of this pool (0..{len(self._refs) - 1})")
            drops[i] = drops.get(i, 0) + 1
            if drops[i] > self._refs[i]:
                raise ValueError(f"cannot free {self._what} {i}: it is not allocated (double free?)")
        freed = []
        for i in ids:
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(i)
                freed.append(i)
        return freed


class PageAllocator(_FreeList):
    """Hands out KV-cache page ids; owns only which pages are free, not the pages' memory."""

    def __init__(self, num_pages: int) -> None:
        super().__init__(num_pages, "page")

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Allocate `n` pages (all or nothing). Raises PoolExhaustedError when fewer than `n` are free."""
        return self._take(n)

    def share(self, pages: Iterable[int]) -> None:
        """Add a holder to pages that are already allocated (a request reusing another's pages)."""
        pages = list(pages)
        for i in pages:
            if not self.is_allocated(i):
                raise ValueError(f"cannot share page {i!r}: it is not allocated")
        for i in pages:
            self._refs[i] += 1

    def free(self, pages: Iterable[int]) -> list[int]:
        """Drop one holder of each page; pages with no holder left return to the pool (returned). ValueError naming
        the id on an unknown id or a double free; frees nothing then."""
        return self._release(list(pages))


class SlotAllocator(_FreeList):
    """Hands out GDN state-slot ids (one per running request); owns only which slots are free."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, "slot")

    def allocate(self) -> int:
        """Allocate one slot. Raises PoolExhaustedError when none is free."""
        return self._take(1)[0]

    def free(self, slot: int) -> None:
        """Return a slot. ValueError naming the id on an unknown id or a double free."""
        self._release([slot])


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Pages that hold K/V for positions [0, num_tokens): the one page-geometry formula of the engine."""
    return -(-num_tokens // page_size)
