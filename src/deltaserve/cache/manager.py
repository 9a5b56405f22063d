"""The cache manager: the scheduler's one view of memory. Owns the page and slot allocators, the page geometry, what
each request holds, and the prefix cache (GDN state checkpoints with the KV pages they need); decides where a
request's GDN state comes from. Pure Python (no torch): it hands out ids, the runner owns the tensors they index.

A request's allocation is its state slot (the destination every step writes its GDN state to) and its KV pages
(page i holds positions [i*P, (i+1)*P)). Where a step's state starts is the entry's StateSource: zeros for a request
that starts at position 0, its own slot otherwise. A request admitted on a prefix match starts from copies, which the
step carries for the runner to apply before it runs: the checkpoint's state into the request's slot (StateCopy), and
the checkpoint's partial last page into a page of the request's own (PageCopy: the request writes the rest of it).

Checkpoints live in a pool of extra state slots (ids after the running slots, in the same tensors). One is taken by
copying a request's slot after the step that reached the position (a snapshot), and holds references on the pages
of its prefix, so a matched prefix always has both its KV and its state. When pages or checkpoint slots run short,
checkpoints are evicted by value (`_value`): recency, raised for those that save the most prefill per byte kept (as
Marconi weighs FLOP efficiency), partial-page ones first, and lowered by DEMOTED_TICKS for a checkpoint that a deeper
one on its path is expected to replace (a bonus on recency, not a class: a stale live checkpoint still goes first):
- the checkpoint a request resumed from, once it takes a deeper prompt checkpoint (the conversation moved on), unless
  it may be a shared prefix (resumed from twice, or a point inside its own request's prompt);
- of a request's last prompt checkpoint and its generation's end, the end, unless the conversation has shown that its
  prompts resend replies (it resumed from a generation's end, or its prompt passed through one): then the prompt one.
  Templates may rewrite replies (Qwen3.5 drops past <think> blocks): guessing wrong costs a reply one way, the whole
  history the other.
A new checkpoint is refused when it is worth less than the one it would evict, or when its request resumed from
nothing and the victim is a path that came back and was used recently (`_protected`: with fewer slots than paths in
use, recency alone evicts each one just before it returns). Values only drop through demotion, so a lazy heap ranks
them: an eviction costs O(log n), not a pass over every checkpoint.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from deltaserve.cache.allocator import PageAllocator, SlotAllocator, pages_for_tokens
from deltaserve.cache.prefix import Checkpoint, PageChain, PrefixIndex

# A checkpoint that saves the most prefill per byte is kept as if it had been used this many schedule() calls later.
EFFICIENCY_WEIGHT = 64
# A demoted checkpoint (a deeper one on its path is expected to serve whoever comes back) is kept as if it had been
# used this many schedule() calls earlier: it goes before the live resume points of recent paths, not before stale ones.
DEMOTED_TICKS = 1024
# A live resume point is protected from requests that resumed from nothing for this many pool sizes of checkpoint
# reservations after its last use (`_protected`).
PROTECT_POOLS = 4
# How many evicted checkpoints per checkpoint slot are remembered (their page digests), to tell a path that comes back.
GHOSTS_PER_SLOT = 2


class StateSource(enum.Enum):
    """Where a step's row takes its GDN state (conv window and recurrent state) from."""

    ZEROS = "zeros"  # the row starts at position 0: the state starts from zeros, the slot's content is ignored
    SLOT = "slot"    # the row continues the state its slot holds (left by its last step, or copied in this one)


class StateCopy(NamedTuple):
    """Copy every GDN layer's state of slot `src` into slot `dst` (and the MTP head's input kept with it)."""

    src: int
    dst: int


class PageCopy(NamedTuple):
    """Copy every attention layer's K/V of page `src` into page `dst`."""

    src: int
    dst: int


@dataclass(frozen=True)
class PrefixMatch:
    """Leading tokens of a prompt whose KV pages and GDN state are cached: the full pages to share, the partial last
    page to copy (if num_tokens is not a page multiple; with `rewrites_last`, the page of its last position) and the
    checkpoint slot to copy the state from."""

    num_tokens: int = 0
    pages: tuple[int, ...] = ()
    partial_page: int | None = None
    state_slot: int | None = None
    checkpoint: Checkpoint | None = None
    keeps_replies: bool | None = None  # the prompt resends the reply that followed the checkpoint (None: not known)
    # no checkpoint, but the prompt passes through some evicted not long ago: the most requests one had resumed
    # from (-1: none)
    ghost_hits: int = -1


NO_MATCH = PrefixMatch()


@dataclass
class Allocation:
    """What one request holds while it runs."""

    slot: int
    pages: list[int] = field(default_factory=list)
    state_copy: StateCopy | None = None  # applied by the request's next step, then cleared
    page_copy: PageCopy | None = None


@dataclass(eq=False)
class PendingCheckpoint:
    """A checkpoint whose snapshot is in a step not launched yet: it holds its slot and pages, and enters the index
    when the step is committed (cancelled if it never runs)."""

    checkpoint: Checkpoint
    snapshot: StateCopy
    request_id: str = ""


@dataclass(eq=False)
class _Path:
    """A running request's place in its conversation, for eviction: the checkpoint it resumed from (`source`; `passed`
    until it takes a deeper prompt checkpoint), whether its prompt resent the reply that followed it, the last prompt
    checkpoint it took (paired with its generation's end), and, if it resumed from nothing, the most hits of the
    evicted checkpoints its prompt passes through (-1: none)."""

    source: Checkpoint | None = None
    passed: Checkpoint | None = None
    keeps_replies: bool | None = None
    prompt: Checkpoint | None = None
    ghost_hits: int = -1


class CacheManager:
    """Owns the page and slot allocators, every running request's Allocation and the prefix cache; the scheduler
    asks it for memory. Pages are reference-counted (requests and checkpoints share them); `free` drops a request's
    references and its slot, so once every request has ended only checkpoints hold anything (none after
    `reset_prefix_cache`)."""

    def __init__(self, *, num_pages: int, num_slots: int, page_size: int, num_checkpoints: int = 0,
                 namespace: bytes = b"", state_tokens: int = 1024, rewrites_last: bool = False) -> None:
        """num_checkpoints: size of the checkpoint pool (0: no prefix caching); their slot ids follow the running
        slots'. namespace: what else the KV depends on (the model). state_tokens: a checkpoint's state size in KV
        tokens (what it costs to keep, against what it saves). rewrites_last: a resumed request rewrites the KV at
        the checkpoint's last position (an MTP head's, computed from the next token, which only the resumed request
        knows), so the page holding it is always copied, never shared (when the position is a page multiple too)."""
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.page_size, self._rewrites_last = page_size, rewrites_last
        self._pages = PageAllocator(num_pages)
        self._slots = SlotAllocator(num_slots)
        self._checkpoint_slots = SlotAllocator(num_checkpoints) if num_checkpoints else None
        self._index = PrefixIndex(page_size, namespace)
        self._held: dict[str, Allocation] = {}
        self._pending: list[PendingCheckpoint] = []
        # page-chain digests that running requests will checkpoint (their planned positions), and who claimed them
        self._claimed: dict[bytes, int] = {}
        self._claims: dict[str, list[bytes]] = {}
        self._chains: dict[str, PageChain] = {}  # each request's page digests, hashed once (until `free`)
        self._paths: dict[str, _Path] = {}  # each running request's lineage (until `free`)
        # eviction order: (value, entry id, checkpoint), a min-heap ranked lazily (see _evict_one)
        self._heap: list[tuple[float, int, Checkpoint]] = []
        self._entries = itertools.count()
        self._reservations = 0  # checkpoint reservations asked for so far: the clock of `_protected`
        self._ghosts: OrderedDict[bytes, int] = OrderedDict()  # the last checkpoints evicted: depth digest -> hits
        self._state_tokens = state_tokens
        self.tick = 0  # advanced by the scheduler once per step: the clock of checkpoint recency
        self.counters = {"checkpoints_taken": 0, "checkpoint_evictions": 0, "prefix_hits": 0,
                         "prompt_tokens_cached": 0, "prompt_tokens_queried": 0}

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

    @property
    def prefix_caching(self) -> bool:
        return self._checkpoint_slots is not None

    @property
    def num_checkpoints(self) -> int:
        return len(self._index)

    def is_empty(self) -> bool:
        """No request holds anything, no snapshot is pending, and every used page is held by checkpoints only."""
        held = {}
        for c in self._index.checkpoints:
            for p in c.pages:
                held[p] = held.get(p, 0) + 1
        return (not self._held and not self._pending and self._slots.num_free == self._slots.num_total
                and self._pages.num_used == len(held) and all(self._pages.ref_count(p) == n for p, n in held.items()))

    def stats(self) -> dict[str, int]:
        total = self._checkpoint_slots.num_total if self._checkpoint_slots else 0
        in_requests = len({p for a in self._held.values() for p in a.pages})
        return {"pages_used": self._pages.num_used, "pages_total": self._pages.num_total,
                "pages_cached": self._pages.num_used - in_requests,  # held by prefix-cache checkpoints only
                "slots_used": self._slots.num_used, "slots_total": self._slots.num_total,
                "checkpoints_used": self.num_checkpoints, "checkpoints_total": total, **self.counters}

    # ---- per request -----------------------------------------------------------------------------------------------
    def allocation(self, request_id: str) -> Allocation | None:
        return self._held.get(request_id)

    def _chain(self, request_id: str | None) -> PageChain | None:
        """The request's digest cache (None without an id: the lookup hashes its tokens afresh)."""
        if request_id is None:
            return None
        chain = self._chains.get(request_id)
        if chain is None:
            chain = self._chains[request_id] = self._index.chain()
        return chain

    def match_prefix(self, token_ids: Sequence[int], request_id: str | None = None) -> PrefixMatch:
        """The longest cached prefix of `token_ids` with both its pages and a GDN state, leaving at least the last
        token to compute (its logits are needed). request_id: whose tokens they are (their page digests are
        kept for its next lookups)."""
        if not self.prefix_caching:
            return NO_MATCH
        c = self._index.find(token_ids, len(token_ids) - 1, self._chain(request_id))
        if c is None:
            return PrefixMatch(ghost_hits=self._ghost_hits(token_ids, self._chain(request_id)))
        # the page holding the last cached position is copied, not shared, when the request rewrites that position
        full = -(-c.position // self.page_size) - 1 if self._rewrites_last else c.position // self.page_size
        partial = c.pages[full] if full < len(c.pages) else None
        return PrefixMatch(c.position, c.pages[:full], partial, c.slot, c,
                           self._resends_reply(c, token_ids, self._chain(request_id)))

    def _ghost_hits(self, tokens: Sequence[int], chain: PageChain | None) -> int:
        """The prompt passes through the full pages of checkpoints evicted not long ago (their path came back too
        late): the most hits one had (-1: none)."""
        if not self._ghosts:
            return -1
        return max((self._ghosts.get(d, -1) for d in self._index.digests(tokens, len(tokens) - 1, chain)[1:]),
                   default=-1)

    def _resends_reply(self, c: Checkpoint, tokens: Sequence[int], chain: PageChain | None) -> bool | None:
        """Whether a prompt resuming from c resends the reply that followed it: c ends a generation, or the prompt
        passes through the generation end c's request took (gone or not); else what c's conversation showed."""
        if c.generated:
            return True
        if c.tail is None:
            return c.keeps_replies
        position, digest, partial = c.tail
        if position > len(tokens):
            return False
        full = position // self.page_size * self.page_size
        return self._index.digests(tokens, position, chain)[-1] == digest and tuple(tokens[full:position]) == partial

    def branch_position(self, token_ids: Sequence[int], limit: int, request_id: str | None = None) -> int:
        """The page-aligned position up to which `token_ids` shares pages with some checkpoint's prefix (where a new
        sequence branches off a cached path), at most `limit`."""
        if not self.prefix_caching:
            return 0
        return self._index.branch_depth(token_ids, limit, self._chain(request_id)) * self.page_size

    def can_admit(self, num_tokens: int, match: PrefixMatch = NO_MATCH, reserve: int = 0) -> bool:
        """A free slot and the pages for positions [0, num_tokens) beyond the matched full pages (checkpoints are
        evicted for them if need be, except the matched one), with `reserve` pages more free or held by checkpoints
        alone (those are evicted later, when the pages are taken); nothing is evicted when that cannot be met."""
        if self._slots.num_free == 0:
            return False
        need = self.pages_needed(num_tokens) - len(match.pages)
        room = self._pages.num_free
        if need + reserve > room and reserve and need + reserve > room + self._checkpoint_only_pages(match.checkpoint):
            return False
        return self._make_room(need, keep=match.checkpoint)

    def _checkpoint_only_pages(self, keep: Checkpoint | None) -> int:
        """Pages that evicting every checkpoint but `keep` would free (no request or other holder shares them)."""
        holders: dict[int, int] = {}
        for c in self._index.checkpoints:
            if c is not keep:
                for p in c.pages:
                    holders[p] = holders.get(p, 0) + 1
        return sum(1 for p, n in holders.items() if self._pages.ref_count(p) == n)

    def admit(self, request_id: str, num_tokens: int, match: PrefixMatch = NO_MATCH) -> Allocation:
        """Give a request its slot and the pages for positions [0, num_tokens), reusing the matched prefix."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds a cache allocation")
        if not self.can_admit(num_tokens, match):
            raise ValueError(f"cannot admit {request_id!r}: check can_admit first")
        self._pages.share(match.pages)
        slot = self._slots.allocate()
        fresh = self._pages.allocate(self.pages_needed(num_tokens) - len(match.pages))
        allocation = Allocation(slot, list(match.pages) + fresh)
        self._paths[request_id] = _Path(match.checkpoint, match.checkpoint, match.keeps_replies,
                                        ghost_hits=match.ghost_hits)
        if match.checkpoint is not None:
            self._use(match.checkpoint)
            match.checkpoint.hits += 1
            match.checkpoint.demoted = False  # resumed from: it serves a path that comes back (re-ranked lazily)
            self.counters["prefix_hits"] += 1
            allocation.state_copy = StateCopy(match.state_slot, slot)  # type: ignore[arg-type]
            if match.partial_page is not None:
                allocation.page_copy = PageCopy(match.partial_page, fresh[0])
        self._held[request_id] = allocation
        return allocation

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Pages for positions [0, num_tokens) of a running request (evicting checkpoints if need be); False, with
        nothing allocated, when even that does not free enough."""
        allocation = self._held[request_id]
        need = self.pages_needed(num_tokens) - len(allocation.pages)
        if not self._make_room(need):
            return False
        if need > 0:
            allocation.pages.extend(self._pages.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        """Give back everything the request holds (unknown ids: nothing to do)."""
        self._release_claims(request_id)
        self._chains.pop(request_id, None)
        path = self._paths.pop(request_id, None)
        if path is not None and path.source is not None:
            self._use(path.source)  # its path was in use until now
        allocation = self._held.pop(request_id, None)
        if allocation is not None:
            self._pages.free(allocation.pages)
            self._slots.free(allocation.slot)

    # ---- prefixes being computed --------------------------------------------------------------------------------------
    def claim_prefixes(self, request_id: str, tokens: Sequence[int], positions: Sequence[int]) -> None:
        """The request will checkpoint these positions of `tokens`: a request sharing that prefix can wait for them
        instead of computing it too."""
        digests = self._index.digests(tokens, max(positions, default=0), self._chain(request_id))
        mine = [digests[p // self.page_size] for p in positions if p >= self.page_size]
        for digest in mine:
            self._claimed[digest] = self._claimed.get(digest, 0) + 1
        self._claims.setdefault(request_id, []).extend(mine)

    def unclaim(self, request_id: str, tokens: Sequence[int], positions: Sequence[int]) -> None:
        """The request will not checkpoint these positions of `tokens` after all (claim_prefixes' inverse):
        requests sharing that prefix stop waiting for them."""
        positions = [p for p in positions if p >= self.page_size]
        if not positions:
            return
        digests = self._index.digests(tokens, max(positions), self._chain(request_id))
        for p in positions:
            self._release_claim(request_id, digests[p // self.page_size])

    def _release_claims(self, request_id: str) -> None:
        for digest in list(self._claims.get(request_id, [])):
            self._release_claim(request_id, digest)
        self._claims.pop(request_id, None)

    def _release_claim(self, request_id: str, digest: bytes) -> None:
        """A claimed prefix is checkpointed (or will never be): nobody waits for it any more."""
        claims = self._claims.get(request_id)
        if claims is None or digest not in claims:
            return
        claims.remove(digest)
        self._claimed[digest] -= 1
        if not self._claimed[digest]:
            del self._claimed[digest]

    def claimed_position(self, token_ids: Sequence[int], request_id: str | None = None) -> int:
        """The page-aligned position up to which a running request is computing a checkpointed prefix of
        `token_ids` (0: none)."""
        if not self._claimed:
            return 0
        chain = self._chain(request_id)
        return self._index.deepest(token_ids, len(token_ids) - 1, self._claimed, chain) * self.page_size

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def reserve_checkpoint(self, request_id: str, tokens: Sequence[int], position: int,
                           generated: bool = False) -> PendingCheckpoint | None:
        """A checkpoint of the state the request's slot will hold once the current step has run (its first
        `position` tokens are `tokens[:position]`; generated: the position ends the request's generation); None when
        one exists already, the pool is off, or the pool is full of checkpoints worth more. Its snapshot copy goes
        with the step; `publish` once the step is launched."""
        allocation = self._held.get(request_id)
        if self._checkpoint_slots is None or allocation is None or position <= 0:
            return None
        depth_digest, partial, digests = self._index.key_of(tokens, position, self._chain(request_id))
        existing = self._index.get(depth_digest, partial)
        if existing is not None or any(p.checkpoint.depth_digest == depth_digest and p.checkpoint.partial == partial
                                       for p in self._pending):
            if existing is not None:
                self._use(existing)
                self._release_claim(request_id, depth_digest)
            return None
        path = self._paths.setdefault(request_id, _Path())
        self._reservations += 1
        pair = path.prompt if generated and path.prompt is not None and path.prompt.heap_entry >= 0 else None
        # Of a prompt checkpoint and its generation's end, the end goes first unless the conversation has shown it
        # resends replies: a template may rewrite them (Qwen3.5 drops past <think> blocks), and guessing wrong costs
        # one reply this way, the whole history the other.
        c = Checkpoint(position, -1, tuple(allocation.pages[:self.pages_needed(position)]), depth_digest, partial,
                       self.tick, self._reservations, chain=tuple(digests), generated=generated,
                       demoted=pair is not None and not path.keeps_replies, keeps_replies=path.keeps_replies,
                       proven=path.source is not None or path.ghost_hits >= 0)
        if pair is not None:  # kept even if c is refused: the next prompt tells whether it resent the reply
            pair.tail = (position, depth_digest, partial)
        # what c makes redundant is demoted first, so that c can take its slot
        passed = [pair] if pair is not None and path.keeps_replies else [] if generated else self._superseded(path)
        demoted = [p for p in passed if self._demote(p)]
        if self._checkpoint_slots.num_free == 0 and not self._evict_one(newcomer=c, path=path):
            for p in demoted:
                p.demoted = False  # its value rises again: re-ranked lazily
            self._release_claim(request_id, depth_digest)
            return None
        self._pages.share(c.pages)
        c.slot = self._checkpoint_slots.allocate() + self._slots.num_total
        if pair is not None:
            c.pair = (pair.depth_digest, pair.partial)
        elif not generated:
            path.passed = None
            if path.prompt is not None:
                path.prompt.inner = True
            path.prompt = c
        pending = PendingCheckpoint(c, StateCopy(allocation.slot, c.slot), request_id)
        self._pending.append(pending)
        return pending

    def _superseded(self, path: _Path) -> list[Checkpoint]:
        """The request took a prompt checkpoint past the one it resumed from: whoever follows its path next matches
        the deeper one. Demote the one it resumed from, unless it may be a shared prefix (another request resumed from
        it too, or its own request went on to a deeper prompt checkpoint: a point inside a prompt, as a system
        prompt's), and, when that was a generation's end, the prompt checkpoint it extends (its request's pair)."""
        c = path.passed
        if c is None or c.hits > 1 or c.inner:
            return []
        prompt = self._index.get(*c.pair) if c.pair is not None else None
        return [c] + ([prompt] if prompt is not None and prompt.hits == 0 else [])

    def publish(self, pending: PendingCheckpoint) -> None:
        """The snapshot's step is launched: the checkpoint can be matched from now on (device work runs in launch
        order, so any step that reads it runs after the copy)."""
        self._pending.remove(pending)
        self._index.add(pending.checkpoint)
        self._push(pending.checkpoint)
        self.counters["checkpoints_taken"] += 1
        self._release_claim(pending.request_id, pending.checkpoint.depth_digest)

    def cancel(self, pending: PendingCheckpoint) -> None:
        self._pending.remove(pending)
        self._release(pending.checkpoint)
        self._release_claim(pending.request_id, pending.checkpoint.depth_digest)

    def reset_prefix_cache(self) -> None:
        """Drop every checkpoint (and the pages only they hold)."""
        for c in list(self._index.checkpoints):
            self._index.remove(c)
            self._release(c)
            c.heap_entry = -1
        self._heap.clear()
        self._ghosts.clear()

    def _release(self, c: Checkpoint) -> None:
        self._pages.free(c.pages)
        self._checkpoint_slots.free(c.slot - self._slots.num_total)  # type: ignore[union-attr]

    def _make_room(self, pages: int, keep: Checkpoint | None = None) -> bool:
        """Evict checkpoints until `pages` pages are free; False if they cannot be freed."""
        while pages > self._pages.num_free:
            if not self._evict_one(keep):
                return False
        return True

    def _evict_one(self, keep: Checkpoint | None = None, newcomer: Checkpoint | None = None,
                   path: _Path | None = None) -> bool:
        """Evict the least valuable checkpoint but `keep`; False if there is none, or if `newcomer` (a checkpoint
        asking for a slot, for the request whose lineage is `path`) is worth less than it or it is `_protected`.
        The heap is ranked lazily: a value only drops through `_demote`, which pushes a fresh entry; one that rose
        since its entry (used again, resumed from) is pushed again when its entry comes up; entries of evicted
        checkpoints, or replaced by a fresh one, are skipped."""
        held, victim = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            value, entry_id, c = entry
            if entry_id != c.heap_entry:
                continue
            if self._value(c) > value:
                self._push(c)
            elif c is keep:
                held.append(entry)
            else:
                victim = entry
                break
        for entry in held:
            heapq.heappush(self._heap, entry)
        if victim is None:
            return False
        value, _, c = victim
        if newcomer is not None and (self._value(newcomer) < value or self._protected(c, path)):
            heapq.heappush(self._heap, victim)
            return False
        c.heap_entry = -1
        self._index.remove(c)
        self._release(c)
        self.counters["checkpoint_evictions"] += 1
        if c.position >= self.page_size:
            self._ghosts[c.depth_digest] = c.hits
            self._ghosts.move_to_end(c.depth_digest)
            if len(self._ghosts) > GHOSTS_PER_SLOT * self._checkpoint_slots.num_total:  # type: ignore[union-attr]
                self._ghosts.popitem(last=False)
        return True

    def _protected(self, c: Checkpoint, path: _Path | None) -> bool:
        """Whether c is kept from a newcomer whose request (`path`) resumed from nothing: c is a live resume point
        (not demoted) on a path that has come back, used within the last PROTECT_POOLS pool sizes of reservations,
        and resumed from at least as often as anything evicted on the newcomer's path. With fewer slots than paths
        that return (4 chats cycling through 3 slots), recency alone evicts each path just before it comes back; this
        keeps some until they do. Counted in reservations asked for, refused ones included, so it expires."""
        if path is None or path.source is not None or c.demoted or not (c.proven or c.hits):
            return False
        return c.hits >= path.ghost_hits and \
            self._reservations - c.used_at < PROTECT_POOLS * self._checkpoint_slots.num_total  # type: ignore

    def _use(self, c: Checkpoint) -> None:
        c.last_access, c.used_at = self.tick, self._reservations  # a value that rises is re-ranked lazily

    def _push(self, c: Checkpoint) -> None:
        """Rank c at its current value (its older entries go stale); rebuild the heap when stale entries outnumber
        the live ones."""
        c.heap_entry = -1
        if len(self._heap) > 2 * len(self._index) + 64:
            self._heap = [entry for entry in self._heap if entry[1] == entry[2].heap_entry]
            heapq.heapify(self._heap)
        c.heap_entry = next(self._entries)
        heapq.heappush(self._heap, (self._value(c), c.heap_entry, c))

    def _demote(self, c: Checkpoint) -> bool:
        """A deeper checkpoint on c's path is expected to serve whoever comes back: c ranks DEMOTED_TICKS older.
        False if it was demoted already."""
        if c.demoted:
            return False
        c.demoted = True
        if c.heap_entry >= 0:  # published, not evicted: re-ranked now (a pending one is ranked when published)
            self._push(c)
        return True

    def _value(self, c: Checkpoint) -> float:
        """Recency, plus how much prefill it saves per token-equivalent of memory it keeps (state + KV pages);
        partial-page checkpoints count as a page older, demoted ones DEMOTED_TICKS older."""
        efficiency = c.position / (c.position + self._state_tokens)
        partial = 1 if c.position % self.page_size else 0
        return c.last_access + EFFICIENCY_WEIGHT * efficiency - partial - (DEMOTED_TICKS if c.demoted else 0)
