"""xgrammar against llguidance on the work deltaserve gives them: per-row mask time, compile time, and whether every
output they allow validates against its schema (random walks under each library's mask, checked with jsonschema).

PYTHONPATH=src:. python benchmarks/compare_grammar_libraries.py [--tokenizer DIR] [--walks 40] [--max-steps 200]

Needs both libraries (`pip install xgrammar llguidance jsonschema`). Two measurements per library and schema:
- replay: a valid document, tokenized as a model would write it, fed token by token; the mask time of each step
  (what a model's output costs), and a batch of 32 such matchers at mixed positions filled in one call (the
  library's own threaded batch fill, 1 thread and all cores);
- random walks: each step picks uniformly among the allowed tokens (the end token with probability 1/2 when
  allowed, so that walks end). They visit far stranger text than a model does: a wrong mask shows up as an output
  the library accepted that fails jsonschema.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from typing import Any

import numpy as np

from benchmarks.common import table
from benchmarks.grammar_tokenizer import load_tokenizer

SCHEMAS: dict[str, dict[str, Any]] = {
    "order (nested, arrays, enums, ranges)": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 24},
                "vip": {"type": "boolean"}}, "required": ["name", "vip"], "additionalProperties": False},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000}},
                "required": ["sku", "qty", "price"], "additionalProperties": False}},
        },
        "required": ["id", "status", "customer", "items"], "additionalProperties": False},
    "flat (strings, numbers, optional)": {
        "type": "object",
        "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 40},
                       "rating": {"type": "number", "minimum": -5, "exclusiveMaximum": 5},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                       "note": {"type": ["string", "null"]}},
        "required": ["title", "rating"], "additionalProperties": False},
    "any JSON object": {"type": "object"},
}
DOCUMENTS = {  # one valid document per schema, for the replay
    "order (nested, arrays, enums, ranges)": {
        "id": 4821, "status": "shipped", "customer": {"name": "Ada Lovelace", "vip": True},
        "items": [{"sku": "ABC-12", "qty": 2, "price": 19.99}, {"sku": "XYZ-07", "qty": 1, "price": 250}]},
    "flat (strings, numbers, optional)": {"title": "The quick brown fox", "rating": 4.5, "tags": ["news", "fun"],
                                          "note": None},
    "any JSON object": {"name": "deltaserve", "version": [0, 1, 0], "ok": True, "nested": {"a": 1.5, "b": "text"}},
}
BATCH = 32


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, stop: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=stop)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bitmask: np.ndarray, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()

    def batch_filler(self, threads: int | None):
        batch = self.xgr.BatchGrammarMatcher(max_threads=threads or "auto")
        return lambda matchers, bitmask: batch.batch_fill_next_token_bitmask(matchers, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, stop: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.ll, self.llnp = llguidance, llguidance.numpy
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stop[0])

    def compile(self, schema: dict) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if is_error:
            raise ValueError(messages[0])
        self.ll.LLMatcher(self.tok, grammar)  # llguidance compiles lazily: creating the matcher is the compile
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tok, compiled)

    def fill(self, m: Any, bitmask: np.ndarray, row: int) -> None:
        self.llnp.fill_next_token_bitmask(m, bitmask, row)

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m: Any) -> bool:
        return m.is_stopped()

    def batch_filler(self, threads: int | None):
        executor = self.ll.LLExecutor(threads)
        return lambda matchers, bitmask: self.llnp.fill_next_token_bitmask_par(
            executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


def allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(lib, compiled, tokenizer, stop: set[int], vocab: int, rng: random.Random, max_steps: int
         ) -> tuple[list[float], str | None]:
    """One random walk: the per-call fill times, and the text if the grammar ended (None if cut at max_steps)."""
    m = lib.matcher(compiled)
    bitmask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    times, tokens = [], []
    for _ in range(max_steps):
        t0 = time.perf_counter()
        lib.fill(m, bitmask, 0)
        times.append(time.perf_counter() - t0)
        ids = allowed_ids(bitmask[0], vocab)
        ends = [int(i) for i in ids if int(i) in stop]
        token = ends[0] if ends and rng.random() < 0.5 else int(ids[rng.randrange(len(ids))])
        if not lib.accept(m, token):
            raise AssertionError(f"{lib.name} refused a token its own mask allowed ({token})")
        if token in stop:
            return times, tokenizer.decode(tokens)
        tokens.append(token)
    return times, None


def replay(lib, compiled, tokens: list[int], vocab: int) -> list[float]:
    """Mask time of every step of a model-like output (`tokens`, ending with the end token)."""
    m = lib.matcher(compiled)
    bitmask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    times = []
    for token in tokens:
        t0 = time.perf_counter()
        lib.fill(m, bitmask, 0)
        times.append(time.perf_counter() - t0)
        if not bitmask[0, token >> 5] >> (token & 31) & 1 or not lib.accept(m, token):
            raise AssertionError(f"{lib.name} refused token {token} of a valid document")
    return times


def batch_step_ms(lib, compiled, tokens: list[int], vocab: int, threads: int | None) -> float:
    """Mean time of one batch fill of BATCH fresh matchers at staggered positions of the document, every matcher
    advancing one token per round (and starting over at the end), over len(tokens) rounds."""
    matchers, positions = [], []
    for i in range(BATCH):
        m, start = lib.matcher(compiled), i * (len(tokens) - 1) // BATCH
        for token in tokens[:start]:
            lib.accept(m, token)
        matchers.append(m)
        positions.append(start)
    bitmask = np.zeros((BATCH, (vocab + 31) // 32), dtype=np.int32)
    fill = lib.batch_filler(threads)
    total = 0.0
    for _ in range(len(tokens)):
        t0 = time.perf_counter()
        fill(matchers, bitmask)
        total += time.perf_counter() - t0
        for i, m in enumerate(matchers):
            if positions[i] == len(tokens) - 1:
                matchers[i], positions[i] = lib.matcher(compiled), 0
            else:
                lib.accept(m, tokens[positions[i]])
                positions[i] += 1
    return total / len(tokens) * 1e3


def run_library(lib, tokenizer, stop: set[int], vocab: int, walks: int, max_steps: int) -> list[dict]:
    import jsonschema

    rows = []
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = lib.compile(schema)
        compile_ms = (time.perf_counter() - t0) * 1e3
        doc = tokenizer.encode(json.dumps(DOCUMENTS[name]), add_special_tokens=False) + [min(stop)]
        steps = replay(lib, compiled, doc, vocab)
        batch = {f"batch{BATCH} ms {t or 'all'} thr": batch_step_ms(lib, compiled, doc, vocab, t) for t in (1, None)}
        rng = random.Random(0)
        times: list[float] = []
        valid = invalid = cut = 0
        for _ in range(walks):
            step_times, text = walk(lib, compiled, tokenizer, stop, vocab, rng, max_steps)
            times += step_times
            if text is None:
                cut += 1
                continue
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                invalid += 1
        rows.append({"library": lib.name, "schema": name, "compile ms": compile_ms,
                     "replay us mean": sum(steps) / len(steps) * 1e6, "replay us max": max(steps) * 1e6, **batch,
                     "walk us mean": sum(times) / len(times) * 1e6,
                     "walk us p99": sorted(times)[int(0.99 * (len(times) - 1))] * 1e6,
                     "walks valid": valid, "walks INVALID": invalid, "cut": cut})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="a checkpoint directory with tokenizer.json (default: synthetic 248k BPE)")
    p.add_argument("--walks", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=200)
    args = p.parse_args(argv)
    # before the tokenizer, whose first build takes minutes
    missing = [m for m in ("xgrammar", "llguidance", "jsonschema") if importlib.util.find_spec(m) is None]
    if missing:
        p.exit(1, f"compare_grammar_libraries.py needs {', '.join(missing)}: pip install {' '.join(missing)}\n")
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = len(tokenizer)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    print(f"tokenizer: {args.tokenizer or 'synthetic BPE'}, {vocab} tokens; {args.walks} walks of <= "
          f"{args.max_steps} tokens per schema, one thread")
    rows = []
    for cls in (XGrammar, LLGuidance):
        t0 = time.perf_counter()
        lib = cls(tokenizer, vocab, stop)
        print(f"{cls.name}: tokenizer set-up {time.perf_counter() - t0:.2f} s", flush=True)
        rows += run_library(lib, tokenizer, set(stop), vocab, args.walks, args.max_steps)
    print(table(rows))


if __name__ == "__main__":
    main()
