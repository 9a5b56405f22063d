"""CUDA graphs for short varlen steps: prefill chunks of a few hundred tokens, alone or beside a few decode rows.

Such a step is launch-bound when run eagerly: a 200-token chunk of a resumed chat turn costs the whole model's kernel
launches (27B: ~1,400, over 100 ms of host time on an H200 against ~35 ms of GPU work). A graph is captured per key
(R rows, T tokens); a step of n <= R rows and t < T tokens replays the smallest key that fits, padded to the key's
fixed shapes:

- rows 0 .. n-1 are the step's rows; row n is a padding row holding the T - t >= 1 padding tokens; rows n+1 .. R+1
  hold no tokens. Padding rows have state slot -1 (no GDN state read or written), no KV slot (slot_mapping -1) and
  block-table row 0 (read, never written), so a replay computes the real rows exactly as the eager step would;
- the chunked delta rule's chunk list (fla-core's layout, built on the host) has a fixed length: after the real and
  padding chunks come entries repeating the padding row's first chunk. Those compute garbage (fla's output kernel
  reads the per-chunk state at the entry's list position, which no real chunk wrote) but write only the padding
  row's tokens, which the delta-rule wrapper zeroes (any_padding); real rows never read them;
- every per-step array goes in one host-to-device copy into the key's static buffer (device_inputs.upload_arrays).

Steps with prompt logprobs or verify steps (their own graphs, cuda_graph.py) run eagerly, as do larger steps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from deltaserve.cache.tensors import ModelCache
from deltaserve.engine.device_inputs import _forward_arrays, chunk_indices, packed_size, upload_arrays
from deltaserve.engine.step_input import StepInput
from deltaserve.layers.forward_batch import GDN_CHUNK_SIZE, ForwardBatch

log = logging.getLogger(__name__)

ROW_SIZES = (1, 4, 16)


def full_step_tokens(step_tokens: int) -> int:
    """The bucket that fits a step of step_tokens (the scheduler's token budget) with its padding row:
    step_tokens + 1 rounded up to a multiple of 64."""
    return -(-(step_tokens + 1) // GDN_CHUNK_SIZE) * GDN_CHUNK_SIZE


def token_sizes(max_tokens: int, step_tokens: int | None = None) -> list[int]:
    """Token buckets (a step of t tokens needs a bucket T > t), none above max_tokens: 64 doubling, and with
    step_tokens (the scheduler's token budget) only while below a step of that many tokens, then one bucket that
    fits such a step with its padding row: step_tokens + 1 rounded up to a multiple of 64 (a full 2,048-token prefill
    chunk replays 2,112 tokens instead of launching the whole model from Python, which costs an MoE model's chunk
    three times its GPU time)."""
    full = None if step_tokens is None else full_step_tokens(step_tokens)
    sizes, t = [], 64
    while t <= max_tokens and (full is None or t < full):
        sizes.append(t)
        t *= 2
    if full is not None and full <= max_tokens:
        sizes.append(full)
    return sizes


def padded_arrays(step: StepInput, rows: int, tokens: int, width: int, page_size: int) -> list[np.ndarray]:
    """The step's arrays at the key's fixed shapes (module docstring): input ids (0 where pending), positions, KV
    slots, cu_seqlens int32 and int64, KV lengths, state slots, has_initial_state, block tables, chunk list, logits
    rows."""
    n, t = step.num_rows, int(step.query_lens.sum())
    pad_rows = rows + 2 - n
    q = np.concatenate([step.query_lens, [tokens - t], np.zeros(pad_rows - 1, np.int32)]).astype(np.int32)
    ctx = np.concatenate([step.context_lens, np.zeros(pad_rows, np.int32)]).astype(np.int32)
    table = np.zeros((rows + 2, width), np.int32)
    table[:n, :step.block_table.shape[1]] = step.block_table
    row_of_token = np.repeat(np.arange(rows + 2), q)
    arrays = _forward_arrays(q, ctx, table, row_of_token, page_size)
    arrays["slot_mapping"][t:] = -1
    chunks = chunk_indices(q)
    filler = np.tile(np.array([[n, 0]], np.int64), (chunk_capacity(rows, tokens) - len(chunks), 1))
    logits = np.zeros(rows, np.int64)
    logits[:step.logits_rows.shape[0]] = step.logits_rows
    ids = np.zeros(tokens, np.int64)
    ids[:t] = np.where(step.input_ids < 0, 0, step.input_ids)
    cu = arrays["cu"]
    return [ids, arrays["positions"], arrays["slot_mapping"], cu, cu.astype(np.int64), ctx + q,
            np.concatenate([step.state_slots, np.full(pad_rows, -1, np.int64)]),
            np.concatenate([step.has_initial_state, np.zeros(pad_rows, np.bool_)]), table,
            np.concatenate([chunks, filler]), logits]


def chunk_capacity(rows: int, tokens: int) -> int:
    """Chunks a key's list holds: the real rows' (at most t/64 + n) and the padding row's (at most P/64 + 1)."""
    return tokens // GDN_CHUNK_SIZE + rows + 2


def padded_batch(views: list[torch.Tensor]) -> tuple[torch.Tensor, ForwardBatch]:
    """(input ids, ForwardBatch) over the device views of padded_arrays' output. cu64 goes in as a fresh view each
    time: fla-core memoizes index tensors derived from cu_seqlens by the tensor object's identity (its
    `tensor_cache`), so a capture after warm-up calls with the same object would bake in tensors computed outside the
    graph from the warm-up's lengths; a new object makes the capture compute them inside the graph."""
    ids, pos, mapping, cu, cu64, lens, slots, init, table, chunks, logits = views
    cu64 = cu64.view(cu64.shape)
    return ids, ForwardBatch(positions=pos, cu_seqlens=cu, seq_lens=lens, state_slots=slots, has_initial_state=init,
                             block_tables=table, slot_mapping=mapping, logits_indices=logits, tokens_per_row=None,
                             chunk_indices=chunks, cu_seqlens_long=cu64, any_padding=True)


class VarlenGraphs:
    """Owns one static buffer and one graph per (rows, tokens) key; used only by the ModelRunner."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, *, max_tokens: int, max_rows: int,
                 max_pages: int, page_size: int, device: torch.device, step_tokens: int | None = None) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.row_sizes = sorted({r for r in ROW_SIZES if r < max_rows} | {min(max_rows, ROW_SIZES[-1])})
        self.token_sizes = token_sizes(max_tokens, step_tokens)
        # the padding row's positions reach T - 1: its block-table row must be that wide even where max_model_len
        # is shorter (real rows are held to max_pages by key_for)
        self.page_size, self.max_pages = page_size, max_pages
        self.width = max([max_pages] + [-(-t // page_size) for t in self.token_sizes])
        # key -> (graph, static byte buffer, hidden, logits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.replays = 0

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(r, t) for r in self.row_sizes for t in self.token_sizes]

    def _forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, batch = padded_batch(views)
        hidden = self.model(ids, batch, self.cache)
        return hidden, self.model.compute_logits(hidden[batch.logits_indices], upcast=False)

    def _empty_step(self) -> StepInput:
        z32, z64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return StepInput(input_ids=z64, query_lens=z32, context_lens=z32, state_slots=z64,
                         has_initial_state=np.zeros(0, np.bool_), block_table=np.zeros((0, 1), np.int32),
                         logits_rows=z64, sampling=())

    @torch.no_grad()
    def capture(self, pool=None) -> None:
        """Capture every key, largest first so the smaller graphs reuse its memory (`pool`: the decode graphs'). A
        key that fails to capture is dropped (its steps run eagerly) without giving up the others."""
        for key in sorted(self.keys, reverse=True):
            try:
                pool = self._capture_key(key, pool)
            except Exception as e:  # noqa: BLE001 - e.g. an op that syncs the host at this many tokens
                # a capture that raised can leave its side stream current: later work must go on the default one
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                log.warning("CUDA graph capture of varlen steps %s failed (%s: %s); they run eagerly", key,
                            type(e).__name__, e)
        torch.cuda.synchronize(self.device)

    def _capture_key(self, key: tuple[int, int], pool):
        arrays = padded_arrays(self._empty_step(), *key, self.width, self.page_size)
        static = torch.empty(packed_size(arrays), dtype=torch.uint8, device=self.device)
        views = upload_arrays(arrays, self.device, out=static)  # all padding: nothing read or written
        for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
            self._forward(views)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden, logits = self._forward(views)
        self.graphs[key] = (graph, static, hidden, logits)
        return graph.pool()

    def key_for(self, step: StepInput) -> tuple[int, int] | None:
        """The smallest captured key that fits a varlen step, None if none does (or the step needs the eager path:
        prompt logprobs, draft verification, uniform decode)."""
        if step.tokens_per_row == 1 or step.is_verify or step.prompt_logprobs or not self.graphs:
            return None
        n, t = step.num_rows, int(step.query_lens.sum())
        if step.logits_rows.shape[0] > n or step.block_table.shape[1] > self.max_pages:
            return None
        return self._key(n, t)

    def fits(self, num_rows: int, num_tokens: int) -> bool:
        """Whether a plain varlen step (no prompt logprobs, no drafts) of this many rows and tokens has a graph."""
        return self._key(num_rows, num_tokens) is not None

    def _key(self, num_rows: int, num_tokens: int) -> tuple[int, int] | None:
        rows = next((r for r in self.row_sizes if r >= num_rows), None)
        tokens = next((s for s in self.token_sizes if s > num_tokens), None)
        return (rows, tokens) if (rows, tokens) in self.graphs else None

    @torch.no_grad()
    def run(self, key: tuple[int, int], step: StepInput, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the key's graph on the step; returns (hidden [t, D], logits [M, V]) of its real tokens and logits
        rows. input_ids: the step's [t] token ids on the device (pending ones filled in)."""
        graph, static, hidden, logits = self.graphs[key]
        ids = upload_arrays(padded_arrays(step, *key, self.width, self.page_size), self.device, out=static)[0]
        t = input_ids.shape[0]
        ids[:t].copy_(input_ids)
        graph.replay()
        self.replays += 1
        return hidden[:t], logits[:step.logits_rows.shape[0]]
