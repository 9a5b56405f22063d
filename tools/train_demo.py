"""Train deltaserve's shipped demo model: a small Qwen3.5-MoE (GDN + gated attention, MoE with a shared expert, one
MTP layer) on the Python standard library's own sources, from scratch, in one GPU run of a few minutes.

Development tooling, not part of the serving package. Steps (all in one command):

1. corpus: every ``*.py`` file under a CPython ``Lib/`` directory (default: the running interpreter's standard
   library; PSF License). About 2% of the files, chosen by a hash of their path, are held out for evaluation. Chat
   samples (ChatML, with and without a thinking block) are made from the training files' documented functions.
   Some training documents are tokenized in two pieces cut right after a space (``prompt_cuts``), so that prompts
   ending in a space (``"def "``) continue as well as the corpus does.
2. tokenizer: byte-level BPE trained with ``tokenizers`` (Qwen's pre-tokenizer regex, NFC), plus the Qwen ChatML
   special tokens and deltaserve's chat template.
3. model: transformers' ``Qwen3_5MoeForCausalLM`` for the main model; the MTP head (which transformers does not
   model) is built here from transformers' own Qwen3.5-MoE layers, following docs/MODEL.md ("MTP head"):
   ``e = norm_e(embed(x[i+1])); h = norm_h(final_normed_hidden[i]); u = fc(cat[e, h]) -> full-attention decoder layer
   (own causal attention over the MTP inputs, same positions as the main model) -> norm -> shared lm_head -> x[i+2]``.
4. training: next-token loss + ``--mtp-weight`` x next-next-token loss through the MTP head + MoE load balancing
   loss, AdamW, bf16 autocast, a wall-clock budget with a time-based cosine schedule.
5. output: a Hugging Face checkpoint directory (bf16 weights, ``mtp.*`` tensors with the published names), a held-out
   text sample, metrics.json and a model card README.md.

``python tools/verify_demo.py DIR`` then loads the written checkpoint in deltaserve, compares its main and MTP logits
with this script's training math on held-out text and measures the MTP head's accuracy through deltaserve;
``python tools/demo_card.py DIR`` rewrites the model card from config.json and metrics.json. The shipped model was then
fine-tuned to chat (thinking blocks, turn ends, tool calls) by ``tools/finetune_demo_chat.py``.

Example (the shipped model): see the model card, src/deltaserve/demo_model/README.md.
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import json
import math
import random
import re
import sys
import sysconfig
import textwrap
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():  # fla's Triton kernels (which transformers picks up when fla imports) need a GPU
    sys.modules.setdefault("fla", None)  # type: ignore[arg-type]

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "src"):  # tools.demo_card; deltaserve.demo holds the chat template and special tokens
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmarks.common import positive_int
from deltaserve.demo import CHAT_TEMPLATE, SPECIAL_TOKENS

QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HELDOUT_PERCENT = 2
MAX_FILE_BYTES = 200_000
HELDOUT_SAMPLE_CHARS = 48_000

ARCH: dict[str, Any] = {
    "hidden_size": 256, "num_hidden_layers": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
    "shared_expert_intermediate_size": 96, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "mtp_num_hidden_layers": 1, "hidden_act": "silu", "attention_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "initializer_range": 0.02, "router_aux_loss_coef": 0.01,
}
FP32_SUFFIXES = ("linear_attn.A_log", "linear_attn.norm.weight")  # fp32 in the published checkpoints too


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- corpus ----------------------------------------------------------------------------------------------------------

def corpus_python(root: str | Path) -> str:
    """The CPython version whose Lib/ is at root: its CORPUS_VERSION file, or this interpreter's for its own stdlib."""
    marker = Path(root) / "CORPUS_VERSION"
    if marker.is_file():
        return marker.read_text().strip()
    return sys.version.split()[0] if Path(root) == default_corpus_root() else "?"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# argparse types of the demo tools: a wrong path or size is a usage error naming it, not a traceback from deep inside
def corpus_dir(text: str) -> str:
    if not any(Path(text).rglob("*.py")):
        raise argparse.ArgumentTypeError(f"{text} holds no *.py files: give a CPython Lib/ directory")
    return text


def checkpoint_dir(text: str) -> str:
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json: give a checkpoint directory")
    return text


def read_sources(root: Path, max_files: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every readable UTF-8 .py file under root, sorted by path."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        raw = path.read_bytes()
        if not raw.strip() or len(raw) > MAX_FILE_BYTES or b"\x00" in raw:
            continue
        try:
            text = raw.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        out.append((rel, text))
        if max_files and len(out) >= max_files:
            break
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 100 < HELDOUT_PERCENT


def documented_functions(text: str) -> list[tuple[str, str, str]]:
    """(name, one-line docstring summary, dedented source) of the functions with docstrings in a module."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found, lines = [], text.split("\n")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        source = "\n".join(lines[node.lineno - 1:node.end_lineno]) + "\n"
        if not doc or len(source) > 1500 or not source.lstrip().startswith(("def ", "async def ")):
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if 10 <= len(summary) <= 200:
            found.append((node.name, " ".join(summary.split()), textwrap.dedent(source)))
    return found


def chat_sample(tokenizer, name: str, summary: str, code: str, thinking: bool) -> str:
    """A ChatML conversation rendered with the shipped chat template: a request for a function, the function."""
    request = {"role": "user", "content": f"Write a Python function `{name}`: {summary}"}
    prompt = tokenizer.apply_chat_template([request], add_generation_prompt=True, tokenize=False,
                                           enable_thinking=thinking)
    think = f"The function is `{name}`. {summary}\n</think>\n\n" if thinking else ""
    return prompt + think + code.rstrip() + "\n<|im_end|>\n"


# ---- tokenizer -------------------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen's pre-tokenizer; ids [0, vocab_size - len(SPECIAL_TOKENS)) are BPE tokens, the
    ChatML special tokens follow in SPECIAL_TOKENS order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= vocab_size, (len(fast), vocab_size)
    return fast


PROMPT_CUT = re.compile(r"(?<=[ \t])\S")  # a prompt that ends in a space, e.g. "def " | "name(...)"


def prompt_cuts(text: str, rng: random.Random, every: int) -> list[str]:
    """Split text into pieces at about one random place per `every` characters, each right after a space or tab
    and before a non-space. Encoded piece by piece, the prefix ends in a bare space token and the next piece starts
    with a word token without its usual leading space: what a prompt like "def " gives the model at inference."""
    if every <= 0 or len(text) < every:
        return [text]
    cuts = set()
    for _ in range(len(text) // every):
        m = PROMPT_CUT.search(text, rng.randrange(len(text)))
        if m:
            cuts.add(m.start())
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def encode_documents(tokenizer, docs: list[str], rng: random.Random | None = None, cut_every: int = 0) -> torch.Tensor:
    """Documents -> one flat int32 stream, each document followed by <|endoftext|> (with `rng`: each document encoded
    in the pieces of prompt_cuts)."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pieces = [prompt_cuts(d, rng, cut_every) if rng else [d] for d in docs]
    encs = iter(tokenizer.backend_tokenizer.encode_batch([p for ps in pieces for p in ps], add_special_tokens=False))
    flat: list[int] = []
    for ps in pieces:
        for _ in ps:
            flat.extend(next(encs).ids)
        flat.append(eot)
    return torch.tensor(flat, dtype=torch.int32)


def build_data(args) -> dict[str, Any]:
    sources = read_sources(Path(args.corpus_root), args.max_files)
    train = [(r, t) for r, t in sources if not is_heldout(r)]
    held = [(r, t) for r, t in sources if is_heldout(r)]
    log(f"corpus: {len(sources)} files ({sum(len(t) for _, t in sources) / 1e6:.1f} M chars) from {args.corpus_root}; "
        f"{len(held)} held out")
    tokenizer = train_tokenizer([t for _, t in train], args.vocab_size)
    rng = random.Random(args.seed)
    funcs = [f for _, t in train for f in documented_functions(t)]
    rng.shuffle(funcs)
    chats = [chat_sample(tokenizer, *f, thinking=i % 2 == 0) for i, f in enumerate(funcs[:args.chat_samples])]
    docs = [t for _, t in train] + chats
    rng.shuffle(docs)
    train_ids = encode_documents(tokenizer, docs, rng, args.prompt_cut_every)
    held_ids = encode_documents(tokenizer, [t for _, t in held])
    held_text = "".join(t + "\n" for _, t in held)[:HELDOUT_SAMPLE_CHARS]
    log(f"tokens: train {len(train_ids) / 1e6:.2f} M ({len(chats)} chat samples), held-out {len(held_ids) / 1e6:.3f} M;"
        f" {sum(len(t) for _, t in train) / max(1, len(train_ids)):.2f} chars/token")
    return {"tokenizer": tokenizer, "train": train_ids, "heldout": held_ids, "heldout_text": held_text,
            "files": len(sources), "heldout_files": [r for r, _ in held], "chat_samples": len(chats),
            "chars": sum(len(t) for _, t in sources)}


# ---- model -----------------------------------------------------------------------------------------------------------

def config_dict(tokenizer, vocab_size: int) -> dict[str, Any]:
    eot, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    return {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "vocab_size": vocab_size,
            **copy.deepcopy(ARCH), "dtype": "bfloat16", "eos_token_id": [eot, im_end], "pad_token_id": eot,
            "bos_token_id": None}


def hf_config(cfg: dict[str, Any]):
    from transformers import Qwen3_5MoeTextConfig

    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "dtype")}
    config = Qwen3_5MoeTextConfig(**kw)
    config._attn_implementation = "sdpa"
    return config


class MTPHead(nn.Module):
    """The MTP module (docs/MODEL.md, "MTP head") from transformers' Qwen3.5-MoE layers; parameter names are those of
    the published ``mtp.*`` tensors without the prefix."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer, Qwen3_5MoeRMSNorm

        d, eps = config.hidden_size, config.rms_norm_eps
        layer_config = copy.deepcopy(config)
        layer_config.layer_types = ["full_attention"]
        layer_config.num_hidden_layers = 1
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(d, eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(d, eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList([Qwen3_5MoeDecoderLayer(layer_config, 0)])
        self.norm = Qwen3_5MoeRMSNorm(d, eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """embeds [B, T, D] = embed(x[i+1]); hidden [B, T, D] = the main model's final-normed state at i -> [B, T, D]
        normed MTP states (lm_head gives the logits of x[i+2]). Attention is causal over the T rows."""
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        u = self.layers[0](self.fc(x), position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(u)


def build_models(cfg: dict[str, Any], seed: int):
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    config = hf_config(cfg)
    model = Qwen3_5MoeForCausalLM(config)
    mtp = MTPHead(config)
    for m in mtp.modules():
        model._init_weights(m)
    return model, mtp


def mtp_hidden(model, mtp: MTPHead, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """MTP states for rows i = 0..T-2 of each sequence: token input_ids[i+1], hidden[i], position i."""
    b, t = input_ids.shape
    pos = torch.arange(t - 1, device=input_ids.device).view(1, 1, -1).expand(3, b, -1)
    pe = model.model.rotary_emb(hidden, pos)
    return mtp(model.model.embed_tokens(input_ids[:, 1:]), hidden[:, :-1], pe)


class RouterLogits:
    """Collects every MoE router's logits during a forward (main layers and the MTP layer) for the balance loss."""

    def __init__(self, *modules: nn.Module) -> None:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTopKRouter

        self.logits: list[torch.Tensor] = []
        for module in modules:
            for m in module.modules():
                if isinstance(m, Qwen3_5MoeTopKRouter):
                    m.register_forward_hook(lambda _m, _i, out: self.logits.append(out[0]))

    def pop(self) -> tuple[torch.Tensor, ...]:
        out, self.logits = tuple(self.logits), []
        return out


def losses(model, mtp: MTPHead, x: torch.Tensor, routers: RouterLogits) -> dict[str, torch.Tensor]:
    """x: [B, T+1] token windows -> next-token loss, next-next-token (MTP) loss, load-balancing loss."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    inp, tgt = x[:, :-1], x[:, 1:]
    hidden = model.model(input_ids=inp).last_hidden_state
    logits = model.lm_head(hidden).float()
    main = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    mlogits = model.lm_head(mtp_hidden(model, mtp, inp, hidden)).float()
    mtp_loss = F.cross_entropy(mlogits.reshape(-1, mlogits.shape[-1]), tgt[:, 1:].reshape(-1))
    aux = load_balancing_loss_func(routers.pop(), model.config.num_experts, model.config.num_experts_per_tok)
    return {"main": main, "mtp": mtp_loss, "aux": aux}


# ---- training --------------------------------------------------------------------------------------------------------

def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer(model, mtp, args, device) -> torch.optim.Optimizer:
    params = [p for m in (model, mtp) for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def probe_experts_implementation(model, mtp, data: torch.Tensor, routers: RouterLogits, amp) -> None:
    """transformers' default MoE path (grouped_mm) on this device if one training step runs, else the eager loop."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    experts = [m for mod in (model, mtp) for m in mod.modules() if isinstance(m, Qwen3_5MoeExperts)]
    try:
        with amp:
            parts = losses(model, mtp, data[:2 * 130].view(2, 130), routers)
        (parts["main"] + parts["mtp"]).backward()
    except Exception as e:  # noqa: BLE001 - any failure of the fast path means: use the plain one
        log(f"grouped_mm experts failed here ({type(e).__name__}: {e}); using the eager experts loop")
        for m in experts:
            m.config._experts_implementation = "eager"
        routers.pop()
    for m in (model, mtp):
        m.zero_grad(set_to_none=True)
    log(f"experts implementation: {experts[0].config._experts_implementation}")


def train_step(model, mtp, x: torch.Tensor, routers: RouterLogits, opt, args, amp):
    with amp:
        parts = losses(model, mtp, x, routers)
        loss = parts["main"] + args.mtp_weight * parts["mtp"] + ARCH["router_aux_loss_coef"] * parts["aux"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_([p for m in (model, mtp) for p in m.parameters()], 1.0)
    opt.step()
    return parts, gnorm


def train(model, mtp, data: torch.Tensor, args, device: torch.device,
          heldout: torch.Tensor | None = None) -> dict[str, Any]:
    """Random windows of seq_len + 1 tokens; stops at max_steps or when args.time_budget seconds are spent (the
    learning-rate schedule follows whichever comes first)."""
    model.train(), mtp.train()
    routers = RouterLogits(model, mtp)
    opt = optimizer(model, mtp, args, device)
    data = data.to(device=device, dtype=torch.long)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1, device=device)
    start, step, history, error = time.time(), 0, [], None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    probe_experts_implementation(model, mtp, data, routers, amp)
    budget = args.time_budget
    while step < args.max_steps and time.time() - start < budget:
        progress = max(step / args.max_steps, (time.time() - start) / budget)
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step, progress)
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen).to(device)
        try:
            parts, gnorm = train_step(model, mtp, data[starts[:, None] + offsets], routers, opt, args, amp)
        except Exception:  # keep what was trained so far (one device run is all there is); never at step 0
            if step == 0:
                raise
            log("training step failed, stopping here:\n" + traceback.format_exc())
            error = traceback.format_exc(limit=1)
            break
        step += 1
        if step % args.log_every == 0 or step == 1:
            row = {k: round(float(v.detach()), 4) for k, v in parts.items()} | {
                "step": step, "lr": opt.param_groups[0]["lr"], "gnorm": round(float(gnorm), 3),
                "tokens": step * args.batch_size * args.seq_len, "time": round(time.time() - start, 1)}
            if heldout is not None and step % args.eval_every == 0:  # a learning curve for the model card
                row["heldout_loss"] = evaluate(model, mtp, heldout, args.seq_len, device)["heldout_loss"]
                model.train(), mtp.train()
            history.append(row)
            log(json.dumps(row | {"tok_per_s": round(row["tokens"] / max(row["time"], 1e-9))}))
    last = {k: round(float(v.detach()), 4) for k, v in parts.items()}
    return {"steps": step, "tokens": step * args.batch_size * args.seq_len,
            "train_seconds": round(time.time() - start, 1),
            "final_train_loss": last["main"], "final_train_mtp_loss": last["mtp"], "history": history,
            **({"train_error": error} if error else {})}


@torch.no_grad()
def evaluate(model, mtp, ids: torch.Tensor, seq_len: int, device: torch.device, batch: int = 16) -> dict[str, float]:
    """Held-out next-token loss/perplexity/accuracy and MTP next-next-token loss/accuracy (fp32, windows of seq_len
    tokens that do not overlap; every window's first tokens have less context, as in training)."""
    model.eval(), mtp.eval()
    n = (len(ids) - 1) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{len(ids)} held-out tokens make no window of {seq_len} + 1 tokens: raise --eval-tokens, "
                         "or use a larger corpus")
    windows = ids[: n * (seq_len + 1)].view(n, seq_len + 1).to(device=device, dtype=torch.long)
    tot = {"main": 0.0, "mtp": 0.0, "acc": 0.0, "mtp_acc": 0.0, "n": 0, "n2": 0}
    for i in range(0, n, batch):
        x = windows[i:i + batch]
        inp, tgt = x[:, :-1], x[:, 1:]
        hidden = model.model(input_ids=inp).last_hidden_state
        logits = model.lm_head(hidden).float()
        mlogits = model.lm_head(mtp_hidden(model, mtp, inp, hidden)).float()
        tot["main"] += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
        tot["acc"] += float((logits.argmax(-1) == tgt).sum())
        tot["mtp"] += float(F.cross_entropy(mlogits.flatten(0, 1), tgt[:, 1:].flatten(), reduction="sum"))
        tot["mtp_acc"] += float((mlogits.argmax(-1) == tgt[:, 1:]).sum())
        tot["n"] += tgt.numel()
        tot["n2"] += tgt[:, 1:].numel()
    loss = tot["main"] / tot["n"]
    return {"heldout_tokens": tot["n"], "heldout_loss": round(loss, 4), "heldout_ppl": round(math.exp(loss), 3),
            "heldout_next_token_acc": round(tot["acc"] / tot["n"], 4),
            "heldout_mtp_loss": round(tot["mtp"] / tot["n2"], 4),
            "heldout_mtp_acc": round(tot["mtp_acc"] / tot["n2"], 4)}


def unigram_baseline(train: torch.Tensor, held: torch.Tensor, vocab: int) -> dict[str, float]:
    """Chance levels: always predicting the most frequent training token; the unigram model's perplexity."""
    counts = torch.bincount(train.long(), minlength=vocab).double() + 1
    probs = counts / counts.sum()
    held = held.long()
    return {"most_frequent_token_acc": round(float((held == counts.argmax()).double().mean()), 4),
            "unigram_ppl": round(math.exp(-float(probs[held].log().mean())), 2), "uniform_ppl": vocab}


# ---- output ----------------------------------------------------------------------------------------------------------

def export_tensors(model, mtp) -> dict[str, torch.Tensor]:
    """Checkpoint tensors: bf16 except the parameters the published checkpoints keep in fp32."""
    out = {}
    for prefix, module in (("", model), ("mtp.", mtp)):
        for name, p in module.state_dict().items():
            dtype = torch.float32 if name.endswith(FP32_SUFFIXES) else torch.bfloat16
            out[prefix + name] = p.detach().to("cpu", dtype).contiguous()
    return out


def save_checkpoint(out: Path, model, mtp, tokenizer, cfg: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(export_tensors(model, mtp), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def load_training_modules(ckpt: Path, dtype: torch.dtype = torch.float32):
    """The written checkpoint back into this script's modules (transformers' model + MTPHead)."""
    from safetensors.torch import load_file
    from transformers import Qwen3_5MoeForCausalLM

    model = Qwen3_5MoeForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    model.config._attn_implementation = "sdpa"
    mtp = MTPHead(model.config).to(dtype)
    tensors = load_file(str(ckpt / "model.safetensors"))
    mtp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mtp.")}, strict=True)
    return model, mtp.eval()


def run_facts(args, d: dict[str, Any], model, mtp, device: torch.device) -> dict[str, Any]:
    """What the model card says about the data, the model and the run."""
    return {"params_main": sum(p.numel() for p in model.parameters()),
            "params_mtp": sum(p.numel() for p in mtp.parameters()), "corpus_files": d["files"],
            "corpus_chars": d["chars"], "train_tokens_per_epoch": len(d["train"]), "chat_samples": d["chat_samples"],
            "heldout_files": d["heldout_files"], "heldout_percent": HELDOUT_PERCENT,
            "python": corpus_python(args.corpus_root), "torch": torch.__version__,
            "transformers": transformers_version(), "command": "python tools/train_demo.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "args": {k: v for k, v in vars(args).items() if k != "func"}}


def cmd_train(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    d = build_data(args)
    cfg = config_dict(d["tokenizer"], args.vocab_size)
    model, mtp = build_models(cfg, args.seed)
    model.to(device), mtp.to(device)
    n_main = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    log(f"model: {n_main / 1e6:.2f} M params + MTP {n_mtp / 1e6:.2f} M on {device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}); setup {time.time() - t0:.0f}s")
    if args.total_budget:  # leave time for evaluation and saving inside one device call
        args.time_budget = min(args.time_budget, args.total_budget - (time.time() - t0) - 45)
        log(f"training budget {args.time_budget:.0f}s")
    result = train(model, mtp, d["train"], args, device, d["heldout"][: 32 * (args.seq_len + 1)])
    out = Path(args.out)  # weights first, so that a failure in evaluation loses no training
    save_checkpoint(out, model, mtp, d["tokenizer"], cfg)
    (out / "heldout.txt").write_text(d["heldout_text"])
    metrics = {**{k: v for k, v in result.items() if k != "history"},
               **evaluate(model, mtp, d["heldout"][: args.eval_tokens], args.seq_len, device),
               **unigram_baseline(d["train"], d["heldout"][: args.eval_tokens], args.vocab_size),
               **run_facts(args, d, model, mtp, device), "total_seconds": round(time.time() - t0, 1)}
    log(json.dumps({k: v for k, v in metrics.items() if k not in ("heldout_files", "args")}))
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result["history"]}, indent=1) + "\n")
    from tools.demo_card import write_card

    write_card(out)
    log(f"wrote {out} in {time.time() - t0:.0f}s total")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="build corpus and tokenizer, train, evaluate, write the checkpoint")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--corpus-root", type=corpus_dir, default=str(default_corpus_root()),
                   help="CPython Lib/ directory")
    t.add_argument("--max-files", type=positive_int, default=None, help="use only the first N files (smoke tests)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--chat-samples", type=int, default=6000)
    t.add_argument("--prompt-cut-every", type=int, default=400,
                   help="about one prompt-boundary cut (see prompt_cuts) per this many training characters; 0: none")
    t.add_argument("--seq-len", type=positive_int, default=1024)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.05)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--mtp-weight", type=float, default=0.5, help="weight of the next-next-token loss")
    t.add_argument("--max-steps", type=positive_int, default=1_000_000)
    t.add_argument("--time-budget", type=float, default=420.0, help="seconds of training (the schedule follows it)")
    t.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole command: shortens the training budget by the setup time + 45 s")
    t.add_argument("--eval-tokens", type=positive_int, default=400_000)
    t.add_argument("--log-every", type=positive_int, default=50)
    t.add_argument("--eval-every", type=positive_int, default=200,
                   help="held-out loss (first 32 windows) every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
