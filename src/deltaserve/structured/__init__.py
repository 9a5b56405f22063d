"""Structured outputs: a request's output constrained to a JSON schema, a regex, a choice, a grammar, or a
Qwen3-Coder tool call, by a per-request token mask applied in the sampler.

    spec.py          StructuredSpec (a frozen value in SamplingParams) and StructuredError; pure Python
    grammars.py      spec -> llguidance grammar text (JSON options, regex, choice, Lark/GBNF, reasoning prefix)
    tool_grammar.py  OpenAI tools + tool_choice -> a Lark grammar of Qwen3-Coder XML tool calls
    compiler.py      GrammarCompiler: validates and compiles once per spec (cached), off the engine thread
    matchers.py      StructuredOutputs: the engine's per-request matchers, the step's bitmask, advancing them

The library is llguidance (benchmarks/RESULTS.md says why). The bitmask is one bit per vocabulary id, int32 words
[rows, ceil(V / 32)], little-endian bit order within a word; the runner applies it (engine/sampler.py).
"""

from deltaserve.structured.spec import StructuredError, StructuredKind, StructuredSpec

__all__ = ["StructuredError", "StructuredKind", "StructuredSpec"]
