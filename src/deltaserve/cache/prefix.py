"""The prefix index: GDN state checkpoints of token prefixes, found by a hash chain over full KV pages.

A hybrid model can resume a prompt only where it has both the KV of every attention layer and the recurrent state of
every GDN layer. The state is one fixed-size tensor per layer (tens to hundreds of MiB per sequence on real models),
so it is kept only at chosen positions: a checkpoint is the state after its first `position` tokens (a slot of the
checkpoint pool) plus references to the KV pages that hold those tokens. Pure Python: ids only, the runner owns the
tensors.

Keys: page d of a prefix is identified by a digest chained over the digests of pages 0..d (blake2b over the token
ids, so equal digests mean equal prefixes); a checkpoint at a position inside page d is keyed by the digest of its
d full pages and the tuple of its tokens in the partial page.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ROOT = b"deltaserve-prefix-v1"


def chain_digests(tokens: Sequence[int], num_pages: int, page_size: int, namespace: bytes) -> list[bytes]:
    """digests[d] identifies tokens[0 : d * page_size] (digests[0]: the empty prefix of this namespace)."""
    digests = [hashlib.blake2b(ROOT + namespace, digest_size=16).digest()]
    _extend(digests, tokens[:num_pages * page_size], page_size)
    return digests


def _extend(digests: list[bytes], tokens: Sequence[int], page_size: int) -> None:
    """Append the digests of the full pages of `tokens`, which follow the prefix digests[-1] identifies."""
    data, step = np.asarray(tokens, dtype=np.int64).tobytes(), page_size * 8  # bytes slices: cheaper than numpy's
    for start in range(0, len(data) - step + 1, step):
        digests.append(hashlib.blake2b(digests[-1] + data[start:start + step], digest_size=16).digest())


class PageChain:
    """The chain digests of one request's tokens, each page hashed once. A request's prefix is looked up at every
    admission attempt, branch, claim and checkpoint (five hashes of its whole history per resumed chat turn, ~0.5 ms
    each at 8k tokens); its known tokens only grow, so the pages hashed before are still valid."""

    def __init__(self, page_size: int, namespace: bytes) -> None:
        self.page_size = page_size
        self._digests = chain_digests((), 0, page_size, namespace)
        self._tokens: list[int] = []  # the tokens of the hashed pages, to check a call's tokens still start so

    def digests(self, tokens: Sequence[int], position: int) -> list[bytes]:
        """chain_digests of tokens[:position // page_size full pages]."""
        pages = position // self.page_size
        n = min(pages, len(self._digests) - 1) * self.page_size
        # Tokens that do not start with the hashed ones (an id reused for another sequence) start over; the list
        # compare costs a few percent of hashing them.
        if list(tokens[:n]) != self._tokens[:n]:
            del self._digests[1:]
            self._tokens, n = [], 0
        if pages * self.page_size > n:
            new = list(tokens[n:pages * self.page_size])
            _extend(self._digests, new, self.page_size)
            self._tokens = self._tokens[:n] + new
        return self._digests[:pages + 1]


@dataclass(eq=False)
class Checkpoint:
    """The state after `position` tokens, in checkpoint slot `slot`, with the pages holding those tokens (a partial
    last page when position is not a page multiple: only its first position % page_size entries are valid)."""

    position: int
    slot: int
    pages: tuple[int, ...]
    depth_digest: bytes                 # digest of its floor(position / page_size) full pages
    partial: tuple[int, ...]            # its tokens in the partial page
    last_access: int = 0
    used_at: int = 0  # the cache manager's count of checkpoint reservations when it was last used
    hits: int = 0
    chain: tuple[bytes, ...] = field(default=(), repr=False)  # digests of its full-page prefixes, for the index
    # For eviction (CacheManager._value): whether it ends a generation; whether a deeper checkpoint on its path is
    # expected to serve whoever comes back (demoted); the key (position, depth_digest, partial) of the generation end
    # its request took after it (to tell, on a resume from it, whether the next prompt resent the reply); whether its
    # conversation resends replies (True / False once seen, None: not known). Keys, not objects: nothing here keeps
    # a checkpoint alive after it is evicted.
    generated: bool = False
    demoted: bool = False
    tail: tuple[int, bytes, tuple[int, ...]] | None = field(default=None, repr=False)
    pair: tuple[bytes, tuple[int, ...]] | None = field(default=None, repr=False)  # ends of generations: the key of
    # the prompt checkpoint its request took before it
    keeps_replies: bool | None = None
    proven: bool = False  # its path has come back: its request resumed, or passed through a checkpoint evicted since
    inner: bool = False  # its request took a deeper prompt checkpoint after it (a point inside a prompt: shared, maybe)
    heap_entry: int = field(default=-1, repr=False)  # the id of its one valid entry in the eviction heap (-1: none)


class PrefixIndex:
    """Checkpoints by key, and the set of page-chain digests they extend (so a lookup stops where nothing can
    match). Owns no pages or slots: the cache manager does the accounting."""

    def __init__(self, page_size: int, namespace: bytes = b"") -> None:
        self.page_size, self.namespace = page_size, namespace
        self._by_digest: dict[bytes, list[Checkpoint]] = {}
        self._chain_refs: dict[bytes, int] = {}  # digest -> checkpoints whose prefix passes through it
        self.checkpoints: list[Checkpoint] = []

    def __len__(self) -> int:
        return len(self.checkpoints)

    def chain(self) -> PageChain:
        """A digest cache for one growing token sequence (a request's), to pass to the lookups below."""
        return PageChain(self.page_size, self.namespace)

    def digests(self, tokens: Sequence[int], position: int, chain: PageChain | None = None) -> list[bytes]:
        """The chain digests of the full pages of tokens[:position], from `chain` when given (hashing only the pages
        it has not seen)."""
        if chain is None:
            return chain_digests(tokens, position // self.page_size, self.page_size, self.namespace)
        return chain.digests(tokens, position)

    def find(self, tokens: Sequence[int], max_position: int, chain: PageChain | None = None) -> Checkpoint | None:
        """The deepest checkpoint whose tokens are a prefix of `tokens` with position <= max_position."""
        if max_position <= 0 or not self.checkpoints:
            return None
        best = None
        digests = self.digests(tokens, max_position, chain)
        for depth, digest in enumerate(digests):
            if digest not in self._chain_refs:
                break
            start = depth * self.page_size
            for c in self._by_digest.get(digest, ()):
                end = start + len(c.partial)
                if c.position <= max_position and tuple(tokens[start:end]) == c.partial and \
                        (best is None or c.position > best.position):
                    best = c
        return best

    def deepest(self, tokens: Sequence[int], max_position: int, digests: set[bytes] | dict[bytes, int],
                chain: PageChain | None = None) -> int:
        """Full pages of `tokens` whose chain digest is in `digests` (the deepest such depth)."""
        depth = 0
        for d, digest in enumerate(self.digests(tokens, max_position, chain)):
            if d and digest in digests:
                depth = d
        return depth

    def branch_depth(self, tokens: Sequence[int], max_position: int, chain: PageChain | None = None) -> int:
        """Full pages of `tokens` that some checkpoint's prefix shares (where a new sequence branches off)."""
        depth = 0
        for d, digest in enumerate(self.digests(tokens, max_position, chain)):
            if digest not in self._chain_refs:
                break
            depth = d
        return depth

    def key_of(self, tokens: Sequence[int], position: int,
               chain: PageChain | None = None) -> tuple[bytes, tuple[int, ...], list[bytes]]:
        digests = self.digests(tokens, position, chain)
        full = (position // self.page_size) * self.page_size
        return digests[-1], tuple(tokens[full:position]), digests

    def get(self, depth_digest: bytes, partial: tuple[int, ...]) -> Checkpoint | None:
        return next((c for c in self._by_digest.get(depth_digest, ()) if c.partial == partial), None)

    def add(self, c: Checkpoint) -> None:
        self._by_digest.setdefault(c.depth_digest, []).append(c)
        for digest in c.chain:
            self._chain_refs[digest] = self._chain_refs.get(digest, 0) + 1
        self.checkpoints.append(c)

    def remove(self, c: Checkpoint) -> None:
        bucket = self._by_digest[c.depth_digest]
        bucket.remove(c)
        if not bucket:
            del self._by_digest[c.depth_digest]
        for digest in c.chain:
            self._chain_refs[digest] -= 1
            if not self._chain_refs[digest]:
                del self._chain_refs[digest]
        self.checkpoints.remove(c)
