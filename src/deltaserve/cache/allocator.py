"""Integer-id allocators for the KV page pool and the GDN state-slot pool.

Pure Python, no torch: the scheduler owns one of each and decides who gets what; these classes only hand out ids
0..n-1 and take them back. They own no memory themselves: the id indexes a tensor that the runner owns.
Every operation is O(1) per id (a free-list stack plus a per-id in-use flag for double-free detection).
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
        self._in_use = bytearray(num_ids)

    @property
    def num_total(self) -> int:
        return len(self._in_use)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use) - len(self._free)

    def is_allocated(self, id_: int) -> bool:
        return self._known(id_) and bool(self._in_use[id_])

    def _known(self, id_: object) -> bool:
        return isinstance(id_, int) and not isinstance(id_, bool) and 0 <= id_ < len(self._in_use)

    def _take(self, n: int) -> list[int]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} {self._what}s: the count must be a non-negative integer")
        if n > len(self._free):
            raise PoolExhaustedError(f"asked for {n} {self._what}s but only {len(self._free)} of "
                                     f"{len(self._in_use)} are free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._in_use[i] = 1
        return ids

    def _release(self, ids: list[int]) -> None:
        # Validate everything first so that a bad call frees nothing (the pool stays consistent).
        seen: set[int] = set()
        for i in ids:
            if not self._known(i):
                raise ValueError(f"cannot free {self._what} {i!r}: not an id of this pool (0..{len(self._in_use) - 1})")
            if not self._in_use[i] or i in seen:
                raise ValueError(f"cannot free {self._what} {i}: it is not allocated (double free?)")
            seen.add(i)
        for i in ids:
            self._in_use[i] = 0
            self._free.append(i)


class PageAllocator(_FreeList):
    """Hands out KV-cache page ids; owns only which pages are free, not the pages' memory."""

    def __init__(self, num_pages: int) -> None:
        super().__init__(num_pages, "page")

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Allocate `n` pages (all or nothing). Raises PoolExhaustedError when fewer than `n` are free."""
        return self._take(n)

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool. ValueError naming the id on an unknown id or a double free; frees nothing then."""
        self._release(list(pages))


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
