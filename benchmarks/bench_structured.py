"""Per-step cost of structured outputs: a decode step at batch 64 with half the rows constrained by a typical JSON
schema, against the same step unconstrained.

    PYTHONPATH=src:. python benchmarks/bench_structured.py                                  # CPU, tiny shape
    PYTHONPATH=src:. python benchmarks/bench_structured.py --vocab 248320                   # CPU, Qwen's vocabulary
    PYTHONPATH=src:. python benchmarks/bench_structured.py --device cuda --shape 9B         # GPU, 9B shape

One step is what the engine does for a constrained step: the model's decode (CUDA graph replay on the GPU, eager
on CPU; dummy weights), then the mask of the constrained rows filled on the host from their matchers (on the GPU
while the model runs, as the engine does: the sampling is queued after the fill), uploaded and applied, the sampler
over all 64 rows, the tokens read back, and the matchers advanced. The constrained rows replay a valid document
(tokenized as a model writes it) at staggered positions, so the masks are those of a real output. Printed: the
step with and without constraints (alternating, medians), the overhead, and its parts (host fill, mask upload +
apply). `--vocab` gives the CPU's tiny shape a real vocabulary size: the mask's cost grows with it.
The 9B shape needs the 248k-token vocabulary: `--tokenizer DIR` takes a checkpoint's, else a synthetic BPE of that
size is trained once (benchmarks/grammar_tokenizer.py).
"""

from __future__ import annotations

import argparse
import json
import time
from statistics import median

import torch

from benchmarks.common import SHAPES, header, positive_int, table

SCHEMA = {  # a typical extraction schema: nested object, enum, bounded numbers, an array of objects
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                     "required": ["name", "vip"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                             "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}}},
    "required": ["id", "status", "customer", "items"], "additionalProperties": False}
DOCUMENT = {"id": 4821, "status": "shipped", "customer": {"name": "Ada Lovelace", "vip": True},
            "items": [{"sku": "ABC-12", "qty": 2, "price": 19.99}, {"sku": "XYZ-07", "qty": 1, "price": 250}]}


def tokenizer_for(vocab: int, path: str | None):
    if path or vocab > 100_000:
        from benchmarks.grammar_tokenizer import load_tokenizer

        return load_tokenizer(path)
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from deltaserve.demo import write_byte_tokenizer

    d = Path(tempfile.mkdtemp())
    write_byte_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


class Model:
    """A decode step of `batch` rows at `context` tokens each: graph replay on CUDA, eager on CPU."""

    def __init__(self, shape: str, batch: int, context: int, device: str, vocab: int) -> None:
        from deltaserve.config import ModelConfig

        self.device = device
        self.cfg = ModelConfig.from_dict({**SHAPES[shape], "vocab_size": vocab})
        if device == "cuda":
            if vocab != SHAPES[shape]["vocab_size"]:
                raise SystemExit("--vocab applies to the CPU run; on CUDA pick a --shape")
            from benchmarks.bench_decode import setup_decode

            _, self.model, self.cache, self.fb, self.ids, self.graphs = setup_decode(shape, batch, context)
            return
        from deltaserve.cache.tensors import CacheShape, ModelCache
        from deltaserve.engine.device_inputs import build_forward_batch
        from deltaserve.models.loader import load_model

        self.model = load_model(self.cfg, load_format="dummy", device="cpu", dtype=torch.float32, with_mtp=False)
        pages = -(-(context + 1) // 16)
        self.cache = ModelCache(self.cfg, CacheShape(num_pages=batch * pages, page_size=16, num_slots=batch,
                                                     kv_dtype=torch.float32, conv_dtype=torch.float32), device="cpu")
        tables = [list(range(s * pages, (s + 1) * pages)) for s in range(batch)]
        self.fb = build_forward_batch(query_lens=[1] * batch, context_lens=[context] * batch,
                                      state_slots=list(range(batch)), block_tables=tables, page_size=16, device="cpu")
        self.ids = torch.randint(0, self.cfg.vocab_size, (batch,))

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        if self.device == "cuda":
            return self.graphs.run(self.ids, self.fb)[1]
        return self.model.compute_logits(self.model(self.ids, self.fb, self.cache), upcast=False)


class Rows:
    """The constrained rows: matchers replaying DOCUMENT at staggered positions, as SamplingRequests."""

    def __init__(self, tokenizer, vocab: int, eos: list[int], n: int, batch: int) -> None:
        from deltaserve.sampling_params import SamplingParams
        from deltaserve.structured import StructuredSpec
        from deltaserve.structured.compiler import GrammarCompiler
        from deltaserve.structured.matchers import StructuredOutputs

        self.spec = StructuredSpec.json_schema(SCHEMA)
        self.structured = StructuredOutputs(GrammarCompiler(tokenizer, vocab, eos))
        t0 = time.perf_counter()
        self.structured.compiler.ll_tokenizer
        self.tokenizer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.structured.compiler.compile(self.spec)
        self.compile_ms = (time.perf_counter() - t0) * 1e3
        self.doc = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
        self.n, self.batch = n, batch
        self.params = [SamplingParams(temperature=1.0, structured=self.spec if i < n else None) for i in range(batch)]
        self.pos = [0] * n
        for i in range(n):
            self._restart(i)
            for _ in range(i * (len(self.doc) - 1) // n):
                self.advance(i)

    def _restart(self, i: int) -> None:
        self.structured.remove([str(i)])
        self.structured.add([str(i)], self.spec)
        self.pos[i] = 0

    def advance(self, i: int) -> None:
        if self.pos[i] == len(self.doc):
            self._restart(i)
            return
        assert self.structured.advance(str(i), [self.doc[self.pos[i]]]) is None
        self.pos[i] += 1

    def sampling(self):
        from deltaserve.engine.step_input import SamplingRequest

        return [SamplingRequest(str(i), p, self.pos[i] if i < self.n else 0) for i, p in enumerate(self.params)]


def step(model: Model, rows: Rows, sampler, sampling_rows, constrained: bool) -> tuple[float, float]:
    """One step; (its time, the host fill's time)."""
    from deltaserve.engine.runner import grammar_to_device

    t0 = time.perf_counter()
    logits = model.logits()  # queued on the GPU: the fill below overlaps it
    mask, fill = None, 0.0
    if constrained:
        f0 = time.perf_counter()
        mask = rows.structured.fill(rows.sampling())
        fill = time.perf_counter() - f0
    sampler(logits, sampling_rows, grammar_to_device(mask, torch.device(model.device))).token_ids.tolist()
    if constrained:
        for i in range(rows.n):
            rows.advance(i)
    return time.perf_counter() - t0, fill


def run(model: Model, rows: Rows, steps: int) -> dict[str, float]:
    """Unconstrained and constrained steps alternating (so that load changes hit both alike); medians in ms."""
    from deltaserve.engine.sampler import Sampler, SamplingRow
    from deltaserve.sampling_params import SamplingParams

    sampler = Sampler()
    plain_rows = [SamplingRow(SamplingParams(temperature=1.0)) for _ in rows.params]
    masked_rows = [SamplingRow(p) for p in rows.params]
    plain, masked, fills = [], [], []
    for i in range(steps + 3):
        t_plain, _ = step(model, rows, sampler, plain_rows, False)
        t_masked, fill = step(model, rows, sampler, masked_rows, True)
        if i >= 3:
            plain.append(t_plain)
            masked.append(t_masked)
            fills.append(fill)
    return {"plain": median(plain) * 1e3, "masked": median(masked) * 1e3, "fill": median(fills) * 1e3}


def apply_cost(model: Model, rows: Rows, reps: int = 50) -> float:
    """Upload + apply of the mask alone (device time included), ms."""
    from deltaserve.engine.runner import grammar_to_device
    from deltaserve.engine.sampler import apply_grammar

    logits = model.logits().float()
    mask = rows.structured.fill(rows.sampling())
    sync = torch.cuda.synchronize if model.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        apply_grammar(logits, grammar_to_device(mask, torch.device(model.device)), copy=False)
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="default: tiny on cpu, 9B on cuda")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--constrained", type=int, default=32)
    p.add_argument("--context", type=positive_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=60)
    p.add_argument("--tokenizer", help="checkpoint directory whose tokenizer to use (default: see above)")
    p.add_argument("--vocab", type=int, help="vocabulary size of the model (default: the shape's)")
    args = p.parse_args()
    if not 0 <= args.constrained <= args.batch:
        p.error(f"--constrained {args.constrained}: give 0 to --batch ({args.batch}) rows")
    shape = args.shape or ("9B" if args.device == "cuda" else "tiny")
    print(header(""))
    vocab = args.vocab or SHAPES[shape]["vocab_size"]
    tokenizer = tokenizer_for(vocab, args.tokenizer)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = Model(shape, args.batch, args.context, args.device, vocab)
    rows = Rows(tokenizer, vocab, eos, args.constrained, args.batch)
    print(f"shape {shape} (vocab {vocab}), tokenizer {len(tokenizer)} tokens; batch {args.batch}, "
          f"{args.constrained} rows constrained, document {len(rows.doc)} tokens; llguidance tokenizer "
          f"{rows.tokenizer_s:.2f} s, schema compile {rows.compile_ms:.1f} ms", flush=True)
    r = run(model, rows, args.steps)
    print(table([{"step": "unconstrained", "ms": r["plain"], "host fill ms": 0.0, "overhead %": 0.0},
                 {"step": f"{args.constrained}/{args.batch} constrained", "ms": r["masked"], "host fill ms": r["fill"],
                  "overhead %": 100 * (r["masked"] - r["plain"]) / r["plain"]}]))
    print(f"mask upload + apply alone: {apply_cost(model, rows):.3f} ms")


if __name__ == "__main__":
    main()
