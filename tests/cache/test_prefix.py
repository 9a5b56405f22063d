"""The prefix index's page chain: a request's digest cache gives what hashing its tokens afresh gives."""

from __future__ import annotations

import random

from deltaserve.cache.prefix import PageChain, chain_digests


def test_page_chain_matches_fresh_hashing_as_tokens_grow_shrink_and_change() -> None:
    rng = random.Random(0)
    chain = PageChain(4, b"ns")
    tokens = [rng.randrange(50) for _ in range(30)]
    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            tokens += [rng.randrange(50) for _ in range(rng.randint(1, 9))]  # a request's tokens grow
        elif op < 0.5 and len(tokens) > 1:
            tokens[rng.randrange(len(tokens))] += 1  # not the tokens hashed before: the chain starts over
        elif op < 0.6:
            tokens = tokens[:rng.randint(1, len(tokens))]
        position = rng.randint(0, len(tokens))
        query = tokens[:rng.randint(position, len(tokens))]  # a caller may pass more tokens than the position
        assert chain.digests(query, position) == chain_digests(tokens, position // 4, 4, b"ns")
