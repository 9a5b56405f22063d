"""Load generator for the OpenAI-compatible server: N concurrent streaming clients, fixed input/output lengths.

python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 64 --num-requests 256 \
    --input-len 1024 --output-len 256 [--endpoint completions|chat] [--api-key KEY] [--json-out run.json] \
    [--baseline other_run.json]

Each client sends its requests one after another (closed loop), so `concurrency` requests are in flight at all
times. Completions prompts are random token ids of exactly input-len tokens, drawn from [1000, 100000), or from
[min(1000, V / 2), V) when the server's vocabulary V is smaller (the demo model's is 4096); chat prompts are random
words, about input-len tokens. Every request asks for exactly output-len tokens (ignore_eos). Prints request and token
throughput and TTFT / inter-token latency / TPOT / end-to-end percentiles. With --baseline (a --json-out file of
another run, e.g. a peer server driven by this same script) it adds the ratio of each figure to that run's. Where
the server exports them on /metrics (deltaserve, and vLLM by its own names), the figures also hold how much its
preemption, MTP draft and prefix-cache counters rose over the timed requests, and the mean MTP acceptance length.
Needs only httpx (pip install -e '.[bench]').

Several --concurrency values make a sweep: one run per value, then one table of the P50s per concurrency. The
published workload (random 8,192 in / 1,024 out, concurrency 1, 16 and 64) is `--preset published-8k1k`; with
`--published 27B` (or 35B-A3B, either with `:fp8`) the table puts SGLang's published cells for that model and the
card beside ours, labelled as published, and `--plot sweep.png` draws total tok/s per GPU against time per output
token for both (matplotlib, in the `bench` extra):

python benchmarks/serve_load.py --preset published-8k1k --published 35B-A3B --plot sweep.png --json-out sweep.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PERCENTILES = (50, 90, 99)
DEFAULT_MAX_TOKEN_ID = 100000


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from send to the first text
    latency: float = 0.0  # seconds from send to [DONE]
    itl: list[float] = field(default_factory=list)  # gaps between chunks carrying text
    error: str = ""
    sent: float = 0.0  # time.perf_counter() when the request was sent


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
    start = time.perf_counter()
    result = RequestResult(ok=False, sent=start)
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


def make_payloads(args: argparse.Namespace, model: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(timed payloads, warm-up payloads). A prompt the server has seen would be a prefix-cache hit, so the warm-up
    prompts are drawn apart from the timed ones, and each run of a sweep (one per concurrency, on the same server)
    draws from its own seed."""
    rnd = random.Random(f"{args.seed}/{args.concurrency}")
    timed = [make_payload(args, model, rnd) for _ in range(args.num_requests)]
    return timed, [make_payload(args, model, rnd) for _ in range(args.warmup)]


def one_concurrency(value: Any) -> int:
    """The client count of one run, from what --concurrency takes: an integer >= 1, as a number, its text, or the
    one-value list parse_args makes of it (several values are a sweep: main() makes one run of each)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"concurrency {value!r}: run_load makes one run, so give one value (main() sweeps "
                             "several, one run_load each)")
        value = value[0]
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        count = int(value)  # text as argparse's type=int reads it
    except ValueError:
        raise ValueError(f"concurrency {value!r} is not an integer; give the number of clients, e.g. 16") from None
    if count < 1:
        raise ValueError(f"concurrency {value!r}: it must be >= 1 (the number of clients streaming at once)")
    return count


async def run_load(args: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    """One run: args as parse_args makes them (--num-requests left out: as main() picks it)."""
    results, duration, model, _ = await run_load_counted(args)
    return results, duration, model


async def run_load_counted(args: argparse.Namespace
                           ) -> tuple[list[RequestResult], float, str, dict[str, float]]:
    """run_load, and how much the server's counters (SERVER_COUNTERS) rose over the timed requests (the warm-up
    left out; empty when the server has no /metrics or none of them)."""
    concurrency = one_concurrency(args.concurrency)
    args = argparse.Namespace(**{**vars(args), "concurrency": concurrency})
    if args.num_requests is not None and (isinstance(args.num_requests, bool) or not isinstance(args.num_requests, int)
                                          or args.num_requests < 1):
        raise ValueError(f"num_requests {args.num_requests!r}: give an integer >= 1, or None for main()'s default")
    args.num_requests = requests_for(args, concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        payloads, warmup = make_payloads(args, model)
        for p in warmup:
            await one_request(client, path, {**p, "max_tokens": min(4, args.output_len)})
        queue: asyncio.Queue = asyncio.Queue()
        for p in payloads:
            queue.put_nowait(p)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, path, queue.get_nowait()))

        before = await read_counters(client)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        duration = time.perf_counter() - start
        after = await read_counters(client)
        return results, duration, model, {k: after[k] - before[k] for k in after if k in before}


# Server counters read from /metrics before and after a run, by vLLM's names (deltaserve exports them with deltaserve_
# for vllm:), summed over their label sets: what a run's figures alone do not show (memory-bound servers preempt).
SERVER_COUNTERS = {"server_preemptions": "num_preemptions_total",
                   "server_spec_drafts": "spec_decode_num_drafts_total",
                   "server_spec_accepted_tokens": "spec_decode_num_accepted_tokens_total",
                   "server_prefix_cache_hit_tokens": "prefix_cache_hits_total"}
_SAMPLE = re.compile(r"^(deltaserve_|vllm:)([a-zA-Z0-9_:]+)(\{[^}]*\})?\s+(\S+)")


def parse_counters(text: str) -> dict[str, float]:
    """SERVER_COUNTERS' values in a Prometheus text page (those it has)."""
    wanted = {name: key for key, name in SERVER_COUNTERS.items()}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(2) in wanted:
            key = wanted[m.group(2)]
            out[key] = out.get(key, 0.0) + float(m.group(4))
    return out


async def read_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's SERVER_COUNTERS now; none when it has no /metrics (an error or a page without them)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    return parse_counters(response.text) if response.status_code == 200 else {}


def timeline(results: list[RequestResult]) -> list[dict[str, float]]:
    """Each request in the order sent: when (ms after the run's first request), its TTFT and end-to-end latency, its
    output tokens and whether it succeeded; the JSON keeps them, so a percentile that falls between groups (e.g. a
    burst that queues, then arrivals one by one) can be read off the requests themselves."""
    t0 = min((r.sent for r in results), default=0.0)
    return [{"sent_ms": 1000 * (r.sent - t0), "ttft_ms": 1000 * r.ttft, "e2e_ms": 1000 * r.latency,
             "output_tokens": r.output_tokens, "ok": r.ok} for r in sorted(results, key=lambda r: r.sent)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float,
              server: dict[str, float] | None = None) -> dict[str, float]:
    """The run's figures; with `server` (run_load_counted's counter changes) those too, and the mean acceptance
    length of speculative decoding where it drafted (1 + accepted tokens / drafts, as vLLM computes it)."""
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
    server = server or {}
    stats.update(server)
    if server.get("server_spec_drafts"):
        accepted = server.get("server_spec_accepted_tokens", 0)
        stats["server_acceptance_length"] = 1 + accepted / server["server_spec_drafts"]
    return stats


# SGLang's published cells for the 8,192 / 1,024 random workload on one GPU (TP1), P50 TTFT ms, P50 TPOT ms, total
# tok/s per GPU, strategy: "LL" adds EAGLE/MTP drafting (3 steps, 4 draft tokens), "HT" has none. Source: SGLang's
# cookbook page for Qwen3.6 (the same qwen3_5 / qwen3_5_moe architecture), SGLang 0.5.16.
PUBLISHED: dict[tuple[str, str, str], dict[int, tuple[float, float, float, str]]] = {
    ("H200", "27B", "bf16"): {1: (734, 5.61, 1433, "LL"), 16: (1198, 17.28, 7083, "LL")},
    ("H200", "27B", "fp8"): {1: (487, 4.30, 1884, "LL"), 16: (734, 12.58, 9895, "LL")},
    ("H200", "35B-A3B", "bf16"): {1: (182, 2.23, 3751, "LL"), 16: (223, 8.13, 15394, "LL"),
                                  1024: (390479, 32.67, 21029, "HT"), 4096: (1738129, 32.93, 21090, "HT")},
    ("H200", "35B-A3B", "fp8"): {1: (138, 1.98, 4331, "LL"), 16: (189, 6.20, 20434, "LL"),
                                 1024: (263654, 27.90, 30201, "HT"), 4096: (1206050, 28.22, 30217, "HT")},
    ("H100", "27B", "bf16"): {1: (770, 7.41, 1082, "LL"), 16: (67026, 8.76, 1898, "LL")},
    ("H100", "27B", "fp8"): {1: (522, 5.27, 1562, "LL"), 16: (8322, 11.27, 7001, "LL")},
    ("H100", "35B-A3B", "bf16"): {1: (202, 2.48, 3367, "LL"), 16: (18670, 4.12, 6242, "LL")},
    ("H100", "35B-A3B", "fp8"): {1: (147, 2.21, 3982, "LL"), 16: (181, 7.17, 17730, "LL"),
                                 1024: (219864, 20.01, 20603, "HT")},
}
PRESETS = {"published-8k1k": dict(input_len=8192, output_len=1024, concurrency=[1, 16, 64])}
# requests per concurrency in a preset: SGLang's num_prompts where it publishes the cell (8 at 1, 64 at 16: with 4
# per client the burst of the first clients, which all queue behind one another's prefills, is a quarter of the TTFT
# samples, as in theirs), else 2 per client (8k prompts make each request long)
PRESET_REQUESTS = {1: 8, 16: 64}


def published_cells(card: str, spec: str | None) -> tuple[str, dict[int, tuple[float, float, float, str]]]:
    """(label, cells by concurrency) of PUBLISHED for `spec` ("27B", "35B-A3B:fp8", ...) on `card`; none if the
    card is neither an H100 nor an H200."""
    if not spec:
        return "", {}
    model, _, quant = spec.partition(":")
    gpu = next((g for g in ("H200", "H100") if g in card), None)
    cells = PUBLISHED.get((gpu or "", model, quant or "bf16"), {})
    return (f"SGLang 0.5.16 published, {gpu} {model} {quant or 'bf16'}" if cells else ""), cells


def sweep_table(runs: list[tuple[int, dict[str, float]]], num_gpus: int, label: str,
                cells: dict[int, tuple[float, float, float, str]]) -> str:
    """One row per concurrency: our P50s and total tok/s per GPU, then the published cell of that concurrency."""
    head = ["concurrency", "TTFT p50 ms", "TPOT p50 ms", "ITL p99 ms", "total tok/s/GPU", "failed"]
    preempt = any("server_preemptions" in st for _, st in runs)
    if preempt:
        head += ["preemptions"]
    if label:
        head += [f"{label}: TTFT / TPOT / tok/s"]
    rows = [" | ".join(head), " | ".join("---" for _ in head)]
    for conc, st in runs:
        row = [str(conc), f"{st['ttft_ms_p50']:.0f}", f"{st['tpot_ms_p50']:.2f}", f"{st['itl_ms_p99']:.1f}",
               f"{st['total_tok_s'] / num_gpus:,.0f}", f"{st['requests_failed']:.0f}"]
        if preempt:
            row.append(f"{st['server_preemptions']:.0f}" if "server_preemptions" in st else "-")
        if label:
            cell = cells.get(conc)
            row.append(f"{cell[0]:,.0f} / {cell[1]:.2f} / {cell[2]:,.0f} ({cell[3]})" if cell else "not published")
        rows.append(" | ".join(row))
    return "\n".join("| " + r + " |" for r in rows)


def plot_sweep(path: str, lines: list[tuple[str, list[tuple[int, dict[str, float]]]]], num_gpus: int, label: str,
               cells: dict[int, tuple[float, float, float, str]], title: str) -> None:
    """Total tok/s per GPU against P50 time per output token: each (name, runs) of ours as a line (several: e.g. with
    and without MTP, from saved --json-out files), the published cells as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in lines:
        xs = [st["tpot_ms_p50"] for _, st in runs]
        ys = [st["total_tok_s"] / num_gpus for _, st in runs]
        ax.plot(xs, ys, "o-", label=name)
        for (conc, _), x, y in zip(runs, xs, ys):
            ax.annotate(f"c={conc}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if cells:
        for conc, (_, tpot, tok_s, strategy) in sorted(cells.items()):
            ax.plot([tpot], [tok_s], "s", color="tab:red")
            ax.annotate(f"c={conc} {strategy}", (tpot, tok_s), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="tab:red")
        ax.plot([], [], "s", color="tab:red", label=label)
    ax.set_xlabel("time per output token, P50 (ms)")
    ax.set_ylabel("total tokens/s per GPU")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a published workload's lengths and concurrencies (explicit flags override it)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="clients streaming at once; several values: a sweep (default 64)")
    p.add_argument("--num-requests", type=int, default=None, help="default: 4 x concurrency (a preset: its own counts, e.g. "
                                                                          "8 / 64 / 128 at 1 / 16 / 64)")
    p.add_argument("--input-len", type=int, default=None, help="default 1024")
    p.add_argument("--output-len", type=int, default=None, help="default 256")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--min-token-id", type=int, default=None,
                   help="random prompt ids are drawn from [min, max) (default 1000, or half of max when max is "
                        "smaller)")
    p.add_argument("--max-token-id", type=int, default=None,
                   help="default: 100000, or the server's vocabulary size when that is smaller (asked of its "
                        "/v1/detokenize route)")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent before timing starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request seconds")
    p.add_argument("--card", default=None, help="the server's accelerator, if nvidia-smi cannot see it from here")
    p.add_argument("--json-out", default=None, help="write the figures (and the settings) to this file")
    p.add_argument("--baseline", default=None, help="a --json-out file to print ratios against (one concurrency)")
    p.add_argument("--published", default=None, metavar="MODEL[:fp8]",
                   help="put SGLang's published cells for this model (27B, 35B-A3B) and card beside the sweep")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs the server uses (the per-GPU throughput)")
    p.add_argument("--plot", default=None, help="draw tok/s per GPU against TPOT to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    defaults = dict(input_len=1024, output_len=256, concurrency=[64])
    for key, value in {**defaults, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.published and args.published.partition(":")[0] not in {m for _, m, _ in PUBLISHED}:
        p.error(f"--published {args.published!r}: published cells exist for "
                f"{sorted({m for _, m, _ in PUBLISHED})}, optionally with ':fp8'")
    if args.baseline and len(args.concurrency) > 1:
        p.error("--baseline compares one run: give a single --concurrency")
    if min(args.concurrency) < 1 or (args.num_requests is not None and args.num_requests < 1) or \
            args.input_len < 1 or args.output_len < 1 or args.num_gpus < 1:
        p.error("--concurrency, --num-requests, --input-len, --output-len and --num-gpus must be >= 1")
    # main() lowers the defaults to a smaller vocabulary; these record which of the two were defaults
    args.default_token_ids = (args.min_token_id is None, args.max_token_id is None)
    args.max_token_id = DEFAULT_MAX_TOKEN_ID if args.max_token_id is None else args.max_token_id
    if args.min_token_id is None:
        args.min_token_id = min(1000, args.max_token_id // 2)
    if args.min_token_id >= args.max_token_id:
        p.error("--min-token-id must be below --max-token-id (use the model's vocabulary range)")
    return args


def vocab_size(url: str, headers: dict[str, str], cap: int) -> int | None:
    """The server's vocabulary size if below cap, else cap; None if it has no /v1/detokenize (a peer server). The
    route refuses an id outside the vocabulary with a 400, so a bisection over one-id requests finds the size."""
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        def known(token_id: int) -> bool:
            return client.post("/v1/detokenize", json={"tokens": [token_id]}).status_code == 200

        try:
            if not known(0):
                return None
            if known(cap - 1):
                return cap
            lo, hi = 0, cap - 1  # known(lo), not known(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if known(mid) else (lo, mid)
            return hi
        except httpx.HTTPError:
            return None


def fit_token_ids(args: argparse.Namespace) -> None:
    """Random completions prompts must stay inside the served vocabulary (a small model's is far below 100000, and
    every request failed with a 400): lower the default range to it."""
    default_min, default_max = args.default_token_ids
    if not default_max or args.endpoint != "completions":
        return
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    vocab = vocab_size(args.url, headers, args.max_token_id)
    if vocab is None or vocab >= args.max_token_id:
        return
    args.max_token_id = vocab
    if default_min:
        args.min_token_id = min(1000, vocab // 2)
    elif args.min_token_id >= vocab:
        sys.exit(f"--min-token-id {args.min_token_id} is not below the server's vocabulary size {vocab}: "
                 f"pass a smaller --min-token-id")
    print(f"prompt token ids drawn from [{args.min_token_id}, {vocab}): the server's vocabulary is {vocab} tokens")


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    """--num-requests, else 4 per client (in a preset: PRESET_REQUESTS, else 2 per client)."""
    if args.num_requests:
        return args.num_requests
    return PRESET_REQUESTS.get(concurrency, max(2, 2 * concurrency)) if args.preset else 4 * concurrency


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """One run per --concurrency value; returns their figures in that order."""
    args = parse_args(argv)
    fit_token_ids(args)
    try:
        version = httpx.get(args.url + "/version", timeout=10).json().get("version", "?")
    except (httpx.HTTPError, ValueError):
        version = "?"
    baseline = json.loads(open(args.baseline).read())["stats"] if args.baseline else None
    runs: list[tuple[int, dict[str, float]]] = []
    timelines: list[list[dict[str, float]]] = []
    for concurrency in args.concurrency:
        one = argparse.Namespace(**{**vars(args), "concurrency": concurrency,
                                    "num_requests": requests_for(args, concurrency)})
        results, duration, model, server = asyncio.run(run_load_counted(one))
        stats = summarize(results, duration, server)
        runs.append((concurrency, stats))
        timelines.append(timeline(results))
        print(report(one, stats, model, version, baseline), flush=True)
        failures = [r.error for r in results if not r.ok]
        if failures:
            print(f"\n{len(failures)} request(s) failed; first: {failures[0]}", file=sys.stderr)
        print()
    card = card_name(args.card)
    label, cells = published_cells(card, args.published)
    if args.published and not cells:
        print(f"no published cells for {args.published} on {card}", file=sys.stderr)
    if len(runs) > 1 or label:
        print(f"sweep: {model} | {card} | input {args.input_len} | output {args.output_len}")
        print(sweep_table(runs, args.num_gpus, label, cells))
    if args.plot:
        plot_sweep(args.plot, [("deltaserve (measured)", runs)], args.num_gpus, label, cells,
                   f"{model} on {card}: random {args.input_len} in / {args.output_len} out")
    if args.json_out:
        with open(args.json_out, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k != "api_key"}
            record = {"settings": settings, "model": model, "card": card, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "stats": runs[-1][1],
                      "runs": [{"concurrency": c, "stats": st, "requests": t} for (c, st), t in zip(runs, timelines)]}
            json.dump(record, f, indent=2)
    return [st for _, st in runs]


if __name__ == "__main__":
    main()
