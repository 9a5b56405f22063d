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
checkpoints are evicted by value (`_evict_one`): first by what they are still worth as resume points (those a later
request has gone past go first, then ends of generations that only extend their own prompt's checkpoint), then by
recency, raised for those that save the most prefill per byte kept (as Marconi weighs FLOP efficiency), partial-page
ones first. A new checkpoint worth less than every one it would evict is not taken, nor one that would evict a
resume point younger than the time paths take to come back (`_protected`: with fewer slots than paths in use,
keeping some until they return beats cycling all of them out).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from deltaserve.cache.allocator import PageAllocator, SlotAllocator, pages_for_tokens
from deltaserve.cache.prefix import Checkpoint, PageChain, PrefixIndex

# A checkpoint that saves the most prefill per byte is kept as if it had been used this many schedule() calls later.
EFFICIENCY_WEIGHT = 64

# What a checkpoint is still worth as a resume point, the first part of its value (see CacheManager._rank).
SUPERSEDED, TAIL, RESUME_POINT = 0, 1, 2

# A new checkpoint does not evict a resume point used less than this many typical return times ago (returns vary).
PROTECT_RETURNS = 2
# How many checkpoints gone (evicted or refused) per checkpoint slot are remembered, to see when one is missed.
GHOSTS_PER_SLOT = 2


class StateSource(enum.Enum):
    """Where a step's row takes its GDN state (conv window and recurrent state) from."""

    ZEROS = "zeros"  # the row starts at position 0: the state starts from zeros, the slot's content is ignored
    SLOT = "slot"    # the row continues the state its slot holds (left by its last step, or copied in this one)


class StateCopy(NamedTuple):
    """Copy every GDN layer's state of slot `src` into slot `dst`."""

    src: int
    dst: int


class PageCopy(NamedTuple):
    """Copy every attention layer's K/V of page `src` into page `dst`."""

    src: int
    dst: int


@dataclass(frozen=True)
class PrefixMatch:
    """Leading tokens of a prompt whose KV pages and GDN state are cached: the full pages to share, the partial last
    page to copy (if num_tokens is not a page multiple) and the checkpoint slot to copy the state from."""

    num_tokens: int = 0
    pages: tuple[int, ...] = ()
    partial_page: int | None = None
    state_slot: int | None = None
    checkpoint: Checkpoint | None = None


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


@dataclass
class Ghost:
    """A checkpoint gone (evicted or refused): how deep it was, when it was last used, and how many prompts have
    passed through it since (wanted it back)."""

    depth: int
    last_access: int
    misses: int = 0


class CacheManager:
    """Owns the page and slot allocators, every running request's Allocation and the prefix cache; the scheduler
    asks it for memory. Pages are reference-counted (requests and checkpoints share them); `free` drops a request's
    references and its slot, so once every request has ended only checkpoints hold anything (none after
    `reset_prefix_cache`)."""

    def __init__(self, *, num_pages: int, num_slots: int, page_size: int, num_checkpoints: int = 0,
                 namespace: bytes = b"", state_tokens: int = 1024) -> None:
        """num_checkpoints: size of the checkpoint pool (0: no prefix caching); their slot ids follow the running
        slots'. namespace: what else the KV depends on (the model). state_tokens: a checkpoint's state size in KV
        tokens (what it costs to keep, against what it saves)."""
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.page_size = page_size
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
        # each running request's deepest checkpoint so far (the parent of its next one), and whether it resumed there
        self._path_ends: dict[str, tuple[Checkpoint, bool]] = {}
        # Return times: how long a path stays unused before a request resumes from it (or would have, had its
        # checkpoint not gone: the page digest of each recent one gone, with its depth in pages and last use).
        self._return_ticks = 0.0  # moving average
        self._ghosts: OrderedDict[bytes, Ghost] = OrderedDict()
        self._state_tokens = state_tokens
        self.tick = 0  # advanced by the scheduler once per step: the clock of checkpoint recency
        self.counters = {"checkpoints_taken": 0, "checkpoint_evictions": 0, "prefix_hits": 0,
                         "prompt_tokens_cached": 0}

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
        c = self._index.find(token_ids, len(token_ids) - 1, self._chain(request_id)) if self.prefix_caching else None
        if c is None:
            return NO_MATCH
        full = c.position // self.page_size
        partial = c.pages[full] if c.position % self.page_size else None
        return PrefixMatch(c.position, c.pages[:full], partial, c.slot, c)

    def branch_position(self, token_ids: Sequence[int], limit: int, request_id: str | None = None) -> int:
        """The page-aligned position up to which `token_ids` shares pages with some checkpoint's prefix (where a new
        sequence branches off a cached path), at most `limit`."""
        if not self.prefix_caching:
            return 0
        return self._index.branch_depth(token_ids, limit, self._chain(request_id)) * self.page_size

    def can_admit(self, num_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        """A free slot and the pages for positions [0, num_tokens) beyond the matched full pages (checkpoints are
        evicted for them if need be, except the matched one)."""
        if self._slots.num_free == 0:
            return False
        need = self.pages_needed(num_tokens) - len(match.pages)
        return self._make_room(need, keep=match.checkpoint)

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
        if match.checkpoint is not None:
            self._resumed(request_id, match.checkpoint)
            allocation.state_copy = StateCopy(match.state_slot, slot)  # type: ignore[arg-type]
            if match.partial_page is not None:
                allocation.page_copy = PageCopy(match.partial_page, fresh[0])
        self._missed(request_id, match.num_tokens)
        self._held[request_id] = allocation
        return allocation

    def _resumed(self, request_id: str, c: Checkpoint) -> None:
        self._note_return(self.tick - c.last_access)
        c.hits += 1
        self.counters["prefix_hits"] += 1
        self._path_ends[request_id] = (c, True)
        self._touch(c, reused=True)

    def _touch(self, c: Checkpoint | None, reused: bool = False) -> None:
        """A request's path runs through c and every checkpoint c extends: all are used now (as a radix cache's LRU
        touches every node of a matched path: a shared system prompt stays as recent as the last request on it)."""
        while c is not None:
            c.last_access = self.tick
            c.reused |= reused
            c = c.parent

    def _missed(self, request_id: str, matched: int) -> None:
        """Checkpoints gone since, deeper than the match, on the admitted prompt's path: they were wanted back (the
        deepest tells the return time; each keeps the count, for when it is taken again)."""
        chain = self._chains.get(request_id)
        if not self._ghosts or chain is None:
            return
        missed = [g for g in (self._ghosts.get(d) for d in chain.hashed) if g and g.depth * self.page_size > matched]
        if missed:
            self._note_return(self.tick - max(missed, key=lambda g: g.depth).last_access)
        for ghost in missed:
            ghost.last_access, ghost.misses = self.tick, ghost.misses + 1

    def _note_return(self, ticks: int) -> None:
        """Average the return times, the first one taken as it is (a pool under pressure learns it at once)."""
        self._return_ticks += (ticks - self._return_ticks) / 4 if self._return_ticks else ticks

    def _remember_gone(self, c: Checkpoint, last_access: int) -> None:
        """Keep an evicted or refused checkpoint's key a while, to notice prompts that would have resumed there."""
        if c.position >= self.page_size:
            self._ghosts[c.depth_digest] = Ghost(c.position // self.page_size, last_access, c.hits)
            self._ghosts.move_to_end(c.depth_digest)
            if len(self._ghosts) > GHOSTS_PER_SLOT * self._checkpoint_slots.num_total:  # type: ignore[union-attr]
                self._ghosts.popitem(last=False)

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
        end, _ = self._path_ends.pop(request_id, (None, False))
        self._touch(end)  # its path was in use until now
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
                existing.last_access = self.tick
                self._path_ends[request_id] = (existing, False)
                self._release_claim(request_id, depth_digest)
            return None
        parent, resumed = self._path_ends.get(request_id, (None, False))
        ghost = self._ghosts.pop(depth_digest, None)  # taken again: the prompts that missed it count as its hits
        c = Checkpoint(position, -1, tuple(allocation.pages[:self.pages_needed(position)]), depth_digest, partial,
                       self.tick, hits=ghost.misses if ghost else 0, chain=tuple(digests), parent=parent,
                       generated=generated, continues=resumed)
        if self._checkpoint_slots.num_free == 0 and not self._evict_one(newcomer=c):
            self._release_claim(request_id, depth_digest)
            return None
        self._pages.share(c.pages)
        c.slot = self._checkpoint_slots.allocate() + self._slots.num_total
        self._path_ends[request_id] = (c, False)
        pending = PendingCheckpoint(c, StateCopy(allocation.slot, c.slot), request_id)
        self._pending.append(pending)
        return pending

    def publish(self, pending: PendingCheckpoint) -> None:
        """The snapshot's step is launched: the checkpoint can be matched from now on (device work runs in launch
        order, so any step that reads it runs after the copy)."""
        self._pending.remove(pending)
        self._index.add(pending.checkpoint)
        self.counters["checkpoints_taken"] += 1
        self._release_claim(pending.request_id, pending.checkpoint.depth_digest)

    def cancel(self, pending: PendingCheckpoint) -> None:
        self._pending.remove(pending)
        self._release(pending.checkpoint)
        self._unlink([pending.checkpoint])
        self._release_claim(pending.request_id, pending.checkpoint.depth_digest)

    def reset_prefix_cache(self) -> None:
        """Drop every checkpoint (and the pages only they hold), and what was learned of return times."""
        dropped = list(self._index.checkpoints)
        for c in dropped:
            self._index.remove(c)
            self._release(c)
        self._unlink(dropped)
        self._ghosts.clear()
        self._return_ticks = 0.0

    def _release(self, c: Checkpoint) -> None:
        self._pages.free(c.pages)
        self._checkpoint_slots.free(c.slot - self._slots.num_total)  # type: ignore[union-attr]

    def _unlink(self, gone: list[Checkpoint], newcomer: Checkpoint | None = None) -> None:
        """No links to checkpoints that are gone (nor chains of dead ones kept alive): their children lose their
        parent, the requests whose path ended there their path end."""
        ids = {id(c) for c in gone}
        for child in self._lineage(newcomer):
            if id(child.parent) in ids:
                child.parent = None
        for request_id, (end, _) in list(self._path_ends.items()):
            if id(end) in ids:
                del self._path_ends[request_id]

    def _lineage(self, newcomer: Checkpoint | None) -> list[Checkpoint]:
        """Every checkpoint that can have a parent: published, pending, and the one asking for a slot."""
        return [*self._index.checkpoints, *(p.checkpoint for p in self._pending), *([newcomer] if newcomer else [])]

    def _make_room(self, pages: int, keep: Checkpoint | None = None) -> bool:
        """Evict checkpoints until `pages` pages are free; False if they cannot be freed."""
        while pages > self._pages.num_free:
            if not self._evict_one(keep):
                return False
        return True

    def _evict_one(self, keep: Checkpoint | None = None, newcomer: Checkpoint | None = None) -> bool:
        """Evict the least valuable checkpoint but `keep`; False if there is none, or if `newcomer` (a checkpoint
        asking for a slot) is worth less than it: a new checkpoint must not push out one worth more (with fewer
        slots than conversations, an end of generation would otherwise evict the resume point of the conversation
        that comes back next)."""
        candidates = [c for c in self._index.checkpoints if c is not keep]
        if not candidates:
            return False
        children: dict[int, list[Checkpoint]] = {}
        for c in self._lineage(newcomer):
            if c.parent is not None:
                children.setdefault(id(c.parent), []).append(c)
        in_use = self._in_use()

        def value(c: Checkpoint) -> tuple[int, float]:
            return self._rank(c, children.get(id(c), [])), self._value(c, id(c) in in_use)

        victim = min(candidates, key=value)
        if newcomer is not None and (value(newcomer) < value(victim) or
                                     self._protected(victim, value(victim)[0], newcomer, id(victim) in in_use)):
            self._remember_gone(newcomer, self.tick)
            return False
        self._index.remove(victim)
        self._release(victim)
        self._unlink([victim], newcomer)
        self._remember_gone(victim, victim.last_access)
        self.counters["checkpoint_evictions"] += 1
        return True

    def _protected(self, c: Checkpoint, rank: int, newcomer: Checkpoint, in_use: bool) -> bool:
        """A resume point that may still be wanted, against a newcomer resumed or missed no more often: one on a
        running request's path (that request is about to extend it), or one used less than a few typical return
        times ago. Recency alone cycles every path out of a pool too small for all of them (4 chat conversations
        returning in turn to 3 slots: each is evicted just before it returns); refusing new ones keeps some paths
        until they return. The return time (from a request's end to the next resume on its path) is learned from
        resumes, and from prompts that pass through a checkpoint gone since (without those a pool that never hits
        would never learn it); 0 until then."""
        return rank == RESUME_POINT and c.hits >= newcomer.hits and (
            in_use or self.tick - c.last_access < PROTECT_RETURNS * self._return_ticks)

    def _in_use(self) -> set[int]:
        """ids of the checkpoints on running requests' paths: each one's deepest and those it extends."""
        ids: set[int] = set()
        for c, _ in self._path_ends.values():
            while c is not None and id(c) not in ids:
                ids.add(id(c))
                c = c.parent  # type: ignore[assignment]
        return ids

    @staticmethod
    def _rank(c: Checkpoint, children: list[Checkpoint]) -> int:
        """SUPERSEDED: a later request went past it on its one path (resumed from what extends it, or resumed from it
        and checkpointed its own prompt further), and at most one request ever resumed from it: whoever follows that
        path next matches the deeper checkpoint. A chat's end of generation once the next turn has checkpointed its
        prompt; the prompt checkpoint of a turn once the next resumed from its end of generation. Not for a
        checkpoint that several requests resumed from (a shared system prompt), nor one whose path branches.
        TAIL: an end of generation that extends its own prompt's checkpoint by the generated tokens only. Whether
        the next turn resends them is up to the chat template (Qwen3.5 drops past <think> blocks: the next turn
        resumes from the prompt checkpoint), so of the two this one goes first: it saves one reply's prefill, the
        prompt checkpoint may save the whole history.
        RESUME_POINT: the rest, each the only resume point known for its path."""
        if c.hits <= 1 and len(children) == 1 and (children[0].reused or
                                                   (children[0].continues and not children[0].generated)):
            return SUPERSEDED
        if c.generated and c.parent is not None and not c.continues:
            return TAIL
        return RESUME_POINT

    def _value(self, c: Checkpoint, in_use: bool = False) -> float:
        """Recency (now, for one on a running request's path), plus how much prefill it saves per token-equivalent
        of memory it keeps (state + KV pages); partial-page checkpoints count as a page older."""
        efficiency = c.position / (c.position + self._state_tokens)
        partial = 1 if c.position % self.page_size else 0
        return (self.tick if in_use else c.last_access) + EFFICIENCY_WEIGHT * efficiency - partial
