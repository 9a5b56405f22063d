"""The worker boundary: the step input is host data that pickles; the runner's upload gives the device tensors the
model reads (checked against per-token loops); persistent block tables equal the tables built from page lists over
a random scheduler run; pending tokens come from the device buffer; drafts get logits rows."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from deltaserve.cache.manager import CacheManager, StateCopy
from deltaserve.config import SchedulerConfig
from deltaserve.engine.device_inputs import chunk_indices, upload_arrays, upload_step
from deltaserve.engine.request import Request
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.step_input import (PENDING, BlockTables, StepInput, build_step_input, device_draft,
                                         table_from_lists)
from deltaserve.sampling_params import SamplingParams

PAGE = 4


def make(max_model_len: int = 64, max_num_seqs: int = 4, budget: int = 64, num_pages: int = 16,
         num_slots: int = 4) -> Scheduler:
    # admission on the pages free now: these pools are sized to preempt and to admit at exact points
    config = SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             growth_reserve=False)
    return Scheduler(config, CacheManager(num_pages=num_pages, num_slots=num_slots, page_size=PAGE))


def test_block_tables_match_the_page_lists_over_a_scheduler_run():
    """Small pools force preemption and slot reuse; every step's gathered table equals the one built from lists."""
    rng = random.Random(0)
    sched = make(budget=24)
    tables = BlockTables(num_slots=4, max_pages=64 // PAGE)
    for i in range(12):
        sched.add_request(Request(f"r{i}", [rng.randrange(100) for _ in range(rng.randrange(1, 30))]))
    steps = preempted = 0
    while sched.has_unfinished() and steps < 500:
        out = sched.schedule()
        preempted += len(out.preempted)
        if out.is_empty:
            break
        assert np.array_equal(tables.gather(out.scheduled), table_from_lists(out.scheduled))
        step = build_step_input(out, block_tables=tables)
        assert np.array_equal(step.block_table, build_step_input(out).block_table)
        sampled = {e.request_id: rng.randrange(100) for e in out.scheduled if e.samples_token}
        for request in sched.update_from_step(out, sampled):
            if request.num_output_tokens >= rng.randrange(10, 40) or request.num_tokens >= 64:
                sched.finish_request(request.request_id, request.status.FINISHED_LENGTH, "length")
        steps += 1
    assert not sched.has_unfinished()
    assert preempted > 0, "the pools were meant to force preemption"


def mixed_step() -> tuple[Scheduler, StepInput]:
    """One request decoding with its token in flight (pending), one prefilling its prompt."""
    sched = make()
    sched.add_request(Request("a", [5, 6, 7], sampling_params=SamplingParams(repetition_penalty=1.3)))
    sched.commit_step(sched.schedule())           # a's first token is now pending
    sched.add_request(Request("b", [8, 9], sampling_params=SamplingParams(seed=3)))
    out = sched.schedule()
    return sched, build_step_input(out)


def test_step_input_is_host_data_that_pickles():
    _, step = mixed_step()
    assert step.input_ids.tolist() == [PENDING, 8, 9] and step.query_lens.tolist() == [1, 2]
    assert step.context_lens.tolist() == [3, 0] and step.has_initial_state.tolist() == [True, False]
    assert step.logits_rows.tolist() == [0, 2] and step.tokens_per_row is None
    a, b = step.sampling
    assert (a.request_id, a.num_output_tokens, list(a.prompt_token_ids)) == ("a", 1, [5, 6, 7])
    assert (b.request_id, b.prompt_token_ids, b.output_token_ids) == ("b", None, None)  # no penalty: no history
    back = pickle.loads(pickle.dumps(step))
    for name in ("input_ids", "query_lens", "context_lens", "state_slots", "has_initial_state", "block_table",
                 "logits_rows"):
        assert np.array_equal(getattr(back, name), getattr(step, name)), name
    assert back.sampling == step.sampling and back.state_copies == step.state_copies
    assert not any(isinstance(v, torch.Tensor) for v in vars(step).values())


def test_upload_matches_per_token_loops():
    """positions, slot mapping, cu_seqlens and chunk indices from the vectorised upload equal the definitions."""
    rng = random.Random(1)
    q = [rng.randrange(1, 150) for _ in range(5)]
    ctx = [rng.randrange(0, 40) for _ in range(5)]
    pages = [rng.sample(range(200), -(-(c + n) // PAGE)) for c, n in zip(ctx, q)]
    step = StepInput(input_ids=np.arange(sum(q), dtype=np.int64), query_lens=np.array(q, np.int32),
                     context_lens=np.array(ctx, np.int32), state_slots=np.array([3, 0, 4, 1, 2], np.int64),
                     has_initial_state=np.array([c > 0 for c in ctx]), block_table=table_from_lists_(pages),
                     logits_rows=np.cumsum(q) - 1, sampling=())
    batch = upload_step(step, page_size=PAGE, device="cpu").batch
    positions = [p for c, n in zip(ctx, q) for p in range(c, c + n)]
    mapping = [pg[p // PAGE] * PAGE + p % PAGE for c, n, pg in zip(ctx, q, pages) for p in range(c, c + n)]
    assert batch.positions.tolist() == positions and batch.slot_mapping.tolist() == mapping
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(q).tolist()] and batch.cu_seqlens_long.dtype == torch.int64
    assert batch.seq_lens.tolist() == [c + n for c, n in zip(ctx, q)] and batch.tokens_per_row is None
    expected = [(n, j) for n, length in enumerate(q) for j in range(-(-length // 64))]
    assert batch.chunk_indices.tolist() == [list(p) for p in expected]
    assert chunk_indices(np.array([0, 64, 65, 1])).tolist() == [[1, 0], [2, 0], [2, 1], [3, 0]]


def table_from_lists_(pages: list[list[int]]) -> np.ndarray:
    table = np.zeros((len(pages), max(len(p) for p in pages)), np.int32)
    for row, p in zip(table, pages):
        row[:len(p)] = p
    return table


def test_pending_tokens_come_from_the_device_buffer():
    """A decode entry launched before its token reached the host reads it from the runner's carried tokens
    (column 0 of its slot's row); in a mixed batch only that row does, the prompt rows keep their host ids."""
    sched, step = mixed_step()
    dev = upload_step(step, page_size=PAGE, device="cpu")
    assert dev.pending_columns is None  # (no device drafts: column 0 everywhere, nothing uploaded for it)
    slot_a, slot_b = step.state_slots.tolist()
    last = torch.full((4, 1), -1, dtype=torch.long)
    last[slot_a] = 42
    assert dev.input_ids_from(last).tolist() == [42, 8, 9]
    assert dev.input_ids.tolist() == [0, 8, 9]  # the host copy is left as built
    assert dev.sample_slots.tolist() == [slot_a, slot_b]
    out = sched.schedule()  # the same two entries again, decode-only for a
    decode_only = upload_step(build_step_input(type(out)(out.scheduled[:1], (), 1)), page_size=PAGE, device="cpu")
    assert decode_only.batch.tokens_per_row == 1 and decode_only.batch.chunk_indices is None
    assert decode_only.input_ids_from(last).tolist() == [42]
    with pytest.raises(RuntimeError, match="pending tokens"):
        decode_only.input_ids_from(None)


def test_drafts_follow_the_known_tokens_and_get_a_logits_row_each():
    sched = make()
    sched.add_request(Request("a", [5, 6, 7]))
    sched.update_from_step(sched.schedule(), {"a": [11]})
    sched.get_request("a").draft_token_ids = [21, 22, 23]
    out = sched.schedule()
    (entry,) = out.scheduled
    assert entry.draft_token_ids == (21, 22, 23) and entry.num_new_tokens == 4 and entry.num_samples == 4
    step = build_step_input(out)
    assert step.input_ids.tolist() == [11, 21, 22, 23] and step.logits_rows.tolist() == [0, 1, 2, 3]
    assert step.sampling[0].num_logits_rows == 4 and step.tokens_per_row == 4


def test_device_drafts_are_read_from_the_slots_carried_tokens():
    """MTP drafts the host did not wait for (device_draft markers) go into a verify step as markers; the upload reads
    draft j from column 1 + j of the slot's carried tokens, the known token stays the host's."""
    sched = make()
    sched.add_request(Request("a", [5, 6, 7]))
    sched.update_from_step(sched.schedule(), {"a": [11]})
    sched.get_request("a").draft_token_ids = [device_draft(j) for j in range(3)]
    out = sched.schedule()
    step = build_step_input(out)
    assert step.input_ids.tolist() == [11, device_draft(0), device_draft(1), device_draft(2)] and step.is_verify
    dev = upload_step(step, page_size=PAGE, device="cpu")
    (slot,) = step.state_slots.tolist()
    carried = torch.zeros((4, 4), dtype=torch.long)
    carried[slot] = torch.tensor([99, 31, 32, 33])  # (column 0, the last sampled token, is not read: 11 is known)
    assert dev.input_ids_from(carried).tolist() == [11, 31, 32, 33]
    assert dev.input_ids.tolist() == [11, 0, 0, 0]


def test_state_copies_travel_with_the_step():
    sched, step = mixed_step()
    out = sched.schedule()
    copied = build_step_input(type(out)(out.scheduled, (), 1, (StateCopy(2, 1),)))
    assert copied.state_copies == (StateCopy(2, 1),) and pickle.loads(pickle.dumps(copied)).state_copies[0].src == 2


def test_step_metadata_is_16_byte_aligned_whatever_the_sizes():
    """Triton specialises kernels on 16-byte pointer alignment: every uploaded array must start 16-byte aligned,
    whatever the token count, or an odd-sized step compiles new kernel copies mid-run."""
    arrays = [np.arange(n).astype(dt) % 2 for n, dt in [(3, np.int64), (5, np.int32), (7, np.bool_), (1, np.int64),
                                                        (0, np.int32), (9, np.int32)]]
    out = upload_arrays(arrays, "cpu")
    assert [t.data_ptr() % 16 for t in out] == [0] * len(arrays)
    assert [t.tolist() for t in out] == [a.tolist() for a in arrays]
