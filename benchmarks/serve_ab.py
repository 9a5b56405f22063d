"""A/B of a serving change: serve each source tree in turn with the same options, drive each with serve_load.py, and
print the figures side by side with ratios against the first tree. One command, so one device call holds the whole
comparison (the commit before a change and after it, on the same card).

    PYTHONPATH=src:. python3 benchmarks/serve_ab.py --tree before=/tmp/old/src --tree after=src --model 27B \\
        --server-args "--speculative-tokens 3 --speculative-simulated-acceptance 3.39 --num-pages 5719" \\
        --load-args "--input-len 512 --output-len 256 --concurrency 16 --num-requests 128" [--rounds 2]

Each tree's server is `python -m deltaserve.cli serve DIR --load-format dummy --max-model-len L --port P ARGS` with
the tree first on PYTHONPATH (DIR: benchmarks/dummy_model_dir.py's for --model, or --model-dir), waited for on
/health, driven by this tree's serve_load.py (one --concurrency value) and stopped; its log goes to --log-dir. Give
the KV pool's size (`--num-pages`) in --server-args when the trees must hold the same memory: the planner's pool can
differ from one start to the next. --rounds 2 runs the trees in order, then in reverse, so that the machine's
first-use costs (Triton compiles, the first server's autotuning) fall on each tree once; the summary gives each
tree's median over its rounds. --step-trace also prints, after each run, where its served time went: the steps per
kind with their device time, the GPU's idle time between them and the host's time around them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, parse_tree, table, wait_up  # noqa: E402

# the figures the summary shows, from serve_load's stats
FIGURES = ("total_tok_s", "ttft_ms_p50", "ttft_ms_mean", "tpot_ms_p50", "tpot_ms_mean", "itl_ms_p99", "duration_s")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def plan_line(log: Path) -> str:
    """The server's memory plan ("KV cache (...): N pages ..."), to show that the trees held the same pool."""
    return next((line.split(": ", 1)[-1] for line in log.read_text(errors="replace").splitlines()
                 if "KV cache (" in line), "?")


def trace_path(tree: Path, log: Path, wanted: bool) -> Path | None:
    """Where the run's step trace goes: beside its log, when --step-trace is asked for and the tree has the option
    (a tree from before it would refuse the flag)."""
    if not wanted:
        return None
    if not (tree / "deltaserve" / "engine" / "step_trace.py").is_file():
        print(f"== {tree}: no --step-trace in this tree; its runs are not traced", flush=True)
        return None
    return log.with_suffix(".trace.jsonl")


def print_trace(trace: Path | None) -> None:
    """The run's steps per kind (benchmarks/step_trace.py): device, GPU idle and host time."""
    from benchmarks import step_trace

    if trace is None or not trace.is_file() or not (steps := step_trace.load(str(trace))):
        return
    print("\n".join(step_trace.summary(steps, f"step trace {trace}")), flush=True)


def serve_and_drive(name: str, tree: Path, model_dir: Path, args: argparse.Namespace, log: Path) -> dict:
    from benchmarks import serve_load

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
    trace = trace_path(tree, log, args.step_trace)
    cmd = [sys.executable, "-m", "deltaserve.cli", "serve", str(model_dir), "--load-format", "dummy",
           "--max-model-len", str(args.max_model_len), "--port", str(args.port), *shlex.split(args.server_args),
           *(["--step-trace", str(trace)] if trace else [])]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{args.port}"
        up = wait_up(url, server, args.startup_timeout, log)
        print(f"== {name} ({tree}): up after {up:.0f} s; {plan_line(log)}", flush=True)
        (stats,) = serve_load.main(["--url", url, *shlex.split(args.load_args)])
    finally:
        stop(server)
    print_trace(trace)
    return stats


def summary(runs: list[tuple[str, int, dict]], names: list[str]) -> str:
    """Each tree's median over its rounds, and its ratio against the first tree's."""
    med = {n: {f: statistics.median(s[f] for t, _, s in runs if t == n) for f in FIGURES} for n in names}
    rows = []
    for n in names:
        row = {"tree": n, **{f: round(v, 2) for f, v in med[n].items()}}
        base = med[names[0]]
        row["tok/s ratio"] = round(med[n]["total_tok_s"] / base["total_tok_s"], 3)
        row["TPOT p50 ratio"] = round(med[n]["tpot_ms_p50"] / base["tpot_ms_p50"], 3)
        rows.append(row)
    return table(rows)


def main(argv: list[str] | None = None) -> list[tuple[str, int, dict]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=parse_tree, action="append", required=True, metavar="NAME=PATH",
                    help="a tree's src directory (repeat: the first is the baseline)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", choices=sorted(SHAPES), help="a published shape, served with dummy weights")
    where.add_argument("--model-dir", help="a model directory (config.json and tokenizer): dummy weights, or its own "
                       "with --server-args '--load-format auto' (the later option wins)")
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--server-args", default="", help="more `deltaserve serve` options, one string")
    ap.add_argument("--load-args", default="--preset published-8k1k --concurrency 16",
                    help="serve_load.py options (one --concurrency value), one string")
    ap.add_argument("--rounds", type=int, choices=(1, 2), default=1,
                    help="2: the trees in order, then in reverse")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for a server's /health")
    ap.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temporary directory)")
    ap.add_argument("--json-out", default=None, help="write every run's stats to this file")
    ap.add_argument("--step-trace", action="store_true",
                    help="serve with --step-trace (trees that have it; the trace beside the server's log) and print "
                    "each run's steps per kind: device, GPU idle and host time (benchmarks/step_trace.py)")
    args = ap.parse_args(argv)
    names = [n for n, _ in args.tree]
    if len(set(names)) != len(names):
        ap.error(f"--tree names must differ, got {names}")
    from benchmarks import serve_load
    load = serve_load.parse_args(shlex.split(args.load_args))
    if load.concurrency is None or len(load.concurrency) != 1:
        ap.error(f"--load-args needs one --concurrency value (got {load.concurrency}): each tree's run is one load")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_ab_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        from benchmarks.dummy_model_dir import write_model_dir
        model_dir = write_model_dir(args.model, log_dir / f"model_{args.model}")
    else:
        model_dir = Path(args.model_dir)
    order = list(args.tree) + (list(reversed(args.tree)) if args.rounds == 2 else [])
    runs = []
    for i, (name, tree) in enumerate(order):
        stats = serve_and_drive(name, tree, model_dir, args, log_dir / f"server_{i}_{name}.log")
        runs.append((name, i, stats))
    print(table([{"run": i, "tree": n, **{f: round(s[f], 2) for f in FIGURES}} for n, i, s in runs]))
    print(summary(runs, names))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, "trees": {n: str(p) for n, p in args.tree},
                       "runs": [{"run": i, "tree": n, "stats": s} for n, i, s in runs]}, f, indent=2)
    return runs


if __name__ == "__main__":
    main()
