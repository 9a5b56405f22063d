"""Inter-token latency under a stream of long prompts, for several per-step time budgets (`max_step_ms`).

python benchmarks/bench_step_budget.py --model 27B [--budgets off 30 50 80] [--decodes 16] [--decode-prompt-len 1024]
    [--prompts 8] [--prompt-len 8192] [--prompt-output-len 16] [--interval 1.5] [--json-out run.json]

One engine in-process (random weights at the shape, load_format="dummy", prefix caching off: random prompts share
nothing, and its checkpoints would cut chunks), every budget run on it in turn (the step
cost model keeps what it learned). Each run: `--decodes` requests are started and brought to steady decoding, then a
long prompt (`--prompt-len` tokens, `--prompt-output-len` outputs) arrives every `--interval` seconds, `--prompts` of
them; the run ends when the last long prompt has finished (the decoding requests are aborted then). Measured over
the window from the first arrival to that end, at the host, as the engine hands tokens out:

- ITL p50 / p99 / max: gaps between successive tokens of the decoding requests (what the budget bounds);
- TTFT p50 / p99 of the long prompts (what the budget costs: their prefill takes more, smaller steps);
- decode tok/s and total tok/s (outputs of all requests + long-prompt tokens, over the window);
- mixed steps, and the cost model's median |predicted - measured| / measured over the run's steps (device time on
  CUDA, host time of the step elsewhere).

Two warm-up runs come first (not reported): one with the fixed token budget, one with 50 ms, so that kernels are
compiled for both kinds of chunks and the cost model has samples. Runs on CPU
with `--model tiny` (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SHAPES, positive_int, table, triton_compiles


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _budget(text: str) -> float | None:
    if text in ("off", "0", "none", "None"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"--budgets {text!r}: give milliseconds above 0, or 'off'")
    return value


DECODE_MAX_TOKENS = 32_768  # the decoding requests' length limit: far beyond any run


def build_engine(model: str, args: argparse.Namespace, workdir: str):
    from deltaserve.engine.engine import EngineArgs, LLMEngine

    (Path(workdir) / "config.json").write_text(json.dumps(SHAPES[model]))
    max_len = max(args.prompt_len + args.prompt_output_len, args.decode_prompt_len + DECODE_MAX_TOKENS) + 64
    kw: dict[str, Any] = dict(load_format="dummy", max_model_len=max_len, max_num_seqs=args.decodes + args.prompts + 2,
                              max_step_ms=50.0,
                              enable_prefix_caching=False)  # random prompts: nothing to share, no checkpoint cuts
    if args.device:
        kw["device"] = args.device
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    return LLMEngine(EngineArgs(model=workdir, **kw))


class StepLog:
    """Wraps the scheduler's schedule() and the cost model's observe() of one run: every step's composition, and
    the model's relative error on each measured step before it learns from it."""

    def __init__(self, engine) -> None:
        from deltaserve.engine.step_cost import StepShape

        self.engine, self.shape_of = engine, StepShape.of
        self.sched, self.cost = engine.scheduler, engine.scheduler.step_cost
        self.schedule, self.observe = self.sched.schedule, self.cost.observe
        self.shapes: list[Any] = []
        self.errors: list[float] = []
        self.sched.schedule = self._schedule
        self.cost.observe = self._observe

    def _schedule(self):
        out = self.schedule()
        if self.recording:
            self.shapes.append(self.shape_of((s.num_new_tokens, s.num_computed_tokens, len(s.draft_token_ids))
                                             for s in out.scheduled))
        return out

    def _observe(self, shape, ms):
        if self.recording and ms > 0:
            self.errors.append(abs(self.cost.predict(shape) - ms) / ms)
        return self.observe(shape, ms)

    recording = False

    def close(self) -> None:
        self.sched.schedule, self.cost.observe = self.schedule, self.observe


def run_once(engine, budget: float | None, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    import random

    from deltaserve import SamplingParams

    rnd = random.Random(seed)
    vocab = engine.model_config.vocab_size
    engine.scheduler.set_max_step_ms(budget)
    log = StepLog(engine)
    tag = f"b{budget}-{seed}"
    decode_ids = [f"{tag}-d{i}" for i in range(args.decodes)]
    for rid in decode_ids:
        engine.add_request(rid, [rnd.randrange(1, vocab) for _ in range(args.decode_prompt_len)],
                           SamplingParams(temperature=0, max_tokens=DECODE_MAX_TOKENS, ignore_eos=True))
    long_params = SamplingParams(temperature=0, max_tokens=args.prompt_output_len, ignore_eos=True)
    last: dict[str, float] = {}  # decoding request -> when its last token was handed out
    while len(last) < len(decode_ids):  # steady state: every decoding request has its first token
        for d in engine.step():
            if d.token_ids:
                last[d.request_id] = time.perf_counter()
    itl: list[float] = []
    sent: dict[str, float] = {}
    ttft: dict[str, float] = {}
    done: set[str] = set()
    decode_tokens = total_tokens = arrived = 0
    log.recording = True
    start = next_arrival = time.perf_counter()
    while len(done) < args.prompts:
        if arrived < args.prompts and time.perf_counter() >= next_arrival:
            rid = f"{tag}-p{arrived}"
            engine.add_request(rid, [rnd.randrange(1, vocab) for _ in range(args.prompt_len)], long_params)
            sent[rid] = time.perf_counter()
            total_tokens += args.prompt_len
            arrived += 1
            next_arrival += args.interval
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            n = len(d.token_ids)
            total_tokens += n
            if d.request_id in sent:
                if n and d.request_id not in ttft:
                    ttft[d.request_id] = now - sent[d.request_id]
                if d.finished:
                    done.add(d.request_id)
            elif n:
                itl.append(now - last[d.request_id])
                last[d.request_id] = now
                decode_tokens += n
    elapsed = time.perf_counter() - start
    log.recording = False
    for rid in decode_ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    log.close()
    ms, first = [x * 1e3 for x in itl], [x * 1e3 for x in ttft.values()]
    mixed = [s for s in log.shapes if s.decode_tokens and s.prefill_tokens]
    cost = engine.scheduler.step_cost
    return {"budget ms": "off" if budget is None else budget,
            "ITL p50 ms": _pct(ms, 50), "ITL p99 ms": _pct(ms, 99), "ITL max ms": max(ms, default=float("nan")),
            "TTFT p50 ms": _pct(first, 50), "TTFT p99 ms": _pct(first, 99),
            "decode tok/s": decode_tokens / elapsed, "total tok/s": total_tokens / elapsed,
            "steps": len(log.shapes), "mixed steps": len(mixed),
            "mixed prefill p50": _pct([float(s.prefill_tokens) for s in mixed], 50),
            "mixed predicted p99 ms": _pct([cost.predict(s) for s in mixed], 99),
            "model err p50": statistics.median(log.errors) if log.errors else float("nan")}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="27B", choices=sorted(SHAPES))
    ap.add_argument("--budgets", nargs="+", default=["off", "30", "50", "80"],
                    help="max_step_ms values to compare ('off': fixed token budget)")
    ap.add_argument("--decodes", type=int, default=16, help="requests decoding throughout")
    ap.add_argument("--decode-prompt-len", type=positive_int, default=1024)
    ap.add_argument("--prompts", type=positive_int, default=8, help="long prompts in the stream")
    ap.add_argument("--prompt-len", type=positive_int, default=8192)
    ap.add_argument("--prompt-output-len", type=positive_int, default=16)
    ap.add_argument("--interval", type=float, default=1.5,
                    help="seconds between long-prompt arrivals (1.5: about the published 8k/1k workload at concurrency "
                         "16 on 27B, where 16 requests of ~25 s each start a new 8k prompt every ~1.6 s)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    try:
        budgets = [_budget(b) for b in args.budgets]
    except ValueError as e:
        ap.error(str(e))
    with tempfile.TemporaryDirectory() as d:
        engine = build_engine(args.model, args, d)
        cuda = engine.runner.device.type == "cuda"
        # warm-up, not reported: the fixed budget's full chunks, then a budget run that gives the cost model samples
        warm = argparse.Namespace(**{**vars(args), "prompts": min(args.prompts, 2)})
        run_once(engine, None, warm, seed=100)
        run_once(engine, 50.0, warm, seed=101)
        rows = []
        for i, b in enumerate(budgets):
            with triton_compiles() if cuda else contextlib.nullcontext([]) as compiled:
                rows.append(run_once(engine, b, args, seed=i + 1))
            if compiled:
                print(f"warning: {len(compiled)} Triton compiles inside the run with budget {b}: "
                      f"{sorted(set(compiled))}")
        coef = engine.scheduler.step_cost.coefficients
        engine.shutdown()
    print(f"model {args.model} ({'cuda' if cuda else 'cpu'}), {args.decodes} decoding requests "
          f"({args.decode_prompt_len}-token prompts), {args.prompts} prompts of {args.prompt_len} tokens "
          f"(+{args.prompt_output_len} out) every {args.interval} s; step times: "
          f"{'device (CUDA events)' if cuda else 'host wall time'}")
    print(table(rows))
    print("cost model coefficients (ms: base, per decode token, per prefill token, per M attention pairs, "
          "per k decode context): " + ", ".join(f"{c:.4g}" for c in coef))
    print("mixed: steps with decode rows and prefill tokens; 'mixed predicted p99' by the final cost model; 'model "
          "err p50': median |predicted - measured| / measured over the run's measured steps (budget runs only)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows, "coefficients": coef},
                                                  indent=1))
    return rows


if __name__ == "__main__":
    main()
