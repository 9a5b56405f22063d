"""CUDA graphs for uniform steps: one graph per (padded batch size, tokens per row), static inputs updated with copy_.

A step whose rows all carry the same number k of new tokens after an existing state (k = 1: plain decode) replays
the graph of the smallest captured batch size that fits. Padding rows have state slot -1, KV slot -1 and sequence
length 0: every kernel skips them, so a padded replay computes exactly the real rows. Varlen steps (prefill chunks,
mixed batches) have graphs of their own when short (varlen_graph.py) and run eagerly otherwise. k = 1 is always captured; with speculative decoding the
verify steps (k = 2 .. 1 + K, GDN layers keeping each position's recurrence inputs) are captured up to the batch
size the per-position buffers hold.
"""

from __future__ import annotations

import logging

import torch

from deltaserve.cache.tensors import ModelCache
from deltaserve.layers.forward_batch import ForwardBatch

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class StepGraphs:
    """Owns the static input/output buffers and the captured graphs; used only by the ModelRunner."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, max_batch: int, max_pages: int,
                 device: torch.device, tokens_per_row: tuple[int, ...] = (1,), max_verify_batch: int = 0) -> None:
        """tokens_per_row: the keys k to capture; k > 1 are verify steps, captured for batch sizes up to
        max_verify_batch."""
        self.model, self.cache, self.device = model, cache, device
        self.sizes = capture_sizes(max_batch)
        self.verify_sizes = [s for s in capture_sizes(min(max_verify_batch, max_batch))] if max_verify_batch else []
        self.tokens_per_row = tokens_per_row if self.verify_sizes else tuple(k for k in tokens_per_row if k == 1)
        self.max_batch, self.max_pages = self.sizes[-1], max_pages
        n = self.max_batch * max(tokens_per_row)  # tokens
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.rows = torch.arange(n, dtype=i64, device=device)
        self.seq_lens = torch.zeros(self.max_batch, dtype=i32, device=device)
        self.slots = torch.full((self.max_batch,), -1, dtype=i64, device=device)
        self.block_tables = torch.zeros(self.max_batch, max_pages, dtype=i32, device=device)
        self.cu_seqlens = {k: torch.arange(0, k * (self.max_batch + 1), k, dtype=i32, device=device)
                           for k in tokens_per_row}
        self.has_state = torch.ones(self.max_batch, dtype=torch.bool, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _batch(self, bs: int, k: int) -> ForwardBatch:
        t = bs * k
        return ForwardBatch(positions=self.positions[:t], cu_seqlens=self.cu_seqlens[k][:bs + 1],
                            seq_lens=self.seq_lens[:bs], state_slots=self.slots[:bs],
                            has_initial_state=self.has_state[:bs], block_tables=self.block_tables[:bs],
                            slot_mapping=self.slot_mapping[:t], logits_indices=self.rows[:t], tokens_per_row=k,
                            any_padding=True, keep_states=k > 1)

    def _forward(self, bs: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.input_ids[:bs * k], self._batch(bs, k), self.cache)
        return hidden, self.model.compute_logits(hidden, upcast=False)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every key, largest batch first so smaller graphs reuse its memory pool. A verify key that fails
        to capture is dropped (its steps run eagerly) without giving up the decode graphs."""
        self._reset_inputs(0, max(self.tokens_per_row))
        for k in self.tokens_per_row:
            try:
                self._capture_key(k)
            except Exception as e:
                if k == 1:
                    raise
                log.warning("CUDA graph capture of verify steps with %d tokens per row failed (%s: %s); they run "
                            "eagerly", k, type(e).__name__, e)
                self.tokens_per_row = tuple(t for t in self.tokens_per_row if t != k)
                for key in [key for key in self.graphs if key[1] == k]:
                    del self.graphs[key]
        torch.cuda.synchronize(self.device)

    def _capture_key(self, k: int) -> None:
        for bs in reversed(self._sizes(k)):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self._forward(bs, k)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden, logits = self._forward(bs, k)
            self.pool = graph.pool()
            self.graphs[(bs, k)] = (graph, hidden, logits)

    def _sizes(self, k: int) -> list[int]:
        return self.sizes if k == 1 else self.verify_sizes

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.fits(batch.tokens_per_row, batch.keep_states, batch.num_seqs, batch.block_tables.shape[1])

    def fits(self, k: int | None, keep_states: bool, num_seqs: int, table_width: int) -> bool:
        """Whether a step of this shape replays a graph (the host side asks too: LLMEngine.step, via the runner)."""
        if k not in self.tokens_per_row or not self.graphs or keep_states != (k > 1):
            return False  # a uniform k > 1 step that is not a verify step (equal prefill chunks) runs eagerly
        return num_seqs <= self._sizes(k)[-1] and table_width <= self.max_pages

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest graph that fits; returns (hidden [T, D], logits [T, V]) for the real rows' tokens
        (every token of a uniform step is a logits row)."""
        n, k = batch.num_seqs, batch.tokens_per_row
        assert k is not None
        bs = next(s for s in self._sizes(k) if s >= n)
        t = n * k
        self._reset_inputs(n, k)
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.slots[:n].copy_(batch.state_slots)
        self.block_tables[:n, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        graph, hidden, logits = self.graphs[(bs, k)]
        graph.replay()
        return hidden[:t], logits[:t]

    def _reset_inputs(self, n: int, k: int) -> None:
        """Rows from n on are padding: no state slot, no KV slot, no context."""
        self.seq_lens[n:].zero_()
        self.slots[n:].fill_(-1)
        self.slot_mapping[n * k:].fill_(-1)
        self.input_ids[n * k:].zero_()
        self.positions[n * k:].zero_()
