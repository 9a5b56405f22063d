"""What a serving workload's figures can be at best on a card, from the model's bytes and FLOPs (no GPU needed).

PYTHONPATH=src:. python3 benchmarks/serving_floor.py --model 35B-A3B --copy-tbps 4.25 --matmul-tflops 797 \
    [--input-len 8192 --output-len 1024 --concurrency 1 16 64] [--step-ms 2.7 10.6 21.9 --prefill-ms 136] \
    [--mtp 3 --acceptance 3.39]

For random prompts of input-len tokens, each answered with output-len tokens, at a fixed concurrency c (the
`serve_load.py --preset published-8k1k` workload, one GPU, no MTP):

- a decode step reads the weights its c rows touch (MoE: the expected distinct experts under uniform routing, as
  bench_decode.py counts them), each row's GDN state (fp32, read and written) and its KV at the mean context
  (input-len + output-len / 2): its floor is those bytes at the copy bandwidth (bench_decode.py's "copy");
- a prompt's prefill does the model's FLOPs (bench_prefill.py's count): its floor is those at the matmul rate;
- while one request decodes its output-len - 1 tokens after the first, the c - 1 others each start once (steady
  state), and each start is a prefill step in which the running rows also get their token:
  TPOT = step + (c - 1) x (prefill - step) / (output-len - 1);
- requests in flight last TTFT + (output-len - 1) x TPOT, TTFT >= one prefill, so by Little's law
  total tok/s = c x (input-len + output-len) / (TTFT + (output-len - 1) x TPOT);
- with MTP (--mtp K --acceptance AL) a step verifies 1 + K tokens a row (the experts those touch) after K steps of
  the MTP head (its layer, the lm_head), and yields AL tokens: TPOT = step / AL + (c - 1) x (prefill - step) /
  (output-len - 1).

With measured parts (--step-ms, one per concurrency, e.g. bench_decode.py at the batch and context; --prefill-ms,
bench_prefill.py at input-len) the same model predicts the served cells, to check it against serve_load.py. The model
loads on the meta device: the shapes of benchmarks/common.py SHAPES, no weights.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_decode import weight_bytes_read
from benchmarks.bench_prefill import prefill_flops
from benchmarks.common import SHAPES, kv_bytes_per_token, model_config, state_bytes, table
from deltaserve.models.qwen3_5 import Qwen3_5ForCausalLM


def tpot(step_ms: float, prefill_ms: float, concurrency: int, output_len: int, tokens_per_step: float = 1.0) -> float:
    """Time per output token of one request: its steps of tokens_per_step tokens each, c - 1 of them replaced by
    prefill steps."""
    return step_ms / tokens_per_step + (concurrency - 1) * (prefill_ms - step_ms) / max(output_len - 1, 1)


def step_bytes(model, cfg, rows: int, context: float, drafts: int) -> float:
    """A decode step's bytes (drafts = 0), or an MTP step's: the verify of 1 + drafts tokens a row (the experts those
    tokens touch), then `drafts` steps of the MTP head (its layer at `rows` tokens, the lm_head, its one attention
    layer's KV). Each row's GDN state read and written once, its KV read once."""
    main = weight_bytes_read(model, cfg, rows * (1 + drafts), keep=lambda name: not name.startswith("mtp."))
    nbytes = main + rows * (2 * state_bytes(cfg) + context * kv_bytes_per_token(cfg))
    if drafts:
        head = weight_bytes_read(model, cfg, rows, keep=lambda name: name.startswith(("mtp.", "lm_head",
                                                                                      "model.embed_tokens")))
        nbytes += drafts * (head + rows * context * kv_bytes_per_token(cfg) / len(cfg.full_attention_layers))
    return nbytes


def total_tok_s(ttft_ms: float, tpot_ms: float, concurrency: int, input_len: int, output_len: int) -> float:
    """Little's law: c requests in flight, each of input_len + output_len tokens lasting TTFT + the rest."""
    return concurrency * (input_len + output_len) / ((ttft_ms + (output_len - 1) * tpot_ms) * 1e-3)


def floors(name: str, input_len: int, output_len: int, concurrency: list[int], copy_tbps: float,
           matmul_tflops: float, step_ms: list[float] | None = None, prefill_ms: float | None = None,
           drafts: int = 0, acceptance: float = 1.0) -> list[dict]:
    """One row per concurrency; drafts > 0: MTP steps of that many drafts, `acceptance` tokens a step on average."""
    cfg = model_config(name)
    model = Qwen3_5ForCausalLM(cfg, dtype=torch.bfloat16, device="meta", with_mtp=drafts > 0)  # shapes only
    prefill_floor = prefill_flops(model, cfg, input_len) / (matmul_tflops * 1e12) * 1e3
    context = input_len + output_len / 2
    rows = []
    for i, c in enumerate(concurrency):
        nbytes = step_bytes(model, cfg, c, context, drafts)
        step_floor = nbytes / (copy_tbps * 1e12) * 1e3
        best = tpot(step_floor, prefill_floor, c, output_len, acceptance)
        row = {"model": name, "MTP": f"K={drafts}, AL {acceptance:g}" if drafts else "no", "concurrency": c,
               "step GB": nbytes / 1e9, "step floor ms": step_floor, "prefill floor ms": prefill_floor,
               "TPOT floor ms": best, "tok/s ceiling": total_tok_s(prefill_floor, best, c, input_len, output_len)}
        if step_ms and prefill_ms:
            measured = tpot(step_ms[i], prefill_ms, c, output_len, acceptance)
            row.update({"step ms": step_ms[i], "prefill ms": prefill_ms, "TPOT from parts": measured,
                        "tok/s from parts": total_tok_s(prefill_ms, measured, c, input_len, output_len)})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=list(SHAPES))
    ap.add_argument("--copy-tbps", type=float, required=True, help="the card's copy bandwidth, TB/s (read + write)")
    ap.add_argument("--matmul-tflops", type=float, required=True, help="the card's bf16 matmul rate, TFLOP/s")
    ap.add_argument("--input-len", type=int, default=8192)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--step-ms", type=float, nargs="+", help="measured decode step per concurrency")
    ap.add_argument("--prefill-ms", type=float, help="measured prefill of one input-len prompt")
    ap.add_argument("--mtp", type=int, default=0, metavar="K", help="MTP steps of K drafts (with --acceptance)")
    ap.add_argument("--acceptance", type=float, default=1.0, metavar="AL", help="tokens an MTP step yields on average")
    args = ap.parse_args(argv)
    if args.mtp and not 1 <= args.acceptance <= args.mtp + 1:
        ap.error(f"--acceptance {args.acceptance}: an MTP step of {args.mtp} drafts yields 1 to {args.mtp + 1} tokens")
    if not args.mtp and args.acceptance != 1:
        ap.error("--acceptance needs --mtp K (without MTP a step yields one token)")
    if args.step_ms and len(args.step_ms) != len(args.concurrency):
        ap.error(f"--step-ms gives {len(args.step_ms)} times for {len(args.concurrency)} concurrencies: one each")
    if bool(args.step_ms) != (args.prefill_ms is not None):
        ap.error("--step-ms and --prefill-ms come together (the measured parts of the same model)")
    print(table(floors(args.model, args.input_len, args.output_len, args.concurrency, args.copy_tbps,
                       args.matmul_tflops, args.step_ms, args.prefill_ms, args.mtp, args.acceptance)))


if __name__ == "__main__":
    main()
