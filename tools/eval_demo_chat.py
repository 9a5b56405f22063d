"""Measure the demo model's chat markup on held-out prompts (tools/demo_chat_data.py's held-out split), through
deltaserve's engine (greedy) and the server's own output and tool-call parsers:

- think_closed: thinking replies whose <think> block closes (the reasoning parser leaves reasoning mode);
- ended: replies that stop on <|im_end|> (finish_reason "stop" on that token) before max_tokens;
- tool_call: tool prompts whose reply holds a call the tool parser parses, with the expected function and JSON
  arguments that are an object carrying the schema's required parameters (tool_args_exact: the arguments equal
  the ones the request states);
- result_used: replies after a tool result that make no call and repeat the result's value;
- declined: prompts that offer tools but need none, answered without a call.

    python tools/eval_demo_chat.py src/deltaserve/demo_model [--update-metrics]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tools import demo_chat_data as chats
from tools.train_demo import checkpoint_dir, positive_int

MAX_TOKENS = 256


def heldout_functions() -> list[tuple[str, str, str]]:
    """Short documented functions of the held-out stdlib files: "write a function" prompts never trained on."""
    from tools.finetune_demo_chat import short_functions
    from tools.train_demo import default_corpus_root, is_heldout, read_sources

    return short_functions([(r, t) for r, t in read_sources(default_corpus_root()) if is_heldout(r)])


def parse_reply(tokenizer, sample: chats.Sample, text: str):
    """The server's reading of a reply: (reasoning, content, tool calls, still in reasoning)."""
    from deltaserve.server.output_parser import OutputParser, ParsedDelta, strip_tokens

    parser = OutputParser(parse_reasoning=True, starts_in_reasoning=sample.thinking, tools=sample.schemas(),
                          parse_tools=bool(sample.tools), strip=strip_tokens(tokenizer))
    out = ParsedDelta()
    out.extend(parser.feed(text))
    out.extend(parser.finish())
    return out, parser.in_reasoning


def call_ok(sample: chats.Sample, calls) -> tuple[bool, bool]:
    """(a parsed call to the expected function with a JSON object carrying the required parameters, the arguments
    equal the expected ones)."""
    if not calls or calls[0].name != sample.expect["name"]:
        return False, False
    try:
        args = json.loads(calls[0].arguments)
    except json.JSONDecodeError:
        return False, False
    schema = sample.schemas()[sample.expect["name"]]
    valid = isinstance(args, dict) and set(schema["required"]) <= set(args) <= set(schema["properties"])
    return valid, valid and args == sample.expect["arguments"]


def score(tokenizer, sample: chats.Sample, completion, im_end: int) -> dict[str, bool]:
    parsed, open_think = parse_reply(tokenizer, sample, completion.text)
    # the last token, not stop_reason: as in vLLM, stop_reason is None when a sequence ends on an end token
    ended = completion.finish_reason == "stop" and list(completion.token_ids[-1:]) == [im_end]  # not <|endoftext|>
    row = {"ended": ended}
    if sample.thinking:
        row["think_closed"] = not open_think
    if sample.kind == "tool":
        row["tool_call"], row["tool_args_exact"] = call_ok(sample, parsed.tool_calls)
    elif sample.kind == "result":
        row["result_used"] = not parsed.tool_calls and sample.expect["answer_contains"] in parsed.content
    elif sample.kind == "decline":
        row["declined"] = not parsed.tool_calls
    return row


def generate(llm, samples: list[chats.Sample], max_tokens: int):
    from deltaserve import SamplingParams
    from deltaserve.engine.tokenizer import render_chat

    tok = llm.engine.tokenizer
    prompts = [{"prompt_token_ids": render_chat(tok, s.messages, tools=s.tools,
                                                chat_template_kwargs=s.template_kwargs())} for s in samples]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, skip_special_tokens=False)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def summarize(rows: list[dict[str, bool]]) -> dict[str, Any]:
    out = {}
    for key in ("think_closed", "ended", "tool_call", "tool_args_exact", "result_used", "declined"):
        vals = [r[key] for r in rows if key in r]
        out[key] = {"rate": round(sum(vals) / max(1, len(vals)), 4), "hits": sum(vals), "n": len(vals)}
    return out


def evaluate_chat(ckpt: Path, max_tokens: int = MAX_TOKENS, samples: list[chats.Sample] | None = None,
                  llm=None) -> tuple[dict[str, Any], list]:
    """Scores of the held-out chats (or `samples`) and the completions."""
    from deltaserve import LLM

    samples = samples if samples is not None else chats.heldout_samples(heldout_functions())
    llm = llm or LLM(str(ckpt), dtype="float32", device="cpu")
    tok = llm.engine.tokenizer
    completions = generate(llm, samples, max_tokens)
    rows = [score(tok, s, c, tok.convert_tokens_to_ids(chats.IM_END)) for s, c in zip(samples, completions)]
    return summarize(rows), completions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=checkpoint_dir, help="checkpoint directory")
    p.add_argument("--max-tokens", type=positive_int, default=MAX_TOKENS)
    p.add_argument("--update-metrics", action="store_true", help="merge into DIR/metrics.json, rewrite DIR/README.md")
    args = p.parse_args(argv)
    ckpt, t0 = Path(args.ckpt), time.time()
    samples = chats.heldout_samples(heldout_functions())
    summary, completions = evaluate_chat(ckpt, args.max_tokens, samples)
    for s, c in list(zip(samples, completions))[::17]:  # a few replies to look at
        print(f"--- {s.kind} thinking={s.thinking}: {s.messages[-1]['content'][:80]!r}\n{c.text[:300]}")
    result = {"chat_eval": {"max_tokens": args.max_tokens, "prompts": len(samples), "scores": summary,
                            "seconds": round(time.time() - t0, 1),
                            "command": "python tools/eval_demo_chat.py DIR --update-metrics"}}
    print(json.dumps(result, indent=1))
    metrics_path = ckpt / "metrics.json"
    if args.update_metrics and metrics_path.is_file():
        metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), **result}, indent=1) + "\n")
        from tools.demo_card import write_card

        write_card(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
