"""What the cache compression options cost in accuracy, measured on your model and text, not assumed.

Against the baseline (KV pages in the model dtype, fp32 GDN state) on the same inputs, every combination of
--kv-cache-dtype and --state-dtype gets:
  - KL(baseline || option) of the next-token distributions, mean and max over every scored position: S held-out
    segments, each a prompt of P tokens (prefilled) followed by L tokens fed one decode step at a time, so every
    position reads quantized KV pages and a state stored in the option's dtype, as generation does;
  - perplexity of those S x L held-out tokens (and its change against the baseline);
  - greedy agreement over N generated tokens from each prompt: how many of the S continuations are identical to the
    baseline's, and the mean share of the N tokens before the first difference.
One model is loaded; each option gets its own caches and all of them step in lockstep on the same inputs.

    PYTHONPATH=src:. python3 benchmarks/bench_accuracy.py                  # the bundled demo model on CPU
    PYTHONPATH=src:. python3 benchmarks/bench_accuracy.py /path/to/Qwen3.5-27B --text heldout.txt --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import header
from deltaserve.cache.tensors import ModelCache, kv_bytes_per_page, kv_page_dtype, state_bytes_per_slot
from deltaserve.config import EngineArgs, EngineConfig
from deltaserve.config.engine import KV_CACHE_DTYPES, STATE_DTYPES
from deltaserve.engine.device_inputs import build_forward_batch
from deltaserve.engine.memory import new_cache
from deltaserve.engine.runner import resolve_device
from deltaserve.engine.tokenizer import load_tokenizer
from deltaserve.models.loader import load_model

BASELINE = ("auto", "float32")


@dataclass
class Option:
    """One (kv_cache_dtype, state_dtype) combination: its caches and what has been measured for it."""

    kv: str
    state: str
    cache: ModelCache
    model: object = None  # its own model (another weight / activation format); None: the run's
    fp8_activations: str = "off"
    kl_sum: float = 0.0
    kl_max: float = 0.0
    nll_sum: float = 0.0
    scored: int = 0
    greedy: list[list[int]] = field(default_factory=list)


class Lockstep:
    """Runs S sequences (slot s, pages [s * pps, (s + 1) * pps)) through the model on each option's caches."""

    def __init__(self, model, config: EngineConfig, options: list[tuple[str, str]], num_seqs: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.page_size, self.device = model, config.cache.page_size, device
        self.pps = -(-max_len // self.page_size)
        self.tables = [list(range(s * self.pps, (s + 1) * self.pps)) for s in range(num_seqs)]
        self.options = [Option(kv, st, new_cache(_with_cache(config, kv, st), num_pages=num_seqs * self.pps,
                                                 num_slots=num_seqs, dtype=dtype, device=device))
                        for kv, st in options]
        self.context = 0

    @torch.no_grad()
    def step(self, tokens: list[torch.Tensor], *, prefill: bool = False) -> list[torch.Tensor]:
        """tokens[i]: [S, q] new tokens of every sequence for option i -> next-token log-probs [S, V] (fp32) each.
        prefill: the tokens start at position 0 (fresh state), else they follow the sequences' context. Told, not
        guessed from q: a one-token prompt is a prefill too."""
        S, q = tokens[0].shape
        context = 0 if prefill else self.context
        batch = build_forward_batch(query_lens=[q] * S, context_lens=[context] * S, state_slots=list(range(S)),
                                    block_tables=self.tables, page_size=self.page_size, device=self.device)
        out = []
        for opt, ids in zip(self.options, tokens):
            model = opt.model or self.model
            hidden = model(ids.reshape(-1).to(self.device), batch, opt.cache)
            out.append(torch.log_softmax(model.compute_logits(hidden[batch.logits_indices]), dim=-1))
        self.context = context + q
        return out


def _with_cache(config: EngineConfig, kv: str, state: str) -> EngineConfig:
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache, kv_cache_dtype=kv, state_dtype=state))


def teacher_forced(run: Lockstep, segments: torch.Tensor, prompt_len: int) -> None:
    """Prefill the prompts, then feed the held-out tokens one decode step at a time; accumulate KL against the
    baseline (option 0) and the NLL of each true next token."""
    n = len(run.options)
    logp = run.step([segments[:, :prompt_len]] * n, prefill=True)
    for t in range(prompt_len, segments.shape[1]):
        target = segments[:, t].to(run.device)
        base = logp[0]
        for opt, lp in zip(run.options, logp):
            kl = (base.exp() * (base - lp)).sum(-1).clamp(min=0)  # tiny negatives are rounding
            opt.kl_sum += kl.sum().item()
            opt.kl_max = max(opt.kl_max, kl.max().item())
            opt.nll_sum -= lp.gather(1, target[:, None]).sum().item()
            opt.scored += target.numel()
        if t + 1 < segments.shape[1]:
            logp = run.step([segments[:, t:t + 1]] * n)


def greedy(run: Lockstep, prompts: torch.Tensor, num_tokens: int) -> None:
    """N greedy tokens from each prompt, each option following its own choices."""
    logp = run.step([prompts] * len(run.options), prefill=True)
    for opt in run.options:
        opt.greedy = [[] for _ in range(prompts.shape[0])]
    for t in range(num_tokens):
        picks = [lp.argmax(-1).cpu() for lp in logp]
        for opt, pick in zip(run.options, picks):
            for row, tok in zip(opt.greedy, pick.tolist()):
                row.append(tok)
        if t + 1 < num_tokens:
            logp = run.step([p[:, None] for p in picks])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report(run: Lockstep, config: EngineConfig, dtype: torch.dtype, gen_len: int) -> list[dict]:
    shapes, model = config.rank_shapes(), config.model
    base = run.options[0]
    base_ppl = math.exp(base.nll_sum / base.scored)
    rows = []
    for opt in run.options:
        page_dtype = kv_page_dtype(opt.kv, dtype)
        kv_tok = kv_bytes_per_page(shapes, 1, page_dtype, num_layers=len(model.full_attention_layers))
        state = state_bytes_per_slot(shapes, len(model.linear_attention_layers), dtype, getattr(torch, opt.state))
        ppl = math.exp(opt.nll_sum / opt.scored)
        prefix = [common_prefix(a, b) / gen_len for a, b in zip(opt.greedy, base.greedy)]
        rows.append({
            "kv_cache_dtype": opt.kv if opt.kv != "auto" else f"auto ({str(dtype).removeprefix('torch.')})",
            "state_dtype": opt.state, **({"fp8_activations": opt.fp8_activations} if config.quantization else {}),
            "KV B/token": kv_tok, "state MiB/seq": state / 2**20,
            "mean KL": opt.kl_sum / opt.scored, "max KL": opt.kl_max,
            "greedy identical": f"{sum(p == 1.0 for p in prefix)}/{len(prefix)}",
            "greedy prefix": f"{sum(prefix) / len(prefix):.1%}",
            "PPL": ppl, "PPL change": f"{ppl / base_ppl - 1:+.2%}",
        })
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


def held_out_tokens(model_dir: Path, text: Path | None, needed: int) -> torch.Tensor:
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SystemExit(f"{model_dir} has no tokenizer.json: the accuracy report needs the checkpoint's tokenizer")
    path = text or model_dir / "heldout.txt"
    if not path.is_file():
        raise SystemExit(f"no held-out text at {path}: pass --text FILE (plain text the model was not trained on)")
    ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
    if len(ids) < needed:
        raise SystemExit(f"{path} has {len(ids)} tokens, {needed} are needed (--num-seqs x (--prompt-len + "
                         "--score-len)); pass a longer --text or smaller sizes")
    return torch.tensor(ids[:needed], dtype=torch.long)


def _w8a8_option(run: Lockstep, config: EngineConfig, args: argparse.Namespace, device: torch.device) -> Option:
    """The same checkpoint with dynamic FP8 activations, on baseline-dtype caches of its own."""
    quant = dataclasses.replace(config.quantization, fp8_activations="dynamic") if config.quantization else None
    if quant is None:
        raise SystemExit("--fp8-activations needs an FP8 checkpoint (`deltaserve quantize MODEL OUT --method fp8`)")
    model = load_model(config.model, dtype=args.dtype, device=device, shapes=config.rank_shapes(), quantization=quant)
    base = run.options[0]
    cache = new_cache(config, num_pages=base.cache.shape.num_pages, num_slots=base.cache.shape.num_slots,
                      dtype=model.model.embed_tokens.weight.dtype, device=device)
    return Option(*BASELINE, cache, model=model, fp8_activations="dynamic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the bundled demo model)")
    ap.add_argument("--text", type=Path, help="held-out text (default: the model directory's heldout.txt)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when a GPU is visible)")
    ap.add_argument("--dtype", help="model dtype (default: the checkpoint's)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=list(KV_CACHE_DTYPES), choices=KV_CACHE_DTYPES)
    ap.add_argument("--state-dtypes", nargs="+", default=list(STATE_DTYPES), choices=STATE_DTYPES)
    ap.add_argument("--num-seqs", type=int, default=16, help="S: held-out segments (and greedy prompts)")
    ap.add_argument("--prompt-len", type=int, default=256, help="P: prefilled tokens per segment")
    ap.add_argument("--score-len", type=int, default=128, help="L: decode-scored tokens per segment")
    ap.add_argument("--gen-len", type=int, default=64, help="N: greedy tokens per prompt")
    ap.add_argument("--fp8-activations", action="store_true",
                    help="an FP8 checkpoint: also the model with --fp8-activations dynamic (W8A8), default caches")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args(argv)
    for name in ("num_seqs", "prompt_len", "score_len", "gen_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.model is None:
        from deltaserve.demo import demo_model_dir

        args.model = str(demo_model_dir())
    device = resolve_device(args.device)
    max_len = max(args.prompt_len + args.score_len, args.prompt_len + args.gen_len)
    config = EngineArgs(model=args.model, device=device.type, dtype=args.dtype, max_model_len=max_len,
                        max_num_seqs=args.num_seqs).create_engine_config()
    segments = held_out_tokens(Path(args.model), args.text, args.num_seqs * (args.prompt_len + args.score_len))
    segments = segments.view(args.num_seqs, -1)
    model = load_model(config.model, dtype=args.dtype, device=device, shapes=config.rank_shapes())
    dtype = model.model.embed_tokens.weight.dtype
    options = [BASELINE] + [o for o in itertools.product(args.kv_cache_dtypes, args.state_dtypes) if o != BASELINE]
    start = time.time()
    run = Lockstep(model, config, options, args.num_seqs, max_len, device, dtype)
    if args.fp8_activations:
        run.options.append(_w8a8_option(run, config, args, device))
    teacher_forced(run, segments, args.prompt_len)
    greedy(run, segments[:, :args.prompt_len], args.gen_len)
    rows = report(run, config, dtype, args.gen_len)
    print(header(""))
    print(f"model {args.model} ({str(dtype).removeprefix('torch.')}, {device}); S={args.num_seqs} segments, "
          f"P={args.prompt_len} prompt + L={args.score_len} scored tokens each, N={args.gen_len} greedy tokens; "
          f"{time.time() - start:.0f} s")
    print(markdown(rows))
    if args.out:
        args.out.write_text(markdown(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
