"""Summarize a step trace (`deltaserve serve ... --step-trace FILE`, or `LLM(..., step_trace=FILE)`): per kind of step,
how many ran, their rows, their device time, the GPU's idle time before them and the host's time around them; then
how the prompts were chunked. Where served time goes beyond the kernels: `idle` is time the GPU had nothing queued.

    python3 benchmarks/step_trace.py /tmp/trace.jsonl [--from-step 100] [--to-step 5000] [--prompts]

Kinds: decode (one token a row), verify (MTP verify rows), mixed (prompt chunks beside decode or verify rows),
prefill (prompt chunks only). Times in ms; device and idle times are CUDA only (blank elsewhere). "launch-bound":
steps whose launch took at least LAUNCH_BOUND of their device time (the GPU likely waited on the host).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

KINDS = ("decode", "verify", "mixed", "prefill")
# A step whose host launch took at least this share of its device time likely kept the GPU waiting on Python (its
# kernels queued about as fast as they ran): an H100 serving 35B-A3B launched its eager 8k prefill steps in 88-153 ms
# for ~120 ms of GPU work, and the steps that took 0.9x or more of it lasted as long as their launch (RESULTS.md
# 2026-12-07).
LAUNCH_BOUND = 0.9


def kind(step: dict) -> str:
    if step["prefill_tokens"] == 0:
        return "verify" if step["verify_rows"] else "decode"
    return "mixed" if step["decode_rows"] else "prefill"


def load(path: str, first: int = 0, last: int | None = None) -> list[dict]:
    with open(path) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    return [s for s in steps if s["step"] >= first and (last is None or s["step"] <= last)]


def _stat(values: list, fn) -> str:
    values = [v for v in values if v is not None]
    return f"{fn(values):.3f}" if values else ""


def kinds_table(steps: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in steps:
        groups[kind(s)].append(s)
    lines = ["| kind | steps | rows | prefill tokens | device p50 | device mean | idle mean | schedule mean | "
             "launch mean | wait mean | graph replays | launch-bound |", "|---" * 12 + "|"]
    for k in KINDS:
        g = groups.get(k)
        if not g:
            continue
        mean = {name: _stat([s[name] for s in g], statistics.fmean) for name in
                ("rows", "prefill_tokens", "device_ms", "idle_ms", "schedule_ms", "launch_ms", "wait_ms")}
        graphs = sum(1 for s in g if s["graph"])
        bound = sum(1 for s in g if s["device_ms"] and s["launch_ms"] >= LAUNCH_BOUND * s["device_ms"])
        lines.append(f"| {k} | {len(g)} | {mean['rows']} | {mean['prefill_tokens']} | "
                     f"{_stat([s['device_ms'] for s in g], statistics.median)} | {mean['device_ms']} | "
                     f"{mean['idle_ms']} | {mean['schedule_ms']} | {mean['launch_ms']} | {mean['wait_ms']} | "
                     f"{graphs}/{len(g)} | {bound}/{len(g)} |")
    return lines


def totals(steps: list[dict]) -> str:
    device = sum(s["device_ms"] or 0 for s in steps)
    idle = sum(s["idle_ms"] or 0 for s in steps)
    span = steps[-1]["t_ms"] - steps[0]["t_ms"] if len(steps) > 1 else 0.0
    share = f", idle {idle / (device + idle):.1%} of device + idle" if device + idle else ""
    return (f"{len(steps)} steps over {span:.0f} ms of host time (first to last schedule): device {device:.0f} ms, "
            f"idle {idle:.0f} ms{share}")


def chunks_by_prompt(steps: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Each prompt's chunks in order, as (index in `steps`, tokens)."""
    chunks: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, s in enumerate(steps):
        for rid, new, _computed in s["prefill"]:
            chunks[rid].append((i, new))
    return chunks


def prompts(steps: list[dict]) -> str:
    """How many chunks each prompt took and how many steps its prefill spanned (first chunk to last)."""
    chunks = chunks_by_prompt(steps)
    if not chunks:
        return "no prompt chunks in these steps"
    counts = [len(v) for v in chunks.values()]
    spans = [v[-1][0] - v[0][0] + 1 for v in chunks.values()]
    return (f"{len(chunks)} prompts: chunks per prompt mean {statistics.fmean(counts):.2f} (max {max(counts)}), "
            f"steps from first chunk to last mean {statistics.fmean(spans):.2f} (max {max(spans)})")


def prompt_table(steps: list[dict]) -> list[str]:
    """A row per prompt: its chunks, and the steps from its first chunk to its last (the part of its time to first
    token the engine saw, queueing before it not included): host time from the first step's schedule to the last
    step's launch, and on CUDA the device and GPU idle time of those steps (the first step's idle left out)."""
    lines = ["| request | prompt tokens | chunks | steps | host ms (schedule to last launch) | device ms | idle ms | "
             "launch ms |", "|---|---|---|---|---|---|---|---|"]
    for rid, where in chunks_by_prompt(steps).items():
        span = steps[where[0][0]:where[-1][0] + 1]
        host = span[-1]["t_ms"] + span[-1]["schedule_ms"] + span[-1]["launch_ms"] - span[0]["t_ms"]
        cuda = span[0]["device_ms"] is not None
        device = f"{sum(s['device_ms'] or 0 for s in span):.3f}" if cuda else ""
        idle = f"{sum(s['idle_ms'] or 0 for s in span[1:]):.3f}" if cuda else ""
        lines.append(f"| {rid} | {sum(n for _, n in where)} | {len(where)} | {len(span)} | {host:.3f} | {device} | "
                     f"{idle} | {sum(s['launch_ms'] for s in span):.3f} |")
    return lines


def summary(steps: list[dict], label: str) -> list[str]:
    """The totals (after `label`), the table per kind of step and the prompts' chunking."""
    return [f"{label}: {totals(steps)}", *kinds_table(steps), prompts(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="the JSON-lines file --step-trace wrote")
    parser.add_argument("--from-step", type=int, default=0, help="skip the steps before this one (warm-up)")
    parser.add_argument("--to-step", type=int, default=None, help="skip the steps after this one")
    parser.add_argument("--prompts", action="store_true",
                        help="also a row per prompt: its chunks and the time from its first chunk to its last")
    args = parser.parse_args()
    steps = load(args.trace, args.from_step, args.to_step)
    if not steps:
        raise SystemExit(f"{args.trace}: no steps between {args.from_step} and {args.to_step}")
    print("\n".join(summary(steps, f"trace {args.trace}")))
    if args.prompts:
        print("\n".join(prompt_table(steps)))


if __name__ == "__main__":
    main()
