"""The small model the package runs when no MODEL is given.

The default is the project's trained demo model, shipped inside the package (`deltaserve/demo_model/`): a ~8M-parameter
Qwen3.5-MoE (Gated DeltaNet + gated attention layers, MoE with a shared expert, an MTP head) trained from scratch on
the Python standard library's sources by `tools/train_demo.py`, then fine-tuned on a synthetic chat set by
`tools/finetune_demo_chat.py`; its model card is `demo_model/README.md`. It writes Python-like text and chats in
Qwen3.5's markup (a closed <think> block, <|im_end|>, Qwen3-Coder XML tool calls), so every path of the engine and
of the server's reasoning and tool-call parsing runs on real activations without a download.

A random checkpoint of the same architecture (byte-level tokenizer, the same ChatML template) can still be created
deterministically (`random_demo_model_dir`, `write_demo_checkpoint`) for tests that need a tiny model; it is also the
fallback when the shipped files are missing (a source tree without the package data), with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SHIPPED_DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_NAME = "demo-random-moe-v1"  # cache directory name of the random checkpoint
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>"]

DEMO_CONFIG = {
    "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
    "vocab_size": 320, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "tie_word_embeddings": False, "mtp_num_hidden_layers": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "hidden_act": "silu", "dtype": "float32",
}

# ChatML with Qwen3.5's thinking switch and tool listing (written for this project).
CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

To call a function, reply with:
<tool_call>
<function=example_function_name>
<parameter=example_parameter>
value
</parameter>
</function>
</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
<function={{ call.function.name }}>
{% for k, v in (call.function.arguments.items() if call.function.arguments is mapping else []) %}<parameter={{ k }}>
{{ v }}
</parameter>
{% endfor %}</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""


def cache_root() -> Path:
    from deltaserve.config import env_flag

    root = env_flag("DELTASERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "deltaserve")
    return Path(root)


def demo_model_dir() -> Path:
    """The default model's directory: the shipped trained demo model, or (when its files are missing) the random
    demo checkpoint."""
    if (SHIPPED_DEMO_DIR / "config.json").is_file() and (SHIPPED_DEMO_DIR / "model.safetensors").is_file():
        return SHIPPED_DEMO_DIR
    log.warning("the shipped demo model is missing from %s (package data not installed?); using a random demo "
                "checkpoint, whose text is noise", SHIPPED_DEMO_DIR)
    return random_demo_model_dir()


def random_demo_model_dir() -> Path:
    """A random demo checkpoint's directory, created on first use under the cache directory (atomically, so parallel
    first runs are safe)."""
    target = cache_root() / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=target.parent))
    write_demo_checkpoint(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_demo_checkpoint(out: Path) -> None:
    """Write the random demo checkpoint (DEMO_CONFIG, deterministic weights, byte-level tokenizer) into `out`."""
    import torch
    from safetensors.torch import save_file

    from deltaserve.config import ModelConfig
    from deltaserve.models.loader import checkpoint_state_dict, load_model

    config = ModelConfig.from_dict(DEMO_CONFIG)
    model = load_model(config, load_format="dummy", dtype=torch.float32, with_mtp=True)
    save_file({n: p.contiguous() for n, p in checkpoint_state_dict(model).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    eos = write_byte_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**DEMO_CONFIG, "eos_token_id": eos[0]}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
    (out / "README.md").write_text("# deltaserve demo model (random weights)\n\nA randomly initialised Qwen3.5-MoE "
                                   "checkpoint made by `deltaserve.demo`; it exercises the engine, its text is noise.\n")


def write_byte_tokenizer(out: Path) -> list[int]:
    """Byte-level tokenizer: 256 byte tokens, no merges, then the ChatML special tokens (ids 256... in
    SPECIAL_TOKENS order). Returns the stop ids [<|endoftext|>, <|im_end|>]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _byte_of(ch))
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_to_char)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return [fast.convert_tokens_to_ids("<|endoftext|>"), fast.convert_tokens_to_ids("<|im_end|>")]


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]
