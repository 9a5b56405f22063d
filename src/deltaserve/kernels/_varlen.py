"""Walking a flat varlen batch in the reference ops (pure Python over host copies of the metadata)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def live_sequences(cu_seqlens: torch.Tensor, slots: torch.Tensor,
                   has_initial_state: torch.Tensor) -> Iterator[tuple[int, int, int, bool]]:
    """Yield (lo, hi, slot, has_initial_state) for each sequence with a state slot; slot < 0 rows are padding."""
    for _, seq in numbered_live_sequences(cu_seqlens, slots, has_initial_state):
        yield seq


def numbered_live_sequences(cu_seqlens: torch.Tensor, slots: torch.Tensor, has_initial_state: torch.Tensor
                            ) -> Iterator[tuple[int, tuple[int, int, int, bool]]]:
    """live_sequences with each sequence's index n in the batch: (n, (lo, hi, slot, has_initial_state))."""
    bounds = cu_seqlens.tolist()
    for n, (slot, init) in enumerate(zip(slots.tolist(), has_initial_state.tolist())):
        if slot >= 0:
            yield n, (bounds[n], bounds[n + 1], slot, bool(init))
