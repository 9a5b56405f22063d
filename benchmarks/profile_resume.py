"""Where a resumed chat turn's time to first token goes: one conversation of --turns turns (an --first-len-token first
prompt, then the reply and --turn-len new tokens each turn) with the prefix cache on, each turn's TTFT and the wall
time of its first engine steps with what each step computed ((new tokens, cached tokens, samples) per row and the
checkpoints it took). Dummy weights at a real shape, one request at a time.

    python3 benchmarks/profile_resume.py --model 9B [--prefill-graph-tokens 0]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SHAPES, header, positive_int


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--turns", type=positive_int, default=4)
    ap.add_argument("--first-len", type=positive_int, default=8192)
    ap.add_argument("--turn-len", type=positive_int, default=200)
    ap.add_argument("--output-len", type=positive_int, default=32)
    ap.add_argument("--prefill-graph-tokens", type=int, default=None,
                    help="the engine option (default: the engine's); 0 runs short prefill steps eagerly")
    args = ap.parse_args()
    from deltaserve import LLM, SamplingParams

    shape = SHAPES[args.model]
    extra = {} if args.prefill_graph_tokens is None else {"prefill_graph_tokens": args.prefill_graph_tokens}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(shape))
        started = time.perf_counter()
        llm = LLM(d, load_format="dummy", max_model_len=args.first_len + args.turns * (args.turn_len + args.output_len)
                  + 64, max_num_seqs=1, max_num_batched_tokens=8192, **extra)
        print(f"engine start {time.perf_counter() - started:.1f} s", flush=True)
        llm.generate([[11] * 64], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        engine, scheduled = llm.engine, []
        schedule = engine.scheduler.schedule

        def logged_schedule():
            out = schedule()
            scheduled.append([(s.num_new_tokens, s.num_computed_tokens, s.samples_token) for s in out.scheduled]
                             + [f"checkpoints {len(out.checkpoints)}"])
            return out

        engine.scheduler.schedule = logged_schedule
        rnd = random.Random(0)
        prompt = [rnd.randrange(10, shape["vocab_size"]) for _ in range(args.first_len)]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        for turn in range(args.turns):
            engine.add_request(str(turn), prompt, params)
            t0, reply, ttft, steps = time.perf_counter(), [], None, []
            while engine.has_unfinished():
                scheduled.clear()
                s0 = time.perf_counter()
                deltas = engine.step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                steps.append((round((time.perf_counter() - s0) * 1e3, 1), list(scheduled)))
                for delta in deltas:
                    if delta.token_ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    reply += delta.token_ids
            print(f"turn {turn}: prompt {len(prompt)} tokens, TTFT {ttft * 1e3:.1f} ms; first steps (ms, rows): "
                  f"{steps[:3]}", flush=True)
            prompt = prompt + reply + [rnd.randrange(10, shape["vocab_size"]) for _ in range(args.turn_len)]
    print(header(""))


if __name__ == "__main__":
    main()
