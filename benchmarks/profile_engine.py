"""Host-side profile of the offline engine (cProfile over LLM.generate) at a real shape with dummy weights: where
the wall time of a generate call goes when it is far from the GPU-time floor.

    PYTHONPATH=src:. python3 benchmarks/profile_engine.py [--model 9B] [--num-prompts 64] [--input-len 1024]
                                                          [--output-len 32] [--no-model]

--no-model replaces the model run by fixed logits, so what is left is the engine's own host time per step
(scheduler, batch building, sampler, output processing): on the GPU it runs in series with every step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SHAPES, triton_compiles


def skip_model(llm) -> None:
    """Replace the runner's forward by fixed logits (the sampler and everything around it still run)."""
    from deltaserve.engine.runner import RunnerOutput

    runner = llm.engine.runner
    vocab = runner.model_config.vocab_size
    logits = torch.randn(llm.engine.scheduler_config.max_num_seqs, vocab, device=runner.device)

    def execute(input_ids, batch):
        n = batch.logits_indices.shape[0]
        return RunnerOutput(hidden=logits.new_zeros(n, 1), logits=logits[:n])

    runner.execute = execute


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-model", action="store_true", help="fixed logits instead of the model: engine host time")
    args = ap.parse_args()
    from deltaserve import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.model]["vocab_size"]
    prompts = torch.randint(10, vocab - 10, (args.num_prompts, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(SHAPES[args.model]))
        t0 = time.perf_counter()
        llm = LLM(d, load_format="dummy", max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=args.num_prompts, max_num_batched_tokens=8192)
        print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.no_model:
            skip_model(llm)
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        if args.no_model:
            t0 = time.perf_counter()
            llm.generate(prompts, sp)
            steps = args.output_len + 1
            print(f"engine host time without the model: {(time.perf_counter() - t0) / steps * 1e3:.2f} ms per step "
                  f"(~{steps} steps, batch {args.num_prompts})", flush=True)
        prof = cProfile.Profile()
        with triton_compiles() as compiled:
            t0 = time.perf_counter()
            prof.enable()
            llm.generate(prompts, sp)
            prof.disable()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        print(f"generate: {time.perf_counter() - t0:.2f} s for {args.num_prompts} x ({args.input_len} in, "
              f"{args.output_len} out); Triton compiles during it: {len(compiled)} {sorted(set(compiled))}",
              flush=True)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(22)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
