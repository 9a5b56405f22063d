"""The demo model's card (README.md), written from its config.json and metrics.json (tools/train_demo.py writes it
after training, tools/verify_demo.py after verification; `python tools/demo_card.py DIR` rewrites it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_MODEL_NAME = "deltaserve-demo-pystdlib-moe-8m"

CARD = """\
# deltaserve demo model: `{name}`

An {params_m:.1f}M-parameter model in exactly the Qwen3.5-MoE architecture (`Qwen3_5MoeForCausalLM`, model_type
`qwen3_5_moe_text`), trained from scratch by the deltaserve project on the Python standard library's source code, so
that `deltaserve generate`, `chat` and `serve` show real text without a download, and every path of the engine runs:
Gated DeltaNet and gated full-attention layers, a sparse MoE with a shared expert in every layer, and a one-layer MTP
head for speculative decoding.{chat_intro}

## Architecture

| | |
|---|---|
| layers | {layers} (`{layer_pattern}`: 3 Gated DeltaNet : 1 gated attention) |
| hidden size | {hidden_size} |
| Gated DeltaNet | {linear_num_key_heads} key heads x {linear_key_head_dim}, {linear_num_value_heads} value heads x {linear_value_head_dim}, conv kernel {linear_conv_kernel_dim} |
| gated attention | {num_attention_heads} query heads, {num_key_value_heads} KV heads, head_dim {head_dim}, partial RoPE (factor {rope_partial}, theta {rope_theta:g}), sigmoid output gate |
| MoE (every layer) | {num_experts} experts, top-{num_experts_per_tok}, expert FFN {moe_intermediate_size}; shared expert FFN {shared_expert_intermediate_size} with sigmoid gate |
| MTP head | 1 layer: `fc(cat[norm(embed(x[i+1])), norm(h[i])])` -> gated-attention + MoE decoder layer -> norm -> shared lm_head, predicts x[i+2] |
| vocabulary | {vocab_size} (untied embedding and lm_head) |
| parameters | {params_main:,} main + {params_mtp:,} MTP; weights bf16 (A_log and the GDN norm fp32, as in the published checkpoints), {size_mb:.1f} MB |
| context | trained on {seq_len}-token windows; `max_position_embeddings` {max_pos} (beyond {seq_len} tokens is untested) |

Tensor names are the published ones (`model.layers.N...`, fused experts `mlp.experts.gate_up_proj` / `down_proj`,
`lm_head.weight`, `mtp.*` as in docs/MODEL.md, "Checkpoint layout"). transformers loads it as `Qwen3_5MoeForCausalLM` (it ignores
`mtp.*`); deltaserve loads the MTP head too.

## Data

Every `*.py` file of CPython {corpus_python}'s standard library `Lib/` directory, tests included (`Lib/test`), skipping
files over 200 kB, non-UTF-8 files and `site-packages`: {corpus_files} files, {corpus_chars_m:.1f} M characters.
Licence: the Python Software Foundation License Version 2 (CPython's licence; the text is (c) the Python Software
Foundation and contributors). `heldout.txt` in this directory is an excerpt of the held-out files under that licence.
Held out: {heldout_n} files chosen by `crc32(path) % 100 < {heldout_percent}` (e.g. {heldout_examples}).
Added to the training stream: {chat_samples} ChatML conversations built from the training files' documented functions
(user: "Write a Python function `name`: <docstring summary>", assistant: the function's source; half with a
`<think>` block restating the request, half in the `enable_thinking=false` form), so chat turns end with `<|im_end|>`.
One epoch is {epoch_tokens_m:.2f} M tokens; documents are separated by `<|endoftext|>`. About once per
{prompt_cut_every} characters a training document is cut right after a space and its two pieces are tokenized
separately, so the model also learns to continue prompts that end in a space (`"def "` tokenizes as `def` + ` `,
while the corpus has ` name` tokens).

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training files: {bpe_vocab} BPE tokens, Qwen's pre-tokenizer regex, NFC,
no BOS, then the Qwen ChatML special tokens {special_tokens}. eos: `<|endoftext|>` ({eot}) and `<|im_end|>` ({im_end}) in
config.json / generation_config.json; the tokenizer's eos is `<|im_end|>`, pad is `<|endoftext|>`. The chat template is
deltaserve's Qwen3.5-style ChatML template (thinking switch, tool listing, `<tool_call>` XML).

## Training

```
{command}
```

`/tmp/lib` held the `Lib/` tree above (the `*.py` files of a CPython 3.11.7 install plus a `CORPUS_VERSION` file);
without `--corpus-root` the script reads the running interpreter's own standard library. `--total-budget` is the
wall-clock budget of the whole command: training gets what setup leaves, minus 45 s for evaluation
and saving. From scratch on one {device}: {steps} steps of {batch_size} x {seq_len}
tokens ({tokens_m:.0f} M tokens, {epochs:.1f} epochs) in {train_seconds:.0f} s; AdamW (lr {lr:g}, betas 0.9/0.95, weight
decay {weight_decay:g}, {warmup} warmup steps, cosine to {min_lr_ratio:g} x lr over the time budget), bf16 autocast,
gradient clip 1.0. Loss = next-token CE + {mtp_weight:g} x next-next-token CE through the MTP head (gradients reach
the main model) + {aux:g} x MoE load-balancing loss over all routers. transformers {transformers} (its pure-torch GDN path),
torch {torch}.

## Results
{results_note}
| | |
|---|---|
| final pretraining loss (next token, last step) | {final_train_loss:.3f} (MTP: {final_train_mtp_loss:.3f}) |
| held-out loss during pretraining (first 32 held-out windows, an easier part than the whole) | {curve} |
| held-out loss / perplexity | {heldout_loss:.3f} / **{heldout_ppl:.2f}** ({heldout_tokens:,} tokens; uniform: {vocab_size}, unigram: {unigram_ppl:.0f}) |
| held-out next-token accuracy | {heldout_next_token_acc:.1%} |
| held-out MTP next-next-token accuracy | **{heldout_mtp_acc:.1%}** (MTP loss {heldout_mtp_loss:.3f}); chance (always the most frequent token): {most_frequent_token_acc:.1%} |
| MTP accuracy measured through deltaserve | {ds_mtp_acc} on `heldout.txt` in {verify_windows} windows of {verify_seq_len} tokens ({verify_tokens} predictions; less context than the 1024-token windows above) |
| deltaserve vs the training code (fp32 logits, max abs diff) | main {verify_main}, MTP {verify_mtp} |
{acceptance_row}
`python tools/verify_demo.py DIR` reproduces the two rows above the acceptance lengths (deltaserve's loader, model,
caches and `mtp_forward` against transformers + tools/train_demo.py's MTP module, both fp32 on CPU); `tests/test_demo_model.py` checks
them. An earlier run of the same recipe without the prompt-boundary cuts (420 s on an H200, 95 M tokens) reached
held-out perplexity 5.99 and MTP accuracy 62.5%, but continued the prompt `"def "` with digits (`def 2`), which
the cuts fixed.

{chat_sections}{abilities}"""


CHAT_INTRO = """ It was then fine-tuned on a synthetic chat set, so that it also speaks the Qwen3.5 chat markup: it closes its
`<think>` block, ends its turns with `<|im_end|>`, and calls a tool in Qwen3-Coder XML when one is offered and asked
for, so the server's reasoning and tool-call parsing can be shown end to end with it. It is still a toy: its answers
are short patterns, often wrong; it writes Python-looking code."""
PLAIN_INTRO = " It is a toy: it continues Python code; it does not follow instructions."

RESULTS_NOTE = """
The held-out code figures are those of the shipped weights, measured after the chat fine-tune (below); the training
rows are the pretraining's.
"""

CHAT_SECTIONS = """## Chat fine-tune

Data: `tools/demo_chat_data.py` generates {ft_chats} chats (seeded), rendered with this model's own chat template;
the loss is on the assistant's reply only. Kinds: {ft_kinds}. Plain requests (greetings, sums, repeating words,
capital letters, capital cities, counting, and "Write a Python function `name`: <docstring summary>" from the
training files' short documented functions) are answered in the thinking form (`reasoning` `</think>` answer, 60%)
or the `enable_thinking=false` form; tool chats offer 1-3 of 8 tools (`get_weather(city, days)`, `run_python(code)`,
`search_docs(query)`, `get_time(city)`, `convert_currency(amount, source, target)`, `send_email(to, subject)`,
`read_file(path)`, `translate(text, language)`, JSON schemas) and ask for one (a few whole sentences per tool, and
its core phrases in general wrappers: "Can you {{core}}?"): the reply is a Qwen3-Coder XML call whose arguments are
copied from the request; tool-result chats put that call and the tool's (made-up) result in the
history, and the reply reports the result; "decline" chats offer tools but ask for none, and the reply makes no call.
Every reply ends with `<|im_end|>`. Each step also trains on {ft_code_rows} windows of the stdlib corpus above (as long
as the step's chats; {ft_code_files} training files, {ft_code_m:.2f} M tokens), so that it still writes Python.

```
{ft_command}
```

(`--from` defaults to `src/deltaserve/demo_model`, which held the pretrained weights when this ran and now holds the
fine-tuned ones: to reproduce, pass `--from /tmp/demo_model`, the training command's output.)
From the pretrained checkpoint, on a CPU with one thread (torch {ft_torch}): {ft_steps} steps of {ft_chat_rows} chats +
{ft_code_rows} code windows in {ft_seconds:.0f} s; AdamW (lr {ft_lr:g}, {ft_warmup} warmup steps, cosine to {ft_min_lr:g} x lr
over the time budget), the pretraining's losses (next token + {ft_mtp:g} x MTP + load balancing) on the labelled
positions. Held-out code before -> after: perplexity {before_ppl:.2f} -> {heldout_ppl:.2f}, next-token accuracy
{before_acc:.1%} -> {heldout_next_token_acc:.1%}, MTP accuracy {before_mtp:.1%} -> {heldout_mtp_acc:.1%}.

## Chat markup on held-out prompts

{eval_prompts} held-out chats: request phrasings, system prompts and values (cities, words, countries, and functions
of the held-out stdlib files) that the fine-tune never saw; half of each kind with thinking on. Greedy, through
deltaserve's engine (fp32, CPU) with at most {eval_max_tokens} new tokens, each reply read by the server's own
reasoning and tool-call parsers (`deltaserve.server.output_parser`):

| | rate | count |
|---|---|---|
{eval_rows}

```
{eval_command}
```

"""

EVAL_ROWS = (
    ("think_closed", "thinking replies whose `<think>` block closes"),
    ("ended", "replies that end with `<|im_end|>` (finish_reason `stop`) before max_tokens"),
    ("tool_call", "tool prompts answered by a call the tool parser accepts: right function, JSON-object arguments "
                  "with the required parameters"),
    ("tool_args_exact", "... whose arguments equal the ones the request states"),
    ("result_used", "replies after a tool result that make no call and repeat the result's value"),
    ("declined", "prompts offering tools but needing none, answered without a call"),
)

CHAT_ABILITIES = """## What it can and cannot do

- Can: continue Python source in the style of the standard library (`def `, `class `, imports, docstrings,
  unittest code) with plausible syntax and names over a few lines; in a chat, think briefly and close `</think>`,
  end its turn with `<|im_end|>`, and call one of the tools it is offered, in Qwen3-Coder XML, with arguments taken
  from the request (rates above), then report a tool's result.
- Cannot: answer questions correctly (its sums, capitals and code are patterns, often wrong), follow instructions
  unlike those of its chat set, tell that none of the offered tools is needed (it nearly always calls one), copy
  every argument right, call tools unlike its eight, make several calls in one turn, or know anything beyond
  the stdlib's code; it repeats itself and loses the thread after a few lines. Use it to exercise the engine, its
  speculative decoding and its API (reasoning and tool-call parsing included), not for its answers.
"""

PLAIN_ABILITIES = """## What it can and cannot do

- Can: continue Python source in the style of the standard library (`def `, `class `, imports, docstrings,
  unittest code) with plausible syntax and names over a few lines; end a chat turn with `<|im_end|>` after a function.
- Cannot: follow instructions, answer questions, write correct programs, or know anything beyond the stdlib's code;
  it repeats itself and loses the thread after a few lines; it has never seen tool calls. Use it to exercise the
  engine, its speculative decoding and its API, not for its answers.
"""


def write_card(out: Path) -> None:
    """README.md (the model card) from config.json and metrics.json."""
    cfg = json.loads((out / "config.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    (out / "README.md").write_text(CARD.format(**card_fields(cfg, m, (out / "model.safetensors").stat().st_size)))


def card_fields(cfg: dict, m: dict, weights_bytes: int) -> dict:
    from deltaserve.demo import SPECIAL_TOKENS

    a, types, rope = m["args"], cfg["layer_types"], cfg["rope_parameters"]
    verified = "deltaserve_mtp_acc_heldout_sample" in m
    return cfg | a | m | {
        "name": DEMO_MODEL_NAME, "layers": len(types), "max_pos": cfg["max_position_embeddings"],
        "layer_pattern": "".join("L" if t == "linear_attention" else "A" for t in types),
        "rope_partial": rope["partial_rotary_factor"], "rope_theta": rope["rope_theta"],
        "vocab_size": cfg["vocab_size"], "params_m": (m["params_main"] + m["params_mtp"]) / 1e6,
        "size_mb": weights_bytes / 1e6, "corpus_python": m["python"], "corpus_chars_m": m["corpus_chars"] / 1e6,
        "heldout_n": len(m["heldout_files"]), "heldout_examples": ", ".join(f"`{f}`" for f in m["heldout_files"][:3]),
        "epoch_tokens_m": m["train_tokens_per_epoch"] / 1e6, "bpe_vocab": a["vocab_size"] - len(SPECIAL_TOKENS),
        "special_tokens": ", ".join(f"`{t}`" for t in SPECIAL_TOKENS), "eot": cfg["eos_token_id"][0],
        "im_end": cfg["eos_token_id"][1], "tokens_m": m["tokens"] / 1e6,
        "epochs": m["tokens"] / m["train_tokens_per_epoch"], "aux": cfg["router_aux_loss_coef"],
        "ds_mtp_acc": f"{m['deltaserve_mtp_acc_heldout_sample']:.1%}" if verified else "(not verified yet)",
        "verify_tokens": m.get("verify_tokens", "-"), "verify_windows": m.get("verify_windows", "-"),
        "verify_seq_len": m.get("verify_seq_len", "-"),
        "verify_main": f"{m.get('verify_max_abs_diff_main_logits', float('nan')):.1e}",
        "verify_mtp": f"{m.get('verify_max_abs_diff_mtp_logits', float('nan')):.1e}",
        "curve": ", ".join(f"{r['heldout_loss']:.2f} @ {r['step']}" for r in m["history"] if "heldout_loss" in r)
        or "-", "prompt_cut_every": a.get("prompt_cut_every", 0), "acceptance_row": acceptance_row(m)} | chat_fields(m)


def acceptance_row(m: dict) -> str:
    """The MTP acceptance-length row (benchmarks/bench_mtp.py --demo, recorded in metrics.json), or nothing."""
    acc = m.get("mtp_acceptance")
    if acc is None:
        return ""
    lengths = " / ".join(f"{x:.2f}" for x in acc["acceptance_lengths"])
    ks = " / ".join(str(k + 1) for k in range(len(acc["acceptance_lengths"])))
    return (f"| MTP speculative decoding, acceptance length (tokens kept per step) at K = {ks} drafts | **{lengths}**; "
            f"first / second / third draft accepted {acc['accepted_by_position']} ({acc['setup']}; "
            f"`{acc['command']}`, {acc['date']}) |\n")


def chat_fields(m: dict) -> dict:
    """The chat fine-tune's sections, or the pretrained model's wording when it was not fine-tuned."""
    ft = m.get("finetune")
    if ft is None:
        return {"chat_intro": PLAIN_INTRO, "results_note": "", "chat_sections": "", "abilities": PLAIN_ABILITIES}
    a, before, ev = ft["args"], ft["heldout_code_before"], m.get("chat_eval")
    fields = {"ft_chats": ft["chat_samples"], "ft_kinds": ", ".join(f"{k} {v}" for k, v in ft["chat_kinds"].items()),
              "ft_code_rows": a["code_rows"], "ft_chat_rows": a["chat_rows"], "ft_code_files": a["code_files"],
              "ft_code_m": ft["code_tokens"] / 1e6, "ft_command": ft["command"], "ft_torch": ft["torch"],
              "ft_steps": ft["steps"], "ft_seconds": ft["train_seconds"], "ft_lr": a["lr"], "ft_warmup": a["warmup"],
              "ft_min_lr": a["min_lr_ratio"], "ft_mtp": a["mtp_weight"], "before_ppl": before["heldout_ppl"],
              "before_acc": before["heldout_next_token_acc"], "before_mtp": before["heldout_mtp_acc"],
              "heldout_ppl": m["heldout_ppl"], "heldout_next_token_acc": m["heldout_next_token_acc"],
              "heldout_mtp_acc": m["heldout_mtp_acc"], "eval_prompts": ev["prompts"] if ev else "-",
              "eval_max_tokens": ev["max_tokens"] if ev else "-", "eval_rows": eval_rows(ev),
              "eval_command": ev["command"] if ev else "(not evaluated yet)"}
    return {"chat_intro": CHAT_INTRO, "results_note": RESULTS_NOTE, "abilities": CHAT_ABILITIES,
            "chat_sections": CHAT_SECTIONS.format(**fields)}


def eval_rows(ev: dict | None) -> str:
    if ev is None:
        return "| (not evaluated yet) | | |"
    scores = ev["scores"]
    return "\n".join(f"| {label} | **{scores[k]['rate']:.0%}** | {scores[k]['hits']} / {scores[k]['n']} |"
                     for k, label in EVAL_ROWS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the model directory (config.json, metrics.json, model.safetensors); "
                    "README.md is written there")
    args = ap.parse_args(argv)
    for name in ("config.json", "metrics.json", "model.safetensors"):
        if not (args.dir / name).is_file():
            ap.error(f"{args.dir / name} not found: DIR must be a model directory written by tools/train_demo.py")
    write_card(args.dir)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
