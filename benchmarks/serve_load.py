"""Load generator for the OpenAI-compatible server: N concurrent streaming clients, fixed input/output lengths.

python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 64 --num-requests 256 \
    --input-len 1024 --output-len 256 [--endpoint completions|chat] [--api-key KEY] [--json-out run.json] \
    [--baseline other_run.json]

Each client sends its requests one after another (closed loop), so `concurrency` requests are in flight at all
times. Completions prompts are random token ids of exactly input-len tokens (chat prompts are random words, about
input-len tokens); every request asks for exactly output-len tokens (ignore_eos). Prints request and token
throughput and TTFT / inter-token latency / TPOT / end-to-end percentiles. With --baseline (a --json-out file of
another run, e.g. a peer server driven by this same script) it adds the ratio of each figure to that run's.
Needs only httpx (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from send to the first text
    latency: float = 0.0  # seconds from send to [DONE]
    itl: list[float] = field(default_factory=list)  # gaps between chunks carrying text
    error: str = ""


def make_payload(args: argparse.Namespace, model: str, rnd: random.Random) -> dict[str, Any]:
    common = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "ignore_eos": True,
              "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        words = " ".join(rnd.choice(_WORDS) for _ in range(max(1, args.input_len)))
        return {**common, "messages": [{"role": "user", "content": words}]}
    return {**common, "prompt": [rnd.randrange(args.min_token_id, args.max_token_id) for _ in range(args.input_len)]}


_WORDS = ["alpha", "river", "stone", "cloud", "seven", "north", "quiet", "lamp", "orbit", "maple", "ember", "delta"]


def _chunk_text(event: dict[str, Any]) -> str:
    text = ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta")
        if delta is None:
            text += choice.get("text") or ""
        else:
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            if delta.get("tool_calls"):
                text += "\0"  # a tool-call piece counts as output arriving
    return text


async def one_request(client: httpx.AsyncClient, path: str, payload: dict[str, Any]) -> RequestResult:
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=payload) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if _chunk_text(event):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = last is not None
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(args: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        rnd = random.Random(args.seed)
        payloads = [make_payload(args, model, rnd) for _ in range(args.num_requests)]
        for p in payloads[:args.warmup]:
            await one_request(client, path, {**p, "max_tokens": min(4, args.output_len)})
        queue: asyncio.Queue = asyncio.Queue()
        for p in payloads:
            queue.put_nowait(p)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, path, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return results, time.perf_counter() - start, model


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    stats: dict[str, float] = {
        "requests_ok": len(ok), "requests_failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "input_tok_s": in_tokens / duration,
        "output_tok_s": out_tokens / duration, "total_tok_s": (in_tokens + out_tokens) / duration}
    for name, values in (("ttft_ms", [r.ttft for r in ok]), ("itl_ms", [x for r in ok for x in r.itl]),
                         ("tpot_ms", tpot), ("e2e_ms", [r.latency for r in ok])):
        stats[f"{name}_mean"] = 1000 * sum(values) / len(values) if values else float("nan")
        for q in PERCENTILES:
            stats[f"{name}_p{q}"] = 1000 * percentile(values, q)
    return stats


def card_name(override: str | None) -> str:
    if override:
        return override
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip().splitlines()
            return f"{out[0]} x{len(out)}" if out else "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (no nvidia-smi here; pass --card)"


def report(args: argparse.Namespace, stats: dict[str, float], model: str, server_version: str,
           baseline: dict[str, float] | None) -> str:
    lines = [f"card: {card_name(args.card)} | deltaserve server {server_version} | httpx {httpx.__version__} | "
             f"python {platform.python_version()}",
             f"command: {' '.join(sys.argv)}",
             f"model: {model} | endpoint: {args.endpoint} | concurrency {args.concurrency} | "
             f"{args.num_requests} requests | input {args.input_len} | output {args.output_len} tokens", ""]
    width = max(len(k) for k in stats)
    head = f"{'metric':<{width}} | {'value':>12}" + (f" | {'baseline':>12} | {'ratio':>7}" if baseline else "")
    lines += [head, "-" * len(head)]
    for key, value in stats.items():
        row = f"{key:<{width}} | {value:>12.2f}"
        if baseline and key in baseline:
            base = baseline[key]
            ratio = value / base if base else float("nan")
            row += f" | {base:>12.2f} | {ratio:>7.3f}"
        lines.append(row)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--concurrency", type=int, default=64, help="clients streaming at once")
    p.add_argument("--num-requests", type=int, default=None, help="default: 4 x concurrency")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--min-token-id", type=int, default=1000, help="random prompt ids are drawn from [min, max)")
    p.add_argument("--max-token-id", type=int, default=100000)
    p.add_argument("--warmup", type=int, default=2, help="short requests sent before timing starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request seconds")
    p.add_argument("--card", default=None, help="the server's accelerator, if nvidia-smi cannot see it from here")
    p.add_argument("--json-out", default=None, help="write the figures (and the settings) to this file")
    p.add_argument("--baseline", default=None, help="a --json-out file to print ratios against")
    args = p.parse_args(argv)
    args.num_requests = args.num_requests or 4 * args.concurrency
    if args.concurrency < 1 or args.num_requests < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--concurrency, --num-requests, --input-len and --output-len must be >= 1")
    if args.min_token_id >= args.max_token_id:
        p.error("--min-token-id must be below --max-token-id (use the model's vocabulary range)")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    results, duration, model = asyncio.run(run_load(args))
    stats = summarize(results, duration)
    try:
        version = httpx.get(args.url + "/version", timeout=10).json().get("version", "?")
    except (httpx.HTTPError, ValueError):
        version = "?"
    baseline = json.loads(open(args.baseline).read())["stats"] if args.baseline else None
    print(report(args, stats, model, version, baseline))
    failures = [r.error for r in results if not r.ok]
    if failures:
        print(f"\n{len(failures)} request(s) failed; first: {failures[0]}", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "api_key"}, "model": model,
                       "stats": stats, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
    return stats


if __name__ == "__main__":
    main()
