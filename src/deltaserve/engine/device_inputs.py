"""StepInput -> device tensors: the ForwardBatch every layer reads, the token ids (pending ones filled from the
device), and where sampled tokens go. Runs in the runner, the only writer of device tensors.

All metadata of a step is computed with numpy on the host and sent in one copy (`upload_arrays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from deltaserve.engine.step_input import StepInput, carried_column
from deltaserve.layers.forward_batch import GDN_CHUNK_SIZE, ForwardBatch, MixedVerify


@dataclass(frozen=True)
class DeviceStep:
    """A step's device inputs. input_ids holds 0 where the token is pending (or a draft only the device has) until
    `input_ids_from` fills it."""

    input_ids: torch.Tensor      # [T] int64
    batch: ForwardBatch
    pending_rows: torch.Tensor   # [P] int64 rows of input_ids that only the device knows
    pending_slots: torch.Tensor  # [P] int64 state slot whose carried tokens hold each of them
    sample_slots: torch.Tensor   # [R] int64 state slot of each sampling request, in order
    pending_columns: torch.Tensor | None = None  # [P] int64 column of the carried tokens (None: all 0)

    def input_ids_from(self, carried: torch.Tensor | None) -> torch.Tensor:
        """input_ids with the pending tokens read from `carried` ([num_slots, C] int64 on the device: each slot's
        last sampled token in column 0, the drafts proposed for it after; step_input.carried_column)."""
        if self.pending_rows.numel() == 0:
            return self.input_ids
        if carried is None:
            raise RuntimeError("the batch has pending tokens but no device buffer of last sampled tokens was given")
        values = carried[self.pending_slots, 0] if self.pending_columns is None else \
            carried[self.pending_slots, self.pending_columns]
        if self.pending_rows.numel() == self.input_ids.numel():  # a decode step: every input is pending
            return values
        ids = self.input_ids.clone()
        ids[self.pending_rows] = values
        return ids


def upload_step(step: StepInput, *, page_size: int, device: torch.device | str) -> DeviceStep:
    """Every array of the step, computed on the host and sent to `device` in one copy."""
    n = step.num_rows
    row_of_token = np.repeat(np.arange(n), step.query_lens)
    pending_rows = np.flatnonzero(step.input_ids < 0)
    columns = carried_column(step.input_ids[pending_rows])
    columns = [columns] if columns.any() else []  # (only device drafts need a column other than 0)
    arrays = _forward_arrays(step.query_lens, step.context_lens, step.block_table, row_of_token, page_size)
    k = step.tokens_per_row
    verify = step.num_verify_rows
    if verify:
        _check_verify_rows(step, verify)
    mixed = 0 < verify < n  # a verify step carrying prefill chunks: the GDN layers run those rows chunked
    if mixed:
        rest_cu = arrays["cu"][verify:] - arrays["cu"][verify]
        chunks = [rest_cu, *_chunk_arrays(step.query_lens[verify:], rest_cu)]
    else:
        chunks = _chunk_arrays(step.query_lens, arrays["cu"]) if k != 1 and not verify else []
    # each sampling request's row is the row of its last logits row
    last_logits = np.cumsum([s.num_logits_rows for s in step.sampling], dtype=np.int64) - 1
    sample_rows = row_of_token[step.logits_rows[last_logits]] if step.sampling else np.zeros(0, np.int64)
    host = [np.where(step.input_ids < 0, 0, step.input_ids), arrays["positions"], arrays["cu"],
            (step.context_lens + step.query_lens).astype(np.int32), step.state_slots, step.has_initial_state,
            step.block_table, arrays["slot_mapping"], np.concatenate([step.logits_rows, step.prompt_logits_rows]),
            pending_rows,
            step.state_slots[row_of_token[pending_rows]], step.state_slots[sample_rows], *columns, *chunks]
    (ids, pos, cu, lens, slots, init, tables, mapping, logits, p_rows, p_slots, s_slots,
     *rest) = upload_arrays(host, device)
    p_columns, chunk_dev = (rest[0], rest[1:]) if columns else (None, rest)
    any_padding = bool((step.state_slots < 0).any())
    split = None
    if mixed:  # the chunk arrays are the rest's (k is None: a varlen step)
        t = verify * (1 + step.num_drafts)
        rest_cu, rest_cu_long, rest_chunks = chunk_dev
        rest = ForwardBatch(positions=pos[t:], cu_seqlens=rest_cu, seq_lens=lens[verify:],
                            state_slots=slots[verify:], has_initial_state=init[verify:], block_tables=tables[verify:],
                            slot_mapping=mapping[t:], logits_indices=logits[:0], tokens_per_row=None,
                            chunk_indices=rest_chunks, cu_seqlens_long=rest_cu_long, any_padding=any_padding)
        split, chunk_dev = MixedVerify(verify, 1 + step.num_drafts, rest), []
    batch = ForwardBatch(positions=pos, cu_seqlens=cu, seq_lens=lens, state_slots=slots, has_initial_state=init,
                         block_tables=tables, slot_mapping=mapping, logits_indices=logits, tokens_per_row=k,
                         chunk_indices=chunk_dev[1] if chunk_dev else None,
                         cu_seqlens_long=chunk_dev[0] if chunk_dev else None,
                         any_padding=any_padding, keep_states=bool(verify), mixed=split)
    return DeviceStep(ids, batch, p_rows, p_slots, s_slots, p_columns)


def _check_verify_rows(step: StepInput, rows: int) -> None:
    """ValueError unless the step's drafts are on verify rows the model can run: its first `rows` rows, each one
    known token plus the same number of drafts after an existing state, sampled at every position (the scheduler
    strips drafts otherwise, and puts these rows first)."""
    k = 1 + step.num_drafts
    t = rows * k
    if not (k > 1 and all(s.num_logits_rows == k for s in step.sampling[:rows])
            and bool((step.query_lens[:rows] == k).all()) and bool(step.has_initial_state[:rows].all())
            and step.logits_rows.shape[0] >= t and bool((step.logits_rows[:t] == np.arange(t)).all())):
        raise ValueError("a step with draft tokens must start with its verify rows: each one known token plus the same "
                         "number of drafts after an existing state, every position sampled (the scheduler strips "
                         "drafts otherwise)")


def _forward_arrays(query_lens: np.ndarray, context_lens: np.ndarray, table: np.ndarray, row_of_token: np.ndarray,
                    page_size: int) -> dict[str, np.ndarray]:
    cu = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=cu[1:])
    offset_in_row = np.arange(row_of_token.shape[0]) - cu[:-1][row_of_token]
    positions = (context_lens[row_of_token] + offset_in_row).astype(np.int64)
    pages = table[row_of_token, positions // page_size].astype(np.int64)
    return {"cu": cu, "positions": positions, "slot_mapping": pages * page_size + positions % page_size}


def chunk_indices(query_lens: np.ndarray, chunk_size: int = GDN_CHUNK_SIZE) -> np.ndarray:
    """[C, 2] int64 (sequence, chunk within it) of every chunk of every sequence, in order (fla-core's layout)."""
    counts = -(-query_lens.astype(np.int64) // chunk_size)
    seq = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([seq, np.arange(int(counts.sum()), dtype=np.int64) - starts], axis=1)


def _chunk_arrays(query_lens: np.ndarray, cu: np.ndarray) -> list[np.ndarray]:
    return [cu.astype(np.int64), chunk_indices(query_lens)]


def build_forward_batch(*, query_lens: Sequence[int], context_lens: Sequence[int], state_slots: Sequence[int],
                        block_tables: Sequence[Sequence[int]], page_size: int, device: torch.device | str = "cpu",
                        logits_indices: Sequence[int] | None = None) -> ForwardBatch:
    """A ForwardBatch from per-sequence lists, for tests and benchmarks that drive the model directly.

    query_lens[n] new tokens of sequence n follow its context_lens[n] already computed tokens; a sequence with no
    context starts from a zero state. By default the last token of every sequence gets logits."""
    from deltaserve.engine.step_input import StepInput

    q = np.array(query_lens, dtype=np.int32)
    width = max((len(p) for p in block_tables), default=0) or 1
    table = np.zeros((len(block_tables), width), dtype=np.int32)
    for row, pages in zip(table, block_tables):
        row[:len(pages)] = pages
    if logits_indices is None:
        logits_indices = (np.cumsum(q) - 1).tolist()
    step = StepInput(input_ids=np.zeros(int(q.sum()), dtype=np.int64), query_lens=q,
                     context_lens=np.array(context_lens, dtype=np.int32),
                     state_slots=np.array(state_slots, dtype=np.int64),
                     has_initial_state=np.array([c > 0 for c in context_lens], dtype=np.bool_), block_table=table,
                     logits_rows=np.array(logits_indices, dtype=np.int64), sampling=())
    return upload_step(step, page_size=page_size, device=device).batch


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool}


def upload_arrays(arrays: Sequence[np.ndarray], device: torch.device | str,
                  out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Small host arrays -> device tensors in one copy: packed into one byte buffer at 16-byte aligned offsets and
    viewed back on the device. A step's metadata is ~10 arrays; one transfer each cost ~10-20 us of host time.
    16, not 8: Triton specialises a kernel on whether each pointer is 16-byte aligned, so with 8-byte offsets a
    step whose token count is odd would compile a second copy of every kernel reading the metadata mid-run.
    out: a device byte buffer of exactly packed_size(arrays) to copy into (a CUDA graph's static inputs: arrays
    of the same shapes land at the same addresses every time).

    On CUDA the buffer is pinned (torch's caching host allocator keeps it until the copy is done): a copy from
    pageable memory waits for the stream to drain first, which would stall an engine that builds the next step
    while the current one runs."""
    offsets, total = _offsets(arrays)
    on_cuda = torch.device(device).type == "cuda"
    host = torch.empty(max(total, 16), dtype=torch.uint8, pin_memory=on_cuda)
    buf = host.numpy()
    for a, off in zip(arrays, offsets):
        buf[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if out is None:
        dev = host.to(device, non_blocking=on_cuda)
    else:
        if out.numel() != host.numel():
            raise ValueError(f"the static buffer holds {out.numel()} bytes but the arrays pack into {host.numel()}")
        dev = out.copy_(host, non_blocking=on_cuda)
    return [dev[off:off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)]


def packed_size(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of upload_arrays' buffer for these arrays."""
    return max(_offsets(arrays)[1], 16)


def _offsets(arrays: Sequence[np.ndarray]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 16) * 16
    return offsets, total
