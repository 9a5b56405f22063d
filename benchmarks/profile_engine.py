"""Host-side profile of the offline engine (cProfile over LLM.generate) at a real shape with dummy weights: where
the wall time of a generate call goes when it is far from the GPU-time floor.

    PYTHONPATH=src:. python3 benchmarks/profile_engine.py [--model 9B] [--num-prompts 64] [--input-len 1024]
                                                          [--output-len 32] [--no-model] [--timeline]
                                                          [--kernels] [--find-syncs]
                                                          [--speculative-tokens 3 --simulated-acceptance 3.39]

--no-model replaces the model run by fixed logits, so what is left is the engine's own host time per step
(scheduler, batch building, sampler, output processing): on the GPU it runs in series with every step.
--timeline times the phases of every step instead of the cProfile run (see StepTimeline), split by step kind.
--sync-scheduling turns the engine's async scheduling off (each step waits for its own tokens), for comparison.
--kernels profiles the generate call with torch.profiler instead: the kernels per prefill/mixed step (to compare with
profile_step.py mixed, the same kind of step outside the engine), the CUDA runtime calls that block the host, and the
batch shapes of the prefill/mixed steps. --find-syncs lists every place that made the host wait for the device.
--speculative-tokens K runs MTP (verify steps are their own kind in --timeline and --kernels), at the acceptance
length --simulated-acceptance sets.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from benchmarks.common import SHAPES, positive_int, triton_compiles


def skip_model(llm) -> None:
    """Replace the runner's model run by fixed logits in the model dtype, as the runner returns them (the upload,
    the sampler and everything around them still run)."""
    runner = llm.engine.runner
    vocab = runner.config.model.vocab_size
    logits = torch.randn(runner.config.scheduler.max_num_seqs, vocab, device=runner.device, dtype=runner.dtype)

    def model_logits(dev, step):
        n = step.logits_rows.shape[0]
        return logits[:n] if n else None

    runner.execute_model = model_logits


def check_finished(outputs, output_len: int) -> None:
    """A timing is only worth printing if every request ran to its length (a failed step ends requests early)."""
    short = [(o.request_id, c.finish_reason, len(c.token_ids)) for o in outputs for c in o.outputs
             if len(c.token_ids) != output_len]
    if short:
        raise SystemExit(f"{len(short)} requests did not run to {output_len} tokens (id, finish, tokens): {short[:4]}")


def allocator_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


class StepTimeline:
    """Per-step phase times of an engine, recorded by wrapping its step, launch, finish and model run.

    With async scheduling a step launches its own work and then finishes the previous step's: `wait` is the time
    the host blocks on those tokens (the GPU is busy then), and the GPU idles only if the host work around it is
    longer than a step's GPU time. Without it, `wait` is the step's own GPU time left after the launches."""

    PHASES = ("schedule+build", "model launch", "sampler launch", "wait", "outputs")

    def __init__(self, engine) -> None:
        self.steps: list[tuple[str, dict[str, float]]] = []
        runner = engine.runner
        step, finish, launch, run_model, collect = (engine.step, engine._finish, runner.launch, runner.execute_model,
                                                    runner.collect)
        marks: dict[str, float] = {}
        now = time.perf_counter

        def timed_model(dev, step_input):
            marks["exec_start"] = now()
            try:
                return run_model(dev, step_input)
            finally:
                marks["exec_end"] = now()

        def timed_launch(step_input):
            marks["kind"] = self.kind(step_input)
            marks["launch_start"] = now()
            try:
                return launch(step_input)
            finally:
                marks["launch_end"] = now()

        def timed_collect(launched):
            t0 = now()
            try:
                return collect(launched)
            finally:
                marks["wait"] += now() - t0

        def timed_finish(*args):
            t0, waited = now(), marks["wait"]
            try:
                return finish(*args)
            finally:
                marks["outputs"] += now() - t0 - (marks["wait"] - waited)

        def timed_step():
            marks.clear()
            marks.update(wait=0.0, outputs=0.0)
            t0 = now()
            deltas = step()
            if "exec_end" in marks and "launch_end" in marks:
                self.steps.append((marks["kind"], {
                    "schedule+build": marks["launch_start"] - t0,
                    "model launch": marks["exec_end"] - marks["exec_start"],
                    "sampler launch": marks["launch_end"] - marks["exec_end"]
                    + marks["exec_start"] - marks["launch_start"],
                    "wait": marks["wait"], "outputs": marks["outputs"], "total": now() - t0}))
            return deltas

        engine.step, engine._finish = timed_step, timed_finish
        runner.launch, runner.execute_model, runner.collect = timed_launch, timed_model, timed_collect

    @staticmethod
    def kind(step_input) -> str:
        if step_input.is_verify and step_input.num_verify_rows < step_input.num_rows:
            return f"prefill + verify x{step_input.num_verify_rows}"  # a verify step carrying prompt chunks
        if step_input.is_verify:
            return f"verify x{step_input.num_rows}"
        if step_input.tokens_per_row == 1:
            return f"decode x{step_input.num_rows}"
        return "prefill/mixed"

    def report(self) -> str:
        by_kind: dict[str, list[dict[str, float]]] = defaultdict(list)
        for kind, phases in self.steps:
            by_kind[kind].append(phases)
        lines = [f"{'step kind':>16} | {'steps':>5} | {'total ms':>9} | " + " | ".join(f"{p:>14}" for p in self.PHASES)
                 + "   (mean ms per step)"]
        for kind, rows in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
            means = [sum(r[p] for r in rows) / len(rows) * 1e3 for p in ("total", *self.PHASES)]
            lines.append(f"{kind:>16} | {len(rows):>5} | " + " | ".join(
                f"{m:>{9 if i == 0 else 14}.{2 if i == 0 else 3}f}" for i, m in enumerate(means)))
        lines.append("each prefill/mixed step, in order (ms):")
        for kind, phases in self.steps:
            if kind == "prefill/mixed":
                lines.append(f"{'':>16} | {'':>5} | {phases['total'] * 1e3:>9.2f} | "
                             + " | ".join(f"{phases[p] * 1e3:>14.3f}" for p in self.PHASES))
        return "\n".join(lines)


def merged_intervals(spans) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of (start, end) spans."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def profile_kernels(llm, prompts: list[list[int]], sp) -> None:
    """torch.profiler over one generate: per step its wall time, launch time and kernel time (the GPU idles for the
    difference); the kernels of the prefill/mixed steps; the CUDA runtime calls that took host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.profile_step import profiled_kernels

    engine = llm.engine
    labels: list[str] = []
    step, run_model = engine.step, engine.runner.execute_model

    def labelled_step():
        with record_function("engine.step"):
            return step()

    def labelled_execute(dev, step_input):
        q = step_input.query_lens.tolist()
        prefill = [n for n in q if n > 1]
        labels.append(StepTimeline.kind(step_input) if step_input.is_verify or step_input.tokens_per_row == 1
                      else f"{len(q) - len(prefill)} decode + {prefill}")
        with record_function("runner.execute"):
            return run_model(dev, step_input)

    engine.step, engine.runner.execute_model = labelled_step, labelled_execute
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    engine.step, engine.runner.execute_model = step, run_model
    events = prof.events()
    marks = ("engine.step", "runner.execute")  # also appear as device-side annotations: not kernels
    kernels = merged_intervals(
        (e.time_range.start, e.time_range.end) for e in events
        if e.device_type == DeviceType.CUDA and e.name not in marks)
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "engine.step")
    launches = [e.time_range.elapsed_us() for e in sorted(
        (e for e in events if e.name == "runner.execute"), key=lambda e: e.time_range.start)]
    print(f"generate under the profiler: {wall:.2f} s, {len(steps)} steps")
    print(f"{'step':>28} | {'wall ms':>8} | {'launch ms':>9} | {'kernel ms':>9} | GPU busy")
    summed: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])  # decode / verify: wall, launch, busy, n
    for (lo, hi), launch, label in zip(steps, launches, labels):
        busy = sum(min(b, hi) - max(a, lo) for a, b in kernels if a < hi and b > lo)
        kind = label.split(" x")[0]
        if kind in ("decode", "verify"):
            summed[kind] = [summed[kind][0] + hi - lo, summed[kind][1] + launch, summed[kind][2] + busy,
                            summed[kind][3] + 1]
            continue
        print(f"{label[:28]:>28} | {(hi - lo) / 1e3:8.1f} | {launch / 1e3:9.1f} | {busy / 1e3:9.1f} | "
              f"{busy / (hi - lo):.0%}")
    for kind, (wall_us, launch_us, busy_us, n) in summed.items():
        print(f"{f'{kind} steps (mean of {n})':>28} | {wall_us / n / 1e3:8.2f} | {launch_us / n / 1e3:9.2f} | "
              f"{busy_us / n / 1e3:9.2f} | {busy_us / wall_us:.0%}")
    mixed = sum(label.split(" x")[0] not in ("decode", "verify") for label in labels)
    print("kernels of the whole run per prefill/mixed step (decode and verify steps' kernels included):\n"
          + profiled_kernels(prof, max(mixed, 1), top=25, skip=marks)[1])
    runtime = [e for e in prof.key_averages() if e.key.startswith("cuda") and e.device_type != DeviceType.CUDA]
    runtime.sort(key=lambda e: -e.cpu_time_total)
    print(f"{'host ms':>9} {'calls':>7}  CUDA runtime call")
    for e in runtime[:8]:
        print(f"{e.cpu_time_total / 1e3:9.1f} {e.count:7d}  {e.key}")


def find_syncs(llm, prompts: list[list[int]], sp) -> None:
    """Run generate with torch's sync debug mode on; print each distinct call stack that synchronised."""
    stacks: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        stacks[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-6:]))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            llm.generate(prompts, sp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"{'syncs':>6}  where (innermost first)")
    for where, n in stacks.most_common():
        print(f"{n:6d}  {where}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9B", choices=list(SHAPES))
    ap.add_argument("--num-prompts", type=positive_int, default=64)
    ap.add_argument("--input-len", type=positive_int, default=1024)
    ap.add_argument("--output-len", type=positive_int, default=32)
    ap.add_argument("--no-model", action="store_true", help="fixed logits instead of the model: engine host time")
    ap.add_argument("--timeline", action="store_true", help="phase times per step instead of the cProfile run")
    ap.add_argument("--kernels", action="store_true", help="torch.profiler over the run instead of cProfile")
    ap.add_argument("--find-syncs", action="store_true", help="list the places the host waited for the device")
    ap.add_argument("--sync-scheduling", action="store_true", help="turn the engine's async scheduling off")
    ap.add_argument("--speculative-tokens", type=int, default=0,
                    help="MTP drafts per step (the shape gets one MTP layer); async scheduling is then off")
    ap.add_argument("--simulated-acceptance", type=float, default=None,
                    help="with --speculative-tokens: the mean tokens a verify step keeps (random weights accept "
                         "nothing otherwise), e.g. the published 3.39 at K = 3")
    args = ap.parse_args()
    if args.no_model and args.speculative_tokens:
        # the MTP head drafts from the model's hidden states: without the model there is nothing to draft from
        ap.error("--no-model cannot run with --speculative-tokens (MTP drafts from the model's hidden states); "
                 "use --timeline with the model for the host phases of verify steps")
    from deltaserve import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.model]["vocab_size"]
    prompts = torch.randint(10, vocab - 10, (args.num_prompts, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as d:
        mtp = {"mtp_num_hidden_layers": 1} if args.speculative_tokens else {}
        (Path(d) / "config.json").write_text(json.dumps({**SHAPES[args.model], **mtp}))
        t0 = time.perf_counter()
        llm = LLM(d, load_format="dummy", max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=args.num_prompts, max_num_batched_tokens=8192,
                  async_scheduling=False if args.sync_scheduling else None,
                  speculative_tokens=args.speculative_tokens,
                  speculative_simulated_acceptance=args.simulated_acceptance)
        print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.no_model:
            skip_model(llm)
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        # Warm-up on the timed prompts: the timed run then meets no batch shape the kernels were not compiled for.
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        if args.kernels or args.find_syncs:
            (profile_kernels if args.kernels else find_syncs)(llm, prompts, sp)
            return
        if args.timeline:
            timeline = StepTimeline(llm.engine)
            retries = allocator_retries()
            t0 = time.perf_counter()
            llm.generate(prompts, sp)
            print(f"generate: {time.perf_counter() - t0:.2f} s; phases of each step (async scheduling "
                  f"{'on' if llm.engine.async_scheduling else 'off'}):\n" + timeline.report(), flush=True)
            # A retry frees the allocator's cached blocks and calls cudaMalloc again: a device sync each time.
            print(f"CUDA caching-allocator retries during generate: {allocator_retries() - retries}")
            return
        if args.no_model:
            t0 = time.perf_counter()
            check_finished(llm.generate(prompts, sp), args.output_len)
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
