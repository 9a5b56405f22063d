"""CUDA graphs for decode-only steps: one graph per padded batch size, static inputs updated with copy_.

Padding rows have state slot -1, KV slot -1 and sequence length 0: every kernel skips them, so a padded replay
computes exactly the real rows. Mixed prefill steps stay eager (their shapes vary every step).
"""

from __future__ import annotations

import logging

import torch

from deltaserve.layers.meta import ForwardBatch

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """Owns the static input/output buffers and the captured graphs; used only by the ModelRunner."""

    def __init__(self, model, cache, *, max_batch: int, max_pages: int, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.sizes = capture_sizes(max_batch)
        self.max_batch, self.max_pages = self.sizes[-1], max_pages
        n, i64, i32 = self.max_batch, torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.slots = torch.full((n,), -1, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.block_tables = torch.zeros(n, max_pages, dtype=i32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=i32, device=device)
        self.rows = torch.arange(n, dtype=i64, device=device)
        self.has_state = torch.ones(n, dtype=torch.bool, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(positions=self.positions[:bs], cu_seqlens=self.cu_seqlens[:bs + 1],
                            seq_lens=self.seq_lens[:bs], state_slots=self.slots[:bs],
                            has_initial_state=self.has_state[:bs], block_tables=self.block_tables[:bs],
                            slot_mapping=self.slot_mapping[:bs], logits_indices=self.rows[:bs], is_decode=True)

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.input_ids[:bs], self._batch(bs), self.cache)
        return hidden, self.model.compute_logits(hidden, upcast=False)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        self._reset_inputs(0)
        for bs in reversed(self.sizes):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self._forward(bs)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden, logits = self._forward(bs)
            self.pool = graph.pool()
            self.graphs[bs] = (graph, hidden, logits)
        torch.cuda.synchronize(self.device)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.is_decode and bool(self.graphs) and batch.num_seqs <= self.max_batch
                and batch.block_tables.shape[1] <= self.max_pages)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest graph that fits; returns (hidden [N, D], logits [N, V]) for the real rows."""
        n = batch.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self._reset_inputs(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(batch.positions)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.slots[:n].copy_(batch.state_slots)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.block_tables[:n, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        graph, hidden, logits = self.graphs[bs]
        graph.replay()
        return hidden[:n], logits[:n]

    def _reset_inputs(self, n: int) -> None:
        """Rows from n on are padding: no state slot, no KV slot, no context."""
        self.seq_lens[n:].zero_()
        self.slots[n:].fill_(-1)
        self.slot_mapping[n:].fill_(-1)
        self.input_ids[n:].zero_()
        self.positions[n:].zero_()
