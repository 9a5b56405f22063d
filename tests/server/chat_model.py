"""A tiny Qwen3.5 checkpoint trained (in seconds, on CPU) to reply with Qwen3.5 markup to a few fixed chats.

A random model never writes <think> or <tool_call>, so the end-to-end parser tests need a model that does. This one
is a real Qwen3.5 (one Gated DeltaNet layer, one gated-attention layer) trained with transformers to memorise the
replies below after their exact prompts; greedy decoding in deltaserve then reproduces the markup. Its tokenizer is
the demo's byte-level one; its chat template is a short ChatML one (tools listed by name, Qwen3.5's thinking switch)
so that training sequences stay short.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltaserve.demo import write_byte_tokenizer

TEMPLATE = """\
{%- if tools %}<|im_start|>system
tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


@dataclass(frozen=True)
class Chat:
    """A memorised exchange: the request's messages / tools / template kwargs, and the reply the model learns."""

    user: str
    reply: str
    tools: tuple[dict[str, Any], ...] = ()
    enable_thinking: bool | None = None

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": self.user}]}
        if self.tools:
            body["tools"] = list(self.tools)
        if self.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        return body


TOOL_CHAT = Chat("Weather in Paris?", "The user asks about Paris.\n</think>\n\nLet me check.\n<tool_call>\n"
                 "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
                 "</function>\n</tool_call><|im_end|>", tools=(WEATHER_TOOL,))
THINK_CHAT = Chat("Say hi", "Greet them.\n</think>\n\nHello there!<|im_end|>")
NO_THINK_CHAT = Chat("Say hi", "Hi!<|im_end|>", enable_thinking=False)
CHATS = (TOOL_CHAT, THINK_CHAT, NO_THINK_CHAT)

CONFIG = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
              intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
MARGIN = 2.0  # every target token must beat the runner-up logit by this much: greedy then cannot flip on CPU


def _sequences(tok) -> list[tuple[list[int], list[int]]]:
    out = []
    for chat in CHATS:
        kwargs = {} if chat.enable_thinking is None else {"enable_thinking": chat.enable_thinking}
        prompt = tok.apply_chat_template([{"role": "user", "content": chat.user}], tools=list(chat.tools) or None,
                                         add_generation_prompt=True, tokenize=False, **kwargs)
        out.append((tok.encode(prompt, add_special_tokens=False), tok.encode(chat.reply, add_special_tokens=False)))
    return out


def _batch(seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)  # right padding: causal, so it never leaks back
    return ids, labels


def _margin_ok(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    target, logits = labels[:, 1:], logits[:, :-1].detach()
    mask = target != -100
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, target.clamp(min=0).unsqueeze(-1), float("-inf")).amax(-1)
    return bool(((picked - others)[mask] > MARGIN).all())


def _torch_gdn_paths():
    """transformers swaps in flash-linear-attention's Triton kernels when that package is installed (GPU only);
    training here runs on CPU, so use the pure-torch functions those wrappers fall back to."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    return m, {n: getattr(m, n) for n in dir(m) if n.startswith("torch_") and hasattr(getattr(m, n), "__wrapped__")}


def train_chat_checkpoint(out: Path, max_steps: int = 400, seed: int = 0) -> Path:
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    write_byte_tokenizer(out)
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    ids, labels = _batch(_sequences(tok))
    torch.manual_seed(seed)
    model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**CONFIG, eos_token_id=258))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    module, wrapped = _torch_gdn_paths()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains little from more, and spinning threads suffer on a busy CPU
    try:
        for name, fn in wrapped.items():
            setattr(module, name, inspect.unwrap(fn))
        for _ in range(max_steps):
            result = model(input_ids=ids, labels=labels)
            if _margin_ok(result.logits, labels):
                break
            opt.zero_grad()
            result.loss.backward()
            opt.step()
        else:
            raise RuntimeError(f"the test chat model did not memorise its replies in {max_steps} steps")
    finally:
        torch.set_num_threads(threads)
        for name, fn in wrapped.items():
            setattr(module, name, fn)
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 258]}))
    return out
