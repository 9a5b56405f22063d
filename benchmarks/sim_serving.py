"""The published serving workload (random prompts, fixed output length, a closed loop of clients) through the real
Scheduler on the CPU, with a step-time model instead of a GPU: what a scheduling policy does to TTFT, time per output
token and throughput, before a device is lent to measure it.

    PYTHONPATH=src:. python3 benchmarks/sim_serving.py [--concurrency 16] [--num-requests 64] [--input-len 8192]
        [--output-len 1024] [--speculative-tokens 3 --acceptance 3.39] [--verify-ms 25.9] [--decode-ms 10.62]
        [--prefill-ms 136] [--verify-extra-ms X] [--max-num-batched-tokens 8192] [--max-num-seqs 64] [--num-pages N]
        [--num-checkpoints N] [--eager-ms X [--graph-tokens 4096]] [--seed 0]

A step takes verify-ms when it verifies drafts, else decode-ms; one that computes prompt tokens takes decode-ms plus
prefill-ms per max-num-batched-tokens of them, plus verify-extra-ms when its decode rows verify drafts there (what
verifying costs over decoding in such a step, `bench_mtp.py --prompt-step`; default verify-ms - decode-ms, as if
the weights were read twice), whatever the batch: the defaults are H200 measurements of 35B-A3B at 16 requests
(benchmarks/RESULTS.md: the served step with MTP, 2026-12-06; the plain decode step, 2026-12-05; the 8,192-token
prefill, 2026-12-05), so another concurrency needs the step times of its own batch.
With --eager-ms, a step that replays no CUDA graph takes at least that long (the host launching the whole model
from Python): decode and verify steps replay theirs, a step with prompt tokens only when it verifies nothing, has at
most 16 rows and fewer than --graph-tokens tokens (the server's `--prefill-graph-tokens`), as the runner's prefill
graphs; the scheduler is told which steps replay (where its tree asks). Without it every step is its GPU time.
Each draft is kept with the probability that gives the acceptance length asked for; a client sends its next request
when the last one ends, at the step's end. What the model leaves out: the host's time between steps, the HTTP and
tokenizer path, a new request waiting for the step in flight. Prefix caching is on, as in the server (checkpoints
at its default interval end prompt chunks; nothing repeats, so nothing resumes). benchmarks/RESULTS.md (2026-12-07,
CPU) sets it beside served runs.

Compare two policies by running this file with PYTHONPATH at each tree's src (the commit before a change and after).
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
from dataclasses import dataclass

from benchmarks.common import positive_int
from deltaserve.engine.varlen_graph import ROW_SIZES  # the prefill graphs' row counts


@dataclass(frozen=True)
class StepModel:
    verify_ms: float
    decode_ms: float
    prefill_ms: float  # per `budget` prompt tokens
    budget: int
    verify_extra_ms: float | None = None  # verifying beside prompt tokens, over decoding there (None: the difference)
    eager_ms: float | None = None  # the least a step without a CUDA graph takes (host launches); None: not modelled
    graph_tokens: int = 4096       # prefill graphs for steps of fewer tokens than this (and at most ROW_SIZES[-1] rows)

    def ms(self, prefill_tokens: int, verify: bool, tokens: int | None = None, rows: int = 0) -> float:
        """A step's time; tokens (all of them, drafts included) and rows decide whether a step with prompt tokens
        replays a graph (with eager_ms)."""
        if not prefill_tokens:
            return self.verify_ms if verify else self.decode_ms
        extra = self.verify_ms - self.decode_ms if self.verify_extra_ms is None else self.verify_extra_ms
        gpu = self.decode_ms + (extra if verify else 0.0) + self.prefill_ms * prefill_tokens / self.budget
        if self.eager_ms is None or not verify and self.replays(rows, prefill_tokens if tokens is None else tokens):
            return gpu
        return max(gpu, self.eager_ms)

    def replays(self, rows: int, tokens: int) -> bool:
        """Whether a plain step with prompt tokens of this shape replays a prefill graph (the runner's rule)."""
        return rows <= ROW_SIZES[-1] and tokens < self.graph_tokens


def keep_probability(k: int, acceptance: float) -> float:
    """p with 1 + p + ... + p^k = acceptance (each draft kept with p once the one before it was)."""
    if not 1 <= acceptance <= k + 1:
        raise ValueError(f"an acceptance length of {acceptance} is outside [1, {k + 1}] for {k} drafts")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** j for j in range(k + 1)) < acceptance else (lo, mid)
    return (lo + hi) / 2


def simulate(model: StepModel, *, concurrency: int, num_requests: int, input_len: int, output_len: int, k: int,
             acceptance: float, max_num_seqs: int = 64, prefix_caching: bool = True, seed: int = 0,
             num_pages: int | None = None, num_checkpoints: int | None = None,
             growth_reserve: bool = True) -> dict[str, float]:
    """num_pages (16-token KV pages; default: room for max_num_seqs whole requests) and num_checkpoints (default
    max_num_seqs) as the server's start-up line gives them, for a card whose memory holds fewer requests than run."""
    from deltaserve.cache.manager import CacheManager
    from deltaserve.config.options import default_checkpoint_interval
    from deltaserve.config import SchedulerConfig
    from deltaserve.engine.request import Request, RequestStatus
    from deltaserve.engine.scheduler import Scheduler

    rng = random.Random(seed)
    p = keep_probability(k, acceptance) if k else 0.0
    page = 16
    config = SchedulerConfig(max_model_len=input_len + output_len + k + 1, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=model.budget, growth_reserve=growth_reserve)
    pages = num_pages if num_pages is not None else max_num_seqs * -(-(input_len + output_len + 2 * k) // page)
    # prefix caching as the server runs it by default: checkpoints along prompts at its default interval (no prompt
    # repeats here, so none is ever resumed from; they only end chunks)
    checkpoints = (num_checkpoints if num_checkpoints is not None else max_num_seqs) if prefix_caching else 0
    cache = CacheManager(num_pages=pages, num_slots=max_num_seqs, page_size=page, num_checkpoints=checkpoints)
    graphs = {}  # the scheduler learns which steps replay a graph, where its tree asks (since 7d297b7)
    if model.eager_ms is not None and "varlen_step_replays" in inspect.signature(Scheduler).parameters:
        graphs = {"varlen_step_replays": model.replays}
    sched = Scheduler(config, cache, speculative_tokens=k, speculative_max_batch=max_num_seqs,
                      checkpoint_interval=default_checkpoint_interval(model.budget, page), **graphs)
    now, sent = 0.0, 0
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}

    def send() -> None:
        nonlocal sent
        rid = f"r{sent}"
        sent += 1
        sched.add_request(Request(rid, [rng.randrange(1, 30000) for _ in range(input_len)],
                                  max_output_tokens=output_len))
        arrived[rid] = now

    for _ in range(min(concurrency, num_requests)):
        send()
    preemptions = 0
    while sched.has_unfinished():
        out = sched.schedule()
        preemptions += len(out.preempted)
        prefill = sum(n for n in (e.num_new_tokens - len(e.draft_token_ids) for e in out.scheduled) if n > 1)
        now += model.ms(prefill, any(e.draft_token_ids for e in out.scheduled), out.num_batched_tokens,
                        len(out.scheduled))
        sched.commit_step(out)
        kept = {e.request_id: [7] * _kept(e, p, rng) for e in out.scheduled if e.samples_token}
        for request in sched.resolve_step(out, kept):
            rid = request.request_id
            first.setdefault(rid, now)
            if request.num_output_tokens >= output_len:
                sched.finish_request(rid, RequestStatus.FINISHED_LENGTH)
                done[rid] = now
                if sent < num_requests:
                    send()
            elif request.status is RequestStatus.RUNNING and k:
                request.draft_token_ids = [7] * k  # the drafter proposes K every step
    ttft = [first[r] - arrived[r] for r in done]
    tpot = [(done[r] - first[r]) / max(output_len - 1, 1) for r in done]
    return {"TTFT p50 ms": statistics.median(ttft), "TTFT mean ms": statistics.mean(ttft),
            "TPOT p50 ms": statistics.median(tpot), "total tok/s": len(done) * (input_len + output_len) / now * 1e3,
            "preemptions": preemptions}


def _kept(entry, p: float, rng: random.Random) -> int:
    """Tokens a sampling entry keeps: 1, plus each draft while the ones before it were kept (placeholder drafts
    keep nothing)."""
    n = 1
    for _ in (() if entry.placeholder_drafts else entry.draft_token_ids):
        if rng.random() >= p:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=positive_int, default=16)
    ap.add_argument("--num-requests", type=positive_int, default=64)
    ap.add_argument("--input-len", type=positive_int, default=8192)
    ap.add_argument("--output-len", type=positive_int, default=1024)
    ap.add_argument("--speculative-tokens", type=int, default=3, choices=range(0, 5))
    ap.add_argument("--acceptance", type=float, default=3.39, help="mean tokens a verify step keeps per request")
    ap.add_argument("--verify-ms", type=float, default=25.9)
    ap.add_argument("--decode-ms", type=float, default=10.62)
    ap.add_argument("--verify-extra-ms", type=float, default=None,
                    help="what verifying the decode rows adds to a step with prompt tokens (default: verify - decode)")
    ap.add_argument("--prefill-ms", type=float, default=136.0, help="per --max-num-batched-tokens prompt tokens")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    ap.add_argument("--eager-ms", type=float, default=None,
                    help="the least a step without a CUDA graph takes (default: not modelled)")
    ap.add_argument("--graph-tokens", type=positive_int, default=4096,
                    help="as the server's --prefill-graph-tokens (4096 was its default until 2026-12-07; it now takes "
                         "a full step, --max-num-batched-tokens + 1, where memory allows)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="as the server's flag (on by default there)")
    ap.add_argument("--max-num-seqs", type=positive_int, default=64, help="state slots, as the server's option")
    ap.add_argument("--num-pages", type=positive_int, default=None,
                    help="16-token KV pages as the server's start-up line gives them (default: room for every "
                         "request of --max-num-seqs)")
    ap.add_argument("--num-checkpoints", type=int, default=None, help="prefix-cache checkpoints (default: as slots)")
    ap.add_argument("--no-growth-reserve", action="store_true", help="as the server's flag (reserve on by default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.speculative_tokens and not 1 <= args.acceptance <= args.speculative_tokens + 1:
        ap.error(f"--acceptance {args.acceptance} is outside [1, {args.speculative_tokens + 1}] for "
                 f"--speculative-tokens {args.speculative_tokens}")
    model = StepModel(args.verify_ms, args.decode_ms, args.prefill_ms, args.max_num_batched_tokens,
                      args.verify_extra_ms, args.eager_ms, args.graph_tokens)
    row = simulate(model, concurrency=args.concurrency, num_requests=args.num_requests, input_len=args.input_len,
                   output_len=args.output_len, k=args.speculative_tokens, acceptance=args.acceptance,
                   max_num_seqs=args.max_num_seqs, prefix_caching=not args.no_prefix_caching, seed=args.seed,
                   num_pages=args.num_pages, num_checkpoints=args.num_checkpoints,
                   growth_reserve=not args.no_growth_reserve)
    print(table([{"concurrency": args.concurrency, "MTP K": args.speculative_tokens,
                  **{name: round(v, 2) if v < 100 else round(v) for name, v in row.items()}}]))


if __name__ == "__main__":
    main()
