"""Host-side profile of the offline engine (cProfile over LLM.generate) at a real shape with dummy weights: where
the wall time of a generate call goes when it is far from the GPU-time floor.

    PYTHONPATH=src:. python3 benchmarks/profile_engine.py [--model 9B] [--num-prompts 64] [--input-len 1024]
                                                          [--output-len 32] [--no-model] [--timeline]

--no-model replaces the model run by fixed logits, so what is left is the engine's own host time per step
(scheduler, batch building, sampler, output processing): on the GPU it runs in series with every step.
--timeline times the phases of every step instead of the cProfile run: host time before the model launch, the
launch itself, sampling + waiting for the tokens, and the output processing after them, split by step kind.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from collections import defaultdict
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


def allocator_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


class StepTimeline:
    """Per-step phase times of an engine, recorded by wrapping its step, its model launch and its _run."""

    PHASES = ("schedule+build", "launch", "sample+wait", "after")

    def __init__(self, engine) -> None:
        self.steps: list[tuple[str, dict[str, float]]] = []
        step, run, execute = engine.step, engine._run, engine.runner.execute
        marks: dict[str, float] = {}

        def timed_execute(input_ids, batch):
            marks["exec_start"] = time.perf_counter()
            try:
                return execute(input_ids, batch)
            finally:
                marks["exec_end"] = time.perf_counter()

        def timed_run(out):
            marks["run_start"] = time.perf_counter()
            marks["kind"] = self.kind(out)
            try:
                return run(out)
            finally:
                marks["run_end"] = time.perf_counter()

        def timed_step():
            marks.clear()
            t0 = time.perf_counter()
            deltas = step()
            t1 = time.perf_counter()
            if "exec_end" in marks:
                self.steps.append((marks["kind"], {
                    "schedule+build": marks["exec_start"] - t0, "launch": marks["exec_end"] - marks["exec_start"],
                    "sample+wait": marks["run_end"] - marks["exec_end"], "after": t1 - marks["run_end"]}))
            return deltas

        engine.step, engine._run, engine.runner.execute = timed_step, timed_run, timed_execute

    @staticmethod
    def kind(out) -> str:
        new = [e.num_new_tokens for e in out.scheduled]
        if all(n == 1 for n in new) and all(e.num_computed_tokens > 0 for e in out.scheduled):
            return f"decode x{len(new)}"
        return "prefill/mixed"

    def report(self) -> str:
        by_kind: dict[str, list[dict[str, float]]] = defaultdict(list)
        for kind, phases in self.steps:
            by_kind[kind].append(phases)
        lines = [f"{'step kind':>16} | {'steps':>5} | {'total ms':>9} | " + " | ".join(f"{p:>14}" for p in self.PHASES)
                 + "   (mean ms per step)"]
        for kind, rows in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
            means = [sum(r[p] for r in rows) / len(rows) * 1e3 for p in self.PHASES]
            lines.append(f"{kind:>16} | {len(rows):>5} | {sum(means):>9.2f} | "
                         + " | ".join(f"{m:>14.3f}" for m in means))
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-model", action="store_true", help="fixed logits instead of the model: engine host time")
    ap.add_argument("--timeline", action="store_true", help="phase times per step instead of the cProfile run")
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
        # Warm-up on the timed prompts: the timed run then meets no batch shape the kernels were not compiled for.
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        if args.timeline:
            timeline = StepTimeline(llm.engine)
            retries = allocator_retries()
            t0 = time.perf_counter()
            llm.generate(prompts, sp)
            print(f"generate: {time.perf_counter() - t0:.2f} s; phases of each step (the GPU idles during "
                  "schedule+build and after):\n" + timeline.report(), flush=True)
            # A retry frees the allocator's cached blocks and calls cudaMalloc again: a device sync each time.
            print(f"CUDA caching-allocator retries during generate: {allocator_retries() - retries}")
            return
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
