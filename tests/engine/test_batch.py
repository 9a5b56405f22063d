"""Step batches: the persistent per-slot block tables give exactly the zero-padded tables built from the page lists,
through page growth, slot reuse by another request and preemption, over a random scheduler run."""

from __future__ import annotations

import random

import numpy as np
import pytest

from deltaserve.config import SchedulerConfig
from deltaserve.engine.batch import BlockTables, build_step_batch
from deltaserve.engine.request import Request
from deltaserve.engine.scheduler import Scheduler

PAGE = 4


def table_from_lists(scheduled) -> np.ndarray:
    width = max([len(e.pages) for e in scheduled] + [1])
    out = np.zeros((len(scheduled), width), dtype=np.int32)
    for row, e in zip(out, scheduled):
        row[:len(e.pages)] = e.pages
    return out


def test_block_tables_match_the_page_lists_over_a_scheduler_run():
    """Small pools force preemption and slot reuse; every step's gathered table equals the one built from lists."""
    rng = random.Random(0)
    config = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=24)
    sched = Scheduler(config, page_size=PAGE, num_pages=16, num_slots=4)
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
        batch = build_step_batch(out.scheduled, page_size=PAGE, device="cpu", block_tables=tables)
        plain = build_step_batch(out.scheduled, page_size=PAGE, device="cpu")
        assert batch.forward.block_tables.tolist() == plain.forward.block_tables.tolist()
        sampled = {e.request_id: rng.randrange(100) for e in out.scheduled if e.samples_token}
        for request in sched.update_from_step(out, sampled):
            if request.num_output_tokens >= rng.randrange(10, 40) or request.num_tokens >= 64:
                sched.finish_request(request.request_id, request.status.FINISHED_LENGTH, "length")
        steps += 1
    assert not sched.has_unfinished()
    assert preempted > 0, "the pools were meant to force preemption"


def test_pending_tokens_come_from_the_device_buffer():
    """A decode entry launched before its token reached the host reads it from last_tokens[slot]; in a mixed batch
    only that row does, the prompt rows keep their host ids."""
    import torch

    config = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64)
    sched = Scheduler(config, page_size=PAGE, num_pages=16, num_slots=4)
    sched.add_request(Request("a", [5, 6, 7]))
    first = sched.schedule()
    sched.commit_step(first)                      # a's first token is now pending
    sched.add_request(Request("b", [8, 9]))
    out = sched.schedule()
    assert [(e.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 2)]
    batch = build_step_batch(out.scheduled, page_size=PAGE, device="cpu")
    slot_a, slot_b = (e.slot for e in out.scheduled)
    last = torch.full((4,), -1, dtype=torch.long)
    last[slot_a] = 42
    assert batch.input_ids_from(last).tolist() == [42, 8, 9]
    assert batch.input_ids.tolist() == [0, 8, 9]  # the host copy is left as built
    assert batch.sample_slots.tolist() == [slot_a, slot_b]
    decode_only = build_step_batch(out.scheduled[:1], page_size=PAGE, device="cpu")
    assert decode_only.input_ids_from(last).tolist() == [42]
    with pytest.raises(RuntimeError, match="pending tokens"):
        decode_only.input_ids_from(None)


def test_step_metadata_is_16_byte_aligned_whatever_the_sizes():
    """Triton specialises kernels on 16-byte pointer alignment: every uploaded array must start 16-byte aligned,
    whatever the token count, or an odd-sized step compiles new kernel copies mid-run."""
    from deltaserve.layers.meta import upload_arrays

    arrays = [np.arange(n).astype(dt) % 2 for n, dt in [(3, np.int64), (5, np.int32), (7, np.bool_), (1, np.int64),
                                                        (0, np.int32), (9, np.int32)]]
    out = upload_arrays(arrays, "cpu")
    assert [t.data_ptr() % 16 for t in out] == [0] * len(arrays)
    assert [t.tolist() for t in out] == [a.tolist() for a in arrays]
