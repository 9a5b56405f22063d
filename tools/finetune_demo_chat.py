"""Fine-tune the demo model to chat: Qwen3.5 thinking blocks, turns that end with <|im_end|>, Qwen3-Coder XML tool
calls (tools/demo_chat_data.py makes the chats), on a CPU in well under an hour, keeping the tokenizer, the
architecture and the MTP head of the checkpoint it starts from.

Each step trains on whole chat samples (loss on the assistant's reply only: the prompt is the template's) and on
windows of the Python stdlib corpus the model was trained on (full loss, prompt cuts as in tools/train_demo.py), so
that it still writes Python. Then the checkpoint is written (bf16, the source's other files copied unchanged), the
held-out code metrics are measured again, and tools/eval_demo_chat.py runs the held-out chats through deltaserve.

    python tools/finetune_demo_chat.py --from src/deltaserve/demo_model --out /tmp/demo_chat --time-budget 2400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' thread pool: one core, like torch below

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tools import demo_chat_data as chats
from tools.train_demo import (ARCH, RouterLogits, checkpoint_dir, corpus_dir, default_corpus_root, documented_functions,
                              encode_documents, evaluate, export_tensors, is_heldout, load_training_modules, log,
                              mtp_hidden, optimizer, positive_int, read_sources)

MAX_FUNCTION_CHARS = 400  # "write a function" replies stay short enough to end well inside the eval's max_tokens
WEIGHTS = "model.safetensors"
EVAL_WINDOW = 1024  # held-out code is measured in windows of this many tokens (+ 1 target)


# ---- data ------------------------------------------------------------------------------------------------------------

def short_functions(sources: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [f for _, text in sources for f in documented_functions(text) if len(f[2]) <= MAX_FUNCTION_CHARS]


def encode_sample(tokenizer, s: chats.Sample) -> tuple[list[int], list[int]]:
    """Prompt ids (the template, as the server renders it) and reply ids, encoded apart as at inference."""
    prompt = tokenizer.apply_chat_template(s.messages, tools=s.tools, add_generation_prompt=True, tokenize=False,
                                           **s.template_kwargs())
    return (tokenizer.encode(prompt, add_special_tokens=False), tokenizer.encode(s.reply, add_special_tokens=False))


def chat_batches(encoded: list[tuple[list[int], list[int]]], rows: int, rng: random.Random) -> list[list[int]]:
    """Indices of `rows` samples per batch, samples of similar length together (less padding)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    group = rows * 16
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        batches += [chunk[i:i + rows] for i in range(0, len(chunk) - rows + 1, rows)]
    rng.shuffle(batches)
    return batches


def make_batch(encoded, idx: list[int], code: torch.Tensor, code_rows: int, pad: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] inputs and labels: the chat rows (right-padded, labels only on the reply) then `code_rows` corpus
    windows of the same length (labels everywhere)."""
    length = max(len(p) + len(r) for p, r in (encoded[i] for i in idx))
    x = torch.full((len(idx) + code_rows, length), pad, dtype=torch.long)
    y = torch.full_like(x, -100)
    for row, i in enumerate(idx):
        p, r = encoded[i]
        x[row, :len(p) + len(r)] = torch.tensor(p + r)
        y[row, len(p):len(p) + len(r)] = torch.tensor(r)
    starts = torch.randint(0, len(code) - length, (code_rows,), generator=gen)
    for row, s in enumerate(starts.tolist(), start=len(idx)):
        x[row] = y[row] = code[s:s + length]
    return x, y


def build_data(args, tokenizer) -> dict[str, Any]:
    sources = read_sources(Path(args.corpus_root))
    train = [(r, t) for r, t in sources if not is_heldout(r)]
    held = [(r, t) for r, t in sources if is_heldout(r)]
    rng = random.Random(args.seed)
    samples = chats.make_samples(args.chat_samples, chats.TRAIN, args.seed, short_functions(train))
    encoded = [encode_sample(tokenizer, s) for s in samples]
    code_docs = [t for _, t in rng.sample(train, min(args.code_files, len(train)))]
    code = encode_documents(tokenizer, code_docs, rng, args.prompt_cut_every).long()
    log(f"data: {len(encoded)} chats ({sum(len(p) + len(r) for p, r in encoded) / 1e6:.2f} M tokens, "
        f"{sum(len(r) for _, r in encoded) / 1e6:.2f} M in replies); code {len(code) / 1e6:.2f} M tokens from "
        f"{len(code_docs)} training files; {len(held)} held-out files")
    return {"encoded": encoded, "code": code, "heldout_code": encode_documents(tokenizer, [t for _, t in held]),
            "kinds": {k: sum(s.kind == k for s in samples) for k, _ in chats.MIX}}


# ---- training --------------------------------------------------------------------------------------------------------

def masked_losses(model, mtp, x: torch.Tensor, y: torch.Tensor, routers: RouterLogits) -> dict[str, torch.Tensor]:
    """Next-token and next-next-token (MTP) losses on the labelled positions only; the lm_head runs on those rows
    alone (most chat positions are prompt), which is most of the saving on a CPU."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    inp, tgt = x[:, :-1], y[:, 1:]
    hidden = model.model(input_ids=inp).last_hidden_state
    keep = tgt != -100
    main = F.cross_entropy(model.lm_head(hidden[keep]).float(), tgt[keep])
    keep2 = tgt[:, 1:] != -100
    mtp_states = mtp_hidden(model, mtp, inp, hidden)
    mtp_loss = F.cross_entropy(model.lm_head(mtp_states[keep2]).float(), tgt[:, 1:][keep2])
    aux = load_balancing_loss_func(routers.pop(), model.config.num_experts, model.config.num_experts_per_tok)
    return {"main": main, "mtp": mtp_loss, "aux": aux}


def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, mtp, data: dict[str, Any], args) -> dict[str, Any]:
    """Steps of args.chat_rows chats + args.code_rows code windows until args.max_steps or args.time_budget seconds
    (the cosine schedule follows whichever ends first)."""
    model.train(), mtp.train()
    routers = RouterLogits(model, mtp)
    opt = optimizer(model, mtp, args, torch.device("cpu"))
    params = [p for m in (model, mtp) for p in m.parameters()]
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    pad = int(data["code"][-1])  # <|endoftext|>: encode_documents ends every document with it
    batches, history, step, start = [], [], 0, time.time()
    while step < args.max_steps and time.time() - start < args.time_budget:
        batches = batches or chat_batches(data["encoded"], args.chat_rows, rng)
        x, y = make_batch(data["encoded"], batches.pop(), data["code"], args.code_rows, pad, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step, max(step / args.max_steps, (time.time() - start) / args.time_budget))
        parts = masked_losses(model, mtp, x, y, routers)
        loss = parts["main"] + args.mtp_weight * parts["mtp"] + ARCH["router_aux_loss_coef"] * parts["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            row = {k: round(float(v.detach()), 4) for k, v in parts.items()} | {
                "step": step, "lr": round(opt.param_groups[0]["lr"], 6), "gnorm": round(float(gnorm), 3),
                "tokens": int(x.numel()), "time": round(time.time() - start, 1)}
            history.append(row)
            log(json.dumps(row))
    return {"steps": step, "train_seconds": round(time.time() - start, 1), "history": history}


# ---- output ----------------------------------------------------------------------------------------------------------

def write_checkpoint(src: Path, out: Path, model, mtp) -> None:
    """The source checkpoint's files unchanged (tokenizer, template, config, held-out text), new weights."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in (WEIGHTS, "README.md") and f.resolve() != (out / f.name).resolve():
            shutil.copy2(f, out / f.name)
    save_file(export_tensors(model, mtp), str(out / WEIGHTS), metadata={"format": "pt"})


def finetune_facts(args, data: dict[str, Any], result: dict[str, Any], before: dict[str, float]) -> dict[str, Any]:
    return {"finetune": {**{k: v for k, v in result.items() if k != "history"}, "chat_samples": len(data["encoded"]),
                         "chat_kinds": data["kinds"], "code_tokens": len(data["code"]),
                         "heldout_code_before": before, "torch": torch.__version__, "device": "cpu, 1 thread",
                         "command": "python tools/finetune_demo_chat.py " + " ".join(sys.argv[1:]),
                         "args": vars(args), "history": result["history"]}}


def cmd_finetune(args) -> int:
    torch.set_num_threads(1)  # a shared 2-core machine: leave a core to whoever else works on it
    t0 = time.time()
    src, out = Path(args.src), Path(args.out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    data = build_data(args, tokenizer)
    model, mtp = load_training_modules(src)
    metrics = json.loads((src / "metrics.json").read_text())
    before = {k: metrics[k] for k in ("heldout_loss", "heldout_ppl", "heldout_next_token_acc", "heldout_mtp_acc")}
    args.time_budget = min(args.time_budget, args.total_budget - (time.time() - t0) - args.reserve)
    log(f"setup {time.time() - t0:.0f}s; training budget {args.time_budget:.0f}s")
    result = train(model, mtp, data, args)
    write_checkpoint(src, out, model, mtp)
    code_eval = evaluate(model, mtp, data["heldout_code"][: args.eval_tokens], EVAL_WINDOW, torch.device("cpu"))
    metrics = {**metrics, **code_eval, **finetune_facts(args, data, result, before)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"held-out code after fine-tuning: {json.dumps(code_eval)} (before: {json.dumps(before)})")
    from tools import eval_demo_chat, verify_demo

    verify_demo.main([str(out), "--update-metrics"])  # the MTP head through deltaserve, on the new weights
    eval_demo_chat.main([str(out), "--update-metrics", "--max-tokens", str(args.chat_eval_max_tokens)])
    log(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", type=checkpoint_dir, default=str(REPO / "src/deltaserve/demo_model"),
                   help="checkpoint to tune")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--corpus-root", type=corpus_dir, default=str(default_corpus_root()),
                   help="CPython Lib/ directory")
    p.add_argument("--chat-samples", type=positive_int, default=8000, help="training chats generated (seeded)")
    p.add_argument("--code-files", type=positive_int, default=400, help="training stdlib files in the code mix")
    p.add_argument("--prompt-cut-every", type=int, default=400)
    p.add_argument("--chat-rows", type=positive_int, default=6, help="chat samples per step")
    p.add_argument("--code-rows", type=int, default=2, help="code windows per step, as long as the step's chats")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.5)
    p.add_argument("--max-steps", type=positive_int, default=1_000_000)
    p.add_argument("--time-budget", type=float, default=2400.0, help="seconds of training (the schedule follows it)")
    p.add_argument("--total-budget", type=float, default=1e9, help="seconds for setup + training (+ reserve)")
    p.add_argument("--reserve", type=float, default=0.0, help="seconds of --total-budget kept for after training")
    p.add_argument("--eval-tokens", type=positive_int, default=400_000,
                   help="held-out code tokens measured after training")
    p.add_argument("--chat-eval-max-tokens", type=positive_int, default=256)
    p.add_argument("--log-every", type=positive_int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.eval_tokens <= EVAL_WINDOW:  # else the evaluation after training divides by zero windows
        p.error(f"--eval-tokens {args.eval_tokens}: the held-out code is measured in windows of {EVAL_WINDOW} + 1 "
                f"tokens; give more than {EVAL_WINDOW}")
    return cmd_finetune(args)


if __name__ == "__main__":
    sys.exit(main())
