"""The cache manager: the scheduler's one view of memory. Owns the page and slot allocators, the page geometry and
what each request holds; decides where a request's GDN state comes from. Pure Python (no torch): it hands out ids,
the runner owns the tensors they index.

A request's allocation is its state slot (the destination every step writes its GDN state to) and its KV pages
(page i holds positions [i*P, (i+1)*P)). Where the state a step starts from comes from is the entry's StateSource:
zeros for a request that starts at position 0, its own slot otherwise. A request admitted on a prefix match starts
from a copy of the matched state, which the step carries as a StateCopy for the runner to apply before it runs
(prefix matching finds nothing yet: `match_prefix` is where the prefix index plugs in).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from deltaserve.cache.allocator import PageAllocator, SlotAllocator, pages_for_tokens


class StateSource(enum.Enum):
    """Where a step's row takes its GDN state (conv window and recurrent state) from."""

    ZEROS = "zeros"  # the row starts at position 0: the state starts from zeros, the slot's content is ignored
    SLOT = "slot"    # the row continues the state its slot holds (left by its last step, or copied in this one)


class StateCopy(NamedTuple):
    """Copy every GDN layer's state of slot `src` into slot `dst` before the step runs."""

    src: int
    dst: int


@dataclass(frozen=True)
class PrefixMatch:
    """Leading tokens of a prompt whose KV pages (and GDN state, in `state_slot`) are cached and can be reused."""

    num_tokens: int = 0
    pages: tuple[int, ...] = ()
    state_slot: int | None = None


NO_MATCH = PrefixMatch()


@dataclass
class Allocation:
    """What one request holds while it runs."""

    slot: int
    pages: list[int] = field(default_factory=list)
    state_copy: StateCopy | None = None  # applied by the request's next step, then cleared


class CacheManager:
    """Owns the page and slot allocators and every running request's Allocation; the scheduler asks it for memory.

    Pages are reference-counted (a matched prefix's pages are shared, not copied); `free` drops a request's
    references and its slot, so the pools return to full once every request has ended, whatever the path.
    """

    def __init__(self, *, num_pages: int, num_slots: int, page_size: int) -> None:
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.page_size = page_size
        self._pages = PageAllocator(num_pages)
        self._slots = SlotAllocator(num_slots)
        self._held: dict[str, Allocation] = {}

    # ---- geometry and gauges ---------------------------------------------------------------------------------------
    def pages_needed(self, num_tokens: int) -> int:
        return pages_for_tokens(num_tokens, self.page_size)

    @property
    def num_pages(self) -> int:
        return self._pages.num_total

    @property
    def num_slots(self) -> int:
        return self._slots.num_total

    @property
    def num_free_pages(self) -> int:
        return self._pages.num_free

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free

    def is_empty(self) -> bool:
        """Every page and slot is free and no request holds anything."""
        return (not self._held and self._pages.num_free == self._pages.num_total
                and self._slots.num_free == self._slots.num_total)

    def stats(self) -> dict[str, int]:
        return {"pages_used": self._pages.num_used, "pages_total": self._pages.num_total,
                "slots_used": self._slots.num_used, "slots_total": self._slots.num_total}

    # ---- per request -----------------------------------------------------------------------------------------------
    def allocation(self, request_id: str) -> Allocation | None:
        return self._held.get(request_id)

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of `token_ids` with both its pages and a GDN state; none without a prefix index."""
        return NO_MATCH

    def can_admit(self, num_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        """A free slot and the pages for positions [0, num_tokens) beyond the matched ones."""
        return self._slots.num_free > 0 and self.pages_needed(num_tokens) - len(match.pages) <= self._pages.num_free

    def admit(self, request_id: str, num_tokens: int, match: PrefixMatch = NO_MATCH) -> Allocation:
        """Give a request its slot and the pages for positions [0, num_tokens), reusing the matched prefix."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds a cache allocation")
        if not self.can_admit(num_tokens, match):
            raise ValueError(f"cannot admit {request_id!r}: check can_admit first")
        self._pages.share(match.pages)
        slot = self._slots.allocate()
        pages = list(match.pages) + self._pages.allocate(self.pages_needed(num_tokens) - len(match.pages))
        copy = StateCopy(match.state_slot, slot) if match.state_slot is not None else None
        self._held[request_id] = allocation = Allocation(slot, pages, copy)
        return allocation

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Pages for positions [0, num_tokens) of a running request; False (nothing allocated) when too few are free."""
        allocation = self._held[request_id]
        need = self.pages_needed(num_tokens) - len(allocation.pages)
        if need > self._pages.num_free:
            return False
        if need > 0:
            allocation.pages.extend(self._pages.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        """Give back everything the request holds (unknown ids: nothing to do)."""
        allocation = self._held.pop(request_id, None)
        if allocation is not None:
            self._pages.free(allocation.pages)
            self._slots.free(allocation.slot)
