"""Host (Python) time of a resumed chat turn with a long cached history: everything the engine does from add_request
to the first token, and per decode step after it, with the model's compute left out.

python benchmarks/bench_host_prefix.py [--histories 2048 8192 32768] [--turn-len 200] [--output-len 32]
                                       [--repeats 3] [--profile 8192]

The tiny model's engine is built on CPU, then the runner's model run is replaced by a stub: a step is still
uploaded (upload_step, the host side of a launch), every sampling row gets one fixed token. Per history length:
turn 1 sends the history and decodes output-len tokens (its end leaves a checkpoint), turn 2 sends the history, the
reply and turn-len new tokens, with the cache on. Printed: host ms from add_request to turn 2's first token (the
resumed TTFT without the GPU), and host ms per decode step after it. --profile H prints cProfile's top functions
of one resumed turn at history H.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHAPES, positive_int

WARMUP_HISTORY = 256


def make_engine(max_len: int):
    from deltaserve import LLM
    from deltaserve.engine.device_inputs import upload_step
    from deltaserve.engine.runner import LaunchedStep, StepResult

    d = tempfile.mkdtemp()
    (Path(d) / "config.json").write_text(json.dumps(SHAPES["tiny"]))
    llm = LLM(d, load_format="dummy", device="cpu", max_model_len=max_len, max_num_seqs=4,
              max_num_batched_tokens=8192, enable_prefix_caching=True)
    engine = llm.engine
    runner = engine.runner
    page_size = engine.config.cache.page_size

    def launch(step):  # the host side of a launch, no model
        upload_step(step, page_size=page_size, device="cpu")
        return LaunchedStep(step, None, None)

    def collect(launched):
        return StepResult({s.request_id: [7] * s.num_logits_rows for s in launched.step.sampling}, {})

    runner.launch, runner.collect = launch, collect
    runner.apply_copies = lambda *a, **k: None
    return engine


def run_turn(engine, rid: str, prompt: list[int], output_len: int) -> tuple[float, list[float], list[int]]:
    """(ms from add_request to the first token, ms of each later step, the reply)."""
    from deltaserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params, cache_points=(len(prompt),))
    reply: list[int] = []
    ttft, steps = 0.0, []
    while engine.has_unfinished():
        s0 = time.perf_counter()
        for delta in engine.step():
            if not reply and delta.token_ids:
                ttft = (time.perf_counter() - t0) * 1e3
            reply += delta.token_ids
        if reply and ttft and s0 > t0 + ttft / 1e3:
            steps.append((time.perf_counter() - s0) * 1e3)
    return ttft, steps, reply


def resumed(engine, history: int, turn_len: int, output_len: int, seed: int) -> tuple[float, float, int]:
    """Turn 1 then the resumed turn 2: (turn 2's host ms to first token, its host ms per decode step, cached)."""
    rnd = random.Random(seed)
    vocab = SHAPES["tiny"]["vocab_size"]
    first = [rnd.randrange(10, vocab) for _ in range(history)]
    engine.reset_prefix_cache()
    _, _, reply = run_turn(engine, f"t1-{seed}", first, output_len)
    prompt = first + reply + [rnd.randrange(10, vocab) for _ in range(turn_len)]
    before = engine.cache.counters["prompt_tokens_cached"]
    ttft, steps, _ = run_turn(engine, f"t2-{seed}", prompt, output_len)
    cached = engine.cache.counters["prompt_tokens_cached"] - before
    return ttft, sum(steps) / max(len(steps), 1), cached


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--histories", nargs="+", type=positive_int, default=[2048, 8192, 32768])
    ap.add_argument("--turn-len", type=positive_int, default=200)
    ap.add_argument("--output-len", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="history length of one cProfiled resumed turn")
    ap.add_argument("--sort", default="cumulative", help="cProfile sort key of --profile")
    args = ap.parse_args(argv)
    # the warm-up turn counts in the length limit too (histories below it failed as too long)
    longest = max(args.histories + [args.profile, WARMUP_HISTORY])
    engine = make_engine(longest + args.turn_len + 2 * args.output_len + 64)
    resumed(engine, WARMUP_HISTORY, args.turn_len, args.output_len, seed=99)
    print(f"{'history':>8} {'cached':>8} {'host ms to 1st token':>21} {'host ms/decode step':>20}")
    for h in args.histories:
        runs = [resumed(engine, h, args.turn_len, args.output_len, seed=i) for i in range(args.repeats)]
        ttft = min(r[0] for r in runs)
        step = min(r[1] for r in runs)
        print(f"{h:>8} {runs[0][2]:>8} {ttft:>21.2f} {step:>20.3f}", flush=True)
    if args.profile:
        rnd = random.Random(5)
        vocab = SHAPES["tiny"]["vocab_size"]
        engine.reset_prefix_cache()
        first = [rnd.randrange(10, vocab) for _ in range(args.profile)]
        _, _, reply = run_turn(engine, "p1", first, args.output_len)
        prompt = first + reply + [rnd.randrange(10, vocab) for _ in range(args.turn_len)]
        prof = cProfile.Profile()
        prof.enable()
        run_turn(engine, "p2", prompt, args.output_len)
        prof.disable()
        pstats.Stats(prof).sort_stats(args.sort).print_stats(35)


if __name__ == "__main__":
    main()
