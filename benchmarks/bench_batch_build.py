"""Host time to build one decode step's batch (the step input, then its upload as the runner does it) from a real
scheduler's output, with the persistent per-slot block tables against the baseline of rebuilding them from the page
lists, in the same run. Runs on CPU.

    PYTHONPATH=src:. python3 benchmarks/bench_batch_build.py [--batch 64] [--contexts 512 8192] [--reps 200]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import header, positive_int, table
from deltaserve.cache.manager import CacheManager
from deltaserve.config import SchedulerConfig
from deltaserve.engine.device_inputs import upload_step
from deltaserve.engine.request import Request
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.step_input import BlockTables, build_step_input

PAGE = 16


def decode_step(batch: int, context: int):
    """A scheduler whose next step decodes `batch` requests of about `context` tokens each; returns its output."""
    max_len = context + batch + 2 * PAGE
    pages_per_seq = -(-max_len // PAGE)
    config = SchedulerConfig(max_model_len=max_len, max_num_seqs=batch, max_num_batched_tokens=8192)
    sched = Scheduler(config, CacheManager(num_pages=batch * pages_per_seq, num_slots=batch, page_size=PAGE))
    for i in range(batch):
        sched.add_request(Request(f"r{i}", list(range(context + i))))
    while True:
        out = sched.schedule()
        if len(out.scheduled) == batch and all(e.num_new_tokens == 1 for e in out.scheduled):
            return out, pages_per_seq
        sched.update_from_step(out, {e.request_id: 1 for e in out.scheduled if e.samples_token})


def time_us(fn, reps: int) -> float:
    for _ in range(min(reps, 20)):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--contexts", nargs="+", type=positive_int, default=[512, 8192])
    ap.add_argument("--reps", type=positive_int, default=200)
    args = ap.parse_args()
    rows = []
    for context in args.contexts:
        out, pages = decode_step(args.batch, context)
        tables = BlockTables(args.batch, pages)
        ours = time_us(lambda: upload_step(build_step_input(out, block_tables=tables), page_size=PAGE, device="cpu"),
                       args.reps)
        lists = time_us(lambda: upload_step(build_step_input(out), page_size=PAGE, device="cpu"), args.reps)
        rows.append({"batch": args.batch, "context": context, "per-slot tables us": ours,
                     "from page lists us": lists, "speedup": lists / ours})
    print(header(""))
    print(table(rows))


if __name__ == "__main__":
    main()
