"""Served step vs the engine alone, at several GIL switch intervals: is the server's event loop stalling the engine?

python benchmarks/bench_gil.py [--switch-interval-ms 5 1 0.5 0.1] [--repeats 3] [--concurrency 16] [--input-len 32]
    [--output-len 128] [--speculative-tokens 3] [--model tiny|demo|DIR] [--device cpu] [--dtype float32]
    [--load-format dummy] [--simulated-acceptance AL] [--max-model-len N]

The engine thread and the server's event loop (SSE chunks: JSON, detokenized text, asyncio) share one process and one
GIL. Each time the engine thread lets the GIL go (around a torch call) while the event loop waits for it, the loop
takes it, and the engine thread waits until the loop lets go or sys.getswitchinterval() passes. Measured here:

1. the floor: the engine alone (LLMEngine.step until done, as LLM.generate) in a process of its own, the same batch;
2. the real server (`python -m deltaserve.server`) in a child process, its switch interval set before it starts,
   driven by benchmarks/serve_load.py's streaming clients from this process: one request per client, all at once.

Columns, per decode step with the whole batch running (the first steps left out), in ms: the engine thread's step
(wall), its time on a CPU and runnable but off one (Linux schedstat), and the rest, which it slept: in a CPU step,
waiting for the GIL; the period from one step's start to the next; the server's main thread's time on a CPU and
runnable per step (the event loop's work, and its waits for a core, perhaps holding the GIL); the clients' mean and
median inter-token latency and output tok/s. Then the step's ratio to the floor's and tok/s's to the first served
run's, and a summary: means over the repeats, with ratios to the baseline (the first --switch-interval-ms; 5 ms is
CPython's default). Runs are interleaved, so a repeat shows the noise.

The defaults (the demo model narrowed, dummy weights, float32, torch on one thread) give a host-bound CPU step of
~26 ms at batch 16, the size of a served MTP step of 35B-A3B on an H200. On a GPU "slept" also holds the waits for the
device: compare the served runs' with the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import positive_int, wait_up

ROOT = Path(__file__).resolve().parent.parent


def schedstat(path: str = "/proc/thread-self/schedstat") -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread, from Linux's scheduler statistics."""
    try:
        on_cpu, runnable, _ = open(path).read().split()
        return int(on_cpu) / 1e9, int(runnable) / 1e9
    except OSError:
        return float("nan"), float("nan")


Step = tuple[float, float, float, float, int, float, float]  # start, wall, on CPU, runnable, deltas, main thread's two


def record_steps(engine, sink: list[Step]) -> None:
    """Wrap engine.step to record each step: its start (monotonic), wall time, the engine thread's time on a CPU and
    time runnable but not running (both from schedstat), its deltas, and the main thread's two at its start (in the
    server, the event loop's). Wall minus on-CPU minus runnable is time the thread slept: in a step, mostly
    waiting for the GIL."""
    step = engine.step
    main_stat = f"/proc/self/task/{threading.main_thread().native_id}/schedstat"

    def timed(*args, **kwargs):
        t0, (c0, r0), main = time.monotonic(), schedstat(), schedstat(main_stat)
        out = step(*args, **kwargs)
        c1, r1 = schedstat()
        sink.append((t0, time.monotonic() - t0, c1 - c0, r1 - r0, len(out), *main))
        return out
    engine.step = timed


def summarize_steps(steps: list[Step], batch: int) -> dict[str, float]:
    """Decode steps that delivered a token to every request of the batch, past the first few (prefill, warm-up)."""
    full = [s for s in steps[3:] if s[4] >= batch]
    if len(full) < 4:
        raise SystemExit(f"only {len(full)} steps ran the whole batch of {batch}; raise --output-len")
    n = len(full)
    pairs = [(a, b) for a, b in zip(full, full[1:]) if b[0] - a[0] < 2 * (a[1] + b[1])]  # consecutive steps only
    ms = lambda total, count: 1000 * total / max(count, 1)  # noqa: E731
    return {"steps": n, "step_ms": ms(sum(s[1] for s in full), n), "cpu_ms": ms(sum(s[2] for s in full), n),
            "runq_ms": ms(sum(s[3] for s in full), n), "slept_ms": ms(sum(s[1] - s[2] - s[3] for s in full), n),
            "period_ms": ms(sum(b[0] - a[0] for a, b in pairs), len(pairs)),
            "loop_cpu_ms": ms(sum(b[5] - a[5] for a, b in pairs), len(pairs)),
            "loop_runq_ms": ms(sum(b[6] - a[6] for a, b in pairs), len(pairs))}


def load_args(args: argparse.Namespace, url: str, vocab: int) -> argparse.Namespace:
    """serve_load's settings for the served run: one request per client, all at once, token-id prompts."""
    from benchmarks import serve_load

    load = serve_load.parse_args(["--url", url, "--concurrency", str(args.concurrency), "--num-requests",
                                  str(args.concurrency), "--input-len", str(args.input_len), "--output-len",
                                  str(args.output_len), "--warmup", "2", "--seed", str(args.seed),
                                  "--min-token-id", str(vocab // 2), "--max-token-id", str(vocab)])
    load.concurrency = args.concurrency  # run_load takes one value (parse_args: a sweep's list)
    return load


def prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """The served run's timed prompts (serve_load draws them from the same seed), so that the floor's steps see the
    same tokens: with dummy weights the MoE routing, and so a step's time, follows them."""
    from benchmarks import serve_load

    timed, _ = serve_load.make_payloads(load_args(args, "", vocab), "floor")
    return [p["prompt"] for p in timed]


TINY = dict(hidden_size=64, num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
            head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, moe_intermediate_size=16,
            shared_expert_intermediate_size=32)


def tiny_model(out: Path) -> str:
    """The demo model's tokenizer and architecture at a quarter of its width and half its depth (dummy weights): on
    CPU its step at batch 16 is mostly host work, ~25 ms, as a served MTP step on an H200."""
    from deltaserve.demo import SHIPPED_DEMO_DIR

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        shutil.copy(Path(SHIPPED_DEMO_DIR) / name, out / name)
    config = json.loads((Path(SHIPPED_DEMO_DIR) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **TINY}))
    return str(out)


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    """EngineArgs fields beyond the model, the same for the floor and the server."""
    out: dict[str, object] = dict(device=args.device, max_model_len=args.max_model_len, load_format=args.load_format)
    if args.dtype:
        out["dtype"] = args.dtype
    if args.speculative_tokens:
        out["speculative_tokens"] = args.speculative_tokens
    if args.simulated_acceptance:
        out["speculative_simulated_acceptance"] = args.simulated_acceptance
    return out


def engine_args(args: argparse.Namespace):
    from deltaserve.config import EngineArgs

    return EngineArgs(model=args.model, **engine_options(args))  # type: ignore[arg-type]


def child_floor(args: argparse.Namespace) -> int:
    """In a process of its own (a GPU's memory is free again for the server): the engine alone, as LLM.generate
    drives it; its figures go to --stats-out."""
    import torch

    from deltaserve.engine.engine import LLMEngine
    from deltaserve.sampling_params import SamplingParams

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    engine = LLMEngine(engine_args(args))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    steps: list[Step] = []
    record_steps(engine, steps)
    for i, ids in enumerate(prompts(args, engine.model_config.vocab_size)):
        engine.add_request(f"r{i}", ids, params)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    out = summarize_steps(steps, args.concurrency)
    out["out_tok_s"] = args.concurrency * args.output_len / (time.perf_counter() - t0)
    out.pop("loop_cpu_ms"), out.pop("loop_runq_ms")  # here the main thread is the engine's
    engine.shutdown()
    Path(args.stats_out).write_text(json.dumps(out))
    return 0


def child_cmd(args: argparse.Namespace, role: str, stats: Path) -> list[str]:
    """This script in a child process (the floor or the server), with the settings both share."""
    cmd = [sys.executable, __file__, f"--child-{role}", "--stats-out", str(stats), "--model", args.model,
           "--load-format", args.load_format, "--device", args.device, "--max-model-len",
           str(args.max_model_len), "--speculative-tokens", str(args.speculative_tokens), "--concurrency",
           str(args.concurrency), "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--seed",
           str(args.seed)]
    cmd += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    return cmd + (["--simulated-acceptance", str(args.simulated_acceptance)] if args.simulated_acceptance else [])


def child_env() -> dict[str, str]:
    """This checkout first, then whatever the caller's PYTHONPATH held (packages installed with --target)."""
    paths = [str(ROOT / "src"), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def floor(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "floor.json"
        subprocess.run(child_cmd(args, "floor", stats), env=child_env(), check=True)
        return json.loads(stats.read_text())


def child_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """In the server process: record the engine's steps, serve until SIGTERM, write the steps to --stats-out."""
    import torch

    from deltaserve.engine import async_engine
    from deltaserve.server.__main__ import main

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.set_switch_interval_ms:
        sys.setswitchinterval(args.set_switch_interval_ms / 1000)
    steps: list[Step] = []
    real_init = async_engine.AsyncLLM.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        record_steps(self.engine, steps)
    async_engine.AsyncLLM.__init__ = init
    rc = main(rest)
    Path(args.stats_out).write_text(json.dumps({"steps": steps, "switch_interval": sys.getswitchinterval()}))
    return rc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(args: argparse.Namespace, interval_ms: float) -> dict[str, float]:
    from benchmarks import serve_load

    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]  # a checkpoint with a vision tower: nested
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "steps.json"
        cmd = child_cmd(args, "serve", stats) + ["--set-switch-interval-ms", str(interval_ms), "--", args.model,
                                                 "--port", str(port), "--log-level", "warning"]
        cmd += [x for k, v in engine_options(args).items() for x in (f"--{k.replace('_', '-')}", str(v))]
        proc = subprocess.Popen(cmd, env=child_env())
        try:
            wait_up(url, proc)
            load = load_args(args, url, vocab)
            results, duration, _ = asyncio.run(serve_load.run_load(load))
            client = serve_load.summarize(results, duration)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        if client["requests_failed"]:
            raise SystemExit(f"{client['requests_failed']:.0f} requests failed; first: "
                             f"{next(r.error for r in results if not r.ok)}")
        record = json.loads(stats.read_text())
    out = summarize_steps([tuple(s) for s in record["steps"]], args.concurrency)
    out.update(itl_ms=client["itl_ms_mean"], itl_p50_ms=client["itl_ms_p50"], tpot_ms=client["tpot_ms_p50"],
               out_tok_s=client["output_tok_s"], switch_ms=1000 * record["switch_interval"])
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a checkpoint directory, 'demo' (the model the package ships) or "
                   "'tiny' (default: the demo model narrowed, dummy weights; see tiny_model)")
    p.add_argument("--load-format", default=None, help="default: dummy for 'tiny', else auto")
    p.add_argument("--simulated-acceptance", type=float, default=None,
                   help="--speculative-simulated-acceptance (dummy weights accept ~no drafts: one token per step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, else the checkpoint's")
    p.add_argument("--max-model-len", type=positive_int, default=1024)
    p.add_argument("--speculative-tokens", type=int, default=3, help="MTP drafts per step (0: none)")
    p.add_argument("--switch-interval-ms", type=float, nargs="+", default=[5.0, 1.0, 0.5, 0.1])
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of each setting, interleaved (the noise)")
    p.add_argument("--concurrency", type=positive_int, default=16)
    p.add_argument("--input-len", type=positive_int, default=32)
    p.add_argument("--output-len", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads in both processes (default: 1 on cpu, so a torch call runs on the calling "
                        "thread; torch's own default elsewhere)")
    p.add_argument("--child-serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--set-switch-interval-ms", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model == "demo":
        from deltaserve.demo import SHIPPED_DEMO_DIR
        args.model = str(SHIPPED_DEMO_DIR)
    if args.device == "cpu":
        args.torch_threads = args.torch_threads or 1
        args.dtype = args.dtype or "float32"
    args.load_format = args.load_format or ("dummy" if args.model == "tiny" else "auto")
    return args, rest


def main() -> int:
    args, rest = parse_args()
    if args.child_serve:
        return child_serve(args, rest)
    if args.child_floor:
        return child_floor(args)
    if args.model == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            args.model = tiny_model(Path(tmp))
            return measure(args)
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    dtype = args.dtype or "checkpoint dtype"
    print(f"model {args.model} | {args.device} {dtype} | concurrency {args.concurrency} | input "
          f"{args.input_len} | output {args.output_len} | MTP {args.speculative_tokens} | torch threads "
          f"{args.torch_threads} | python {sys.version.split()[0]}")
    base = floor(args)
    cols = [("step ms", "step_ms"), ("on CPU", "cpu_ms"), ("runnable", "runq_ms"), ("slept", "slept_ms"),
            ("period", "period_ms"), ("loop CPU", "loop_cpu_ms"), ("loop runq", "loop_runq_ms"), ("ITL ms", "itl_ms"),
            ("ITL p50", "itl_p50_ms"), ("tok/s", "out_tok_s")]
    head = f"{'run':<24} | " + " | ".join(f"{c:>8}" for c, _ in cols) + " | step/floor | tok/s/first"
    print(head + "\n" + "-" * len(head))

    def show(name: str, st: dict[str, float], first: dict[str, float] | None) -> None:
        ratio = st["out_tok_s"] / first["out_tok_s"] if first else float("nan")
        print(f"{name:<24} | " + " | ".join(f"{st.get(k, float('nan')):>8.2f}" for _, k in cols) +
              f" | {st['step_ms'] / base['step_ms']:>10.3f} | {ratio:>11.3f}", flush=True)
    show("engine alone #1 (floor)", base, None)
    first: dict[str, float] | None = None
    runs: dict[str, list[dict[str, float]]] = {"engine alone (floor)": [base]}
    for rep in range(args.repeats):
        if rep:
            runs["engine alone (floor)"].append(floor(args))
            show(f"engine alone #{rep + 1}", runs["engine alone (floor)"][-1], None)
        for ms in args.switch_interval_ms:
            st = served(args, ms)
            first = first or st
            name = f"served {st['switch_ms']:g} ms"  # the interval the server ran at, as it read it back
            runs.setdefault(name, []).append(st)
            show(f"{name} #{rep + 1}", st, first)
    print(summary(runs))
    return 0


def summary(runs: dict[str, list[dict[str, float]]]) -> str:
    """Means over the repeats (min-max of the step), and ratios to the baseline: the first served setting. "lost" is
    the step's wall time off a CPU (runnable + slept): what the server's other threads and the OS cost the engine
    thread, apart from the noise in its own CPU time (other processes sharing the cores' caches, a VM's neighbours)."""
    mean = lambda rs, k: sum(r.get(k, float("nan")) for r in rs) / len(rs)  # noqa: E731
    for rs in runs.values():
        for r in rs:
            r["lost_ms"] = r["step_ms"] - r["cpu_ms"]
    names = list(runs)
    base_name = names[1] if len(names) > 1 else names[0]
    base = runs[base_name]
    lines = [f"\nmeans of {len(base)} runs each; baseline: {base_name}",
             f"{'setting':<22} | {'step ms (min-max)':>19} | {'on CPU':>6} | {'lost':>5} | {'slept':>5} | "
             f"{'ITL ms':>6} | {'tok/s':>5} | {'step / baseline':>15} | {'lost / baseline':>15} | "
             f"{'tok/s / baseline':>16}"]
    for name, rs in runs.items():
        steps = [r["step_ms"] for r in rs]
        lines.append(f"{name:<22} | {mean(rs, 'step_ms'):>6.2f} ({min(steps):.1f}-{max(steps):.1f}) | "
                     f"{mean(rs, 'cpu_ms'):>6.2f} | {mean(rs, 'lost_ms'):>5.2f} | {mean(rs, 'slept_ms'):>5.2f} | "
                     f"{mean(rs, 'itl_ms'):>6.2f} | {mean(rs, 'out_tok_s'):>5.0f} | "
                     f"{mean(rs, 'step_ms') / mean(base, 'step_ms'):>15.3f} | "
                     f"{mean(rs, 'lost_ms') / mean(base, 'lost_ms'):>15.3f} | "
                     f"{mean(rs, 'out_tok_s') / mean(base, 'out_tok_s'):>16.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
