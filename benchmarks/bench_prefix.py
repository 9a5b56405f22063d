"""Prefix caching on two workloads, with the cache and without it, in one run: token hit rate against the
workload's ideal, TTFT percentiles (and on resumed turns), throughput.

python benchmarks/bench_prefix.py [--model 9B] [--workloads chat chat-rewrite system] [--concurrency 1 16]
                                  [--conversations 4] [--turns 8] [--first-len 8192] [--turn-len 200]
                                  [--system-len 4096] [--requests 16] [--output-len 64] [--num-checkpoints N]
                                  [--prefix-cache on off] [--prefill-graph-tokens N]

chat: `conversations` conversations of `turns` turns each, interleaved: turn 1 sends a first-len history, each
later turn the previous prompt, the reply and a new turn-len message (the history is resent as it was: the shape
of a non-thinking chat). chat-rewrite: the same, but the template rewrites the history as Qwen3.5's drops past
<think> blocks: each prompt ends with a generation prompt (assistant header + <think>), its cache point is the history
before it (what the server's renderer gives), and the next history keeps the header and only the second half of the
reply, so a turn resumes from the previous prompt's history, never from the end of its generation. system: `requests`
prompts sharing one system-len system prompt, each with its own suffix of 10 to 2,000 tokens. Random token ids and
dummy weights at real shapes (load_format="dummy"); the engine is driven directly (no HTTP), `concurrency` requests in
flight at a time, each sent when the previous one of its client ends.
The ideal hit rate is the share of prompt tokens that some earlier request of the workload already had as a prefix.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import SHAPES, header, positive_int, table


@dataclass
class Job:
    """One request: its prompt, where its stable prefix ends, and (for chat) the conversation it continues."""

    prompt: list[int]
    cache_points: tuple[int, ...] = ()
    conversation: int = -1
    ttft: float = 0.0
    reply: list[int] = field(default_factory=list)


def _tokens(rnd: random.Random, n: int, vocab: int) -> list[int]:
    return [rnd.randrange(10, vocab) for _ in range(n)]


def chat_workload(args: argparse.Namespace, vocab: int) -> Iterator[list[Job]]:
    """Turn by turn: the jobs of one round (one turn of every conversation); a later round's prompts depend on the
    replies of the earlier one."""
    rnd = random.Random(0)
    histories = [_tokens(rnd, args.first_len, vocab) for _ in range(args.conversations)]
    jobs: list[Job] = []
    for turn in range(args.turns):
        if turn:
            histories = [j.prompt + j.reply + _tokens(rnd, args.turn_len, vocab) for j in jobs]
        # no cache points: the engine's default one, the last prompt position, is where the next turn resumes (a
        # point must lie inside the prompt, so len(h) would be dropped)
        jobs = [Job(h, (), c) for c, h in enumerate(histories)]
        yield jobs


GENERATION_PROMPT = [5, 6, 7]  # "<|im_start|>assistant\n<think>\n": a past turn keeps the first two (its header)


def chat_rewrite_workload(args: argparse.Namespace, vocab: int) -> Iterator[list[Job]]:
    rnd = random.Random(0)
    histories = [_tokens(rnd, args.first_len, vocab) for _ in range(args.conversations)]
    jobs: list[Job] = []
    for turn in range(args.turns):
        if turn:
            histories = [j.prompt[:-len(GENERATION_PROMPT)] + GENERATION_PROMPT[:2] + j.reply[len(j.reply) // 2:]
                         + _tokens(rnd, args.turn_len, vocab) for j in jobs]
        jobs = [Job(h + GENERATION_PROMPT, (len(h),), c) for c, h in enumerate(histories)]
        yield jobs


def system_workload(args: argparse.Namespace, vocab: int) -> Iterator[list[Job]]:
    rnd = random.Random(1)
    system = _tokens(rnd, args.system_len, vocab)
    suffixes = [int(10 * (200 ** (i / max(args.requests - 1, 1)))) for i in range(args.requests)]  # 10 .. 2,000
    rnd.shuffle(suffixes)
    yield [Job(system + _tokens(rnd, n, vocab), (len(system),)) for n in suffixes]


def ideal_hits(rounds: list[list[Job]]) -> tuple[int, int]:
    """(prompt tokens some earlier request already had as a prefix, all prompt tokens), at most all but one token
    of each prompt (its last token is always computed)."""
    seen: list[list[int]] = []
    hit = total = 0
    for jobs in rounds:
        for i, job in enumerate(jobs):
            earlier = seen + [j.prompt for j in jobs[:i]]  # earlier rounds with their replies, this round's prompts
            best = max((_common(job.prompt, s) for s in earlier), default=0)
            hit += min(best, len(job.prompt) - 1)
            total += len(job.prompt)
        seen += [j.prompt + j.reply for j in jobs]
    return hit, total


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def drive(llm, jobs: list[Job], concurrency: int, output_len: int) -> None:
    """Run the jobs with `concurrency` in flight; record each one's TTFT and reply."""
    from deltaserve import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    todo, live, started = list(enumerate(jobs)), {}, {}
    while todo or live:
        while todo and len(live) < concurrency:
            i, job = todo.pop(0)
            engine.add_request(str(i), job.prompt, params, cache_points=job.cache_points)
            live[str(i)], started[str(i)] = job, time.perf_counter()
        for delta in engine.step():
            job = live[delta.request_id]
            if not job.reply and delta.token_ids:
                job.ttft = time.perf_counter() - started[delta.request_id]
            job.reply += delta.token_ids
            if delta.finished:
                del live[delta.request_id]


def run(args: argparse.Namespace, workload: str, concurrency: int, cached: bool) -> dict:
    from deltaserve import LLM

    shape = SHAPES[args.model]
    make = {"chat": chat_workload, "chat-rewrite": chat_rewrite_workload, "system": system_workload}[workload]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(shape))
        max_len = args.first_len + args.turns * (args.turn_len + args.output_len) + args.system_len + 2048 + 64
        llm = LLM(d, load_format="dummy", max_model_len=max_len, max_num_seqs=max(concurrency, 1),
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=cached,
                  num_checkpoints=args.num_checkpoints if cached else None,
                  **({} if args.prefill_graph_tokens is None else {"prefill_graph_tokens": args.prefill_graph_tokens}))
        llm.generate([[11] * 64], _warmup_params())  # compile outside the timed run
        llm.engine.reset_prefix_cache()
        rounds, t0 = [], time.perf_counter()
        for jobs in make(args, shape["vocab_size"]):
            drive(llm, jobs, concurrency, args.output_len)
            rounds.append(jobs)
        _sync()
        elapsed = time.perf_counter() - t0
        stats = llm.engine.stats()
        del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ideal, total = ideal_hits(rounds)
    ttfts = sorted(j.ttft for r in rounds for j in r)
    resumed = sorted(j.ttft for r in rounds[1:] for j in r) or ttfts  # chat: turns 2..; system: every request
    out_tokens = sum(len(j.reply) for r in rounds for j in r)
    return {"workload": workload, "conc": concurrency, "cache": "on" if cached else "off",
            "hit rate": stats.get("prompt_tokens_cached", 0) / total, "ideal": ideal / total,
            "TTFT p50 ms": _pct(ttfts, 50) * 1e3, "TTFT p90 ms": _pct(ttfts, 90) * 1e3,
            "resumed TTFT p50 ms": _pct(resumed, 50) * 1e3, "total tok/s": (total + out_tokens) / elapsed,
            "checkpoints": stats.get("checkpoints_taken", 0), "evictions": stats.get("checkpoint_evictions", 0)}


def _warmup_params():
    from deltaserve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def _pct(values: list[float], p: int) -> float:
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--workloads", nargs="+", default=["chat", "system"], choices=["chat", "chat-rewrite", "system"])
    ap.add_argument("--concurrency", nargs="+", type=positive_int, default=[1, 16])
    ap.add_argument("--conversations", type=positive_int, default=4)
    ap.add_argument("--turns", type=positive_int, default=8)
    ap.add_argument("--first-len", type=positive_int, default=8192)
    ap.add_argument("--turn-len", type=positive_int, default=200)
    ap.add_argument("--system-len", type=positive_int, default=4096)
    ap.add_argument("--requests", type=positive_int, default=16)
    ap.add_argument("--output-len", type=positive_int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    ap.add_argument("--num-checkpoints", type=int, default=None,
                    help="the checkpoint pool's size (default: the planner's); small: eviction under pressure")
    ap.add_argument("--prefill-graph-tokens", type=int, default=None,
                    help="the engine option (default: the engine's); 0 runs short prefill steps eagerly")
    ap.add_argument("--prefix-cache", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="run with the prefix cache on and/or off (default both)")
    args = ap.parse_args()
    rows = []
    for workload in args.workloads:
        for conc in args.concurrency:
            for cached in (c == "on" for c in args.prefix_cache):
                rows.append(run(args, workload, conc, cached))
                print(rows[-1], flush=True)
    print(header(""))
    print(table(rows))


if __name__ == "__main__":
    main()
