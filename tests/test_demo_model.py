"""The shipped demo model (src/deltaserve/demo_model, made by tools/train_demo.py and tools/finetune_demo_chat.py): the
default model, a real Qwen3.5-MoE checkpoint with an MTP head, that writes Python, matches transformers token for token,
whose MTP head predicts the token after next far above chance, and that chats in Qwen3.5 markup the server parses. The
figures it is held to are those of its model card."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltaserve.demo import SHIPPED_DEMO_DIR, demo_model_dir

DEMO = SHIPPED_DEMO_DIR
SPEC_MTP_TENSORS = [  # docs/MODEL.md, "Checkpoint layout", fused-expert form
    "mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
    "mtp.layers.0.input_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight",
    *(f"mtp.layers.0.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
    "mtp.layers.0.mlp.gate.weight", "mtp.layers.0.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.down_proj",
    *(f"mtp.layers.0.mlp.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")),
    "mtp.layers.0.mlp.shared_expert_gate.weight",
]
WINDOW = 512


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DEMO / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


@pytest.fixture(scope="module")
def heldout_windows(tokenizer) -> list[list[int]]:
    """Two windows of held-out text (files never trained on), tokenized as a prompt would be."""
    ids = tokenizer.encode((DEMO / "heldout.txt").read_text(), add_special_tokens=False)
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(2)]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
    from deltaserve import LLM

    return LLM(None, dtype="float32", device="cpu")  # None: the default model


@pytest.fixture(scope="module")
def logits(heldout_windows) -> list[dict[str, torch.Tensor]]:
    """Per window: deltaserve's main and MTP logits and the training code's (transformers + the MTP module of
    tools/train_demo.py)."""
    from tools import verify_demo

    out = []
    for ids in heldout_windows:
        main, draft = verify_demo.deltaserve_logits(DEMO, ids)
        ref_main, ref_draft = verify_demo.reference_logits(DEMO, ids)
        out.append({"ids": torch.tensor(ids), "main": main, "draft": draft, "ref_main": ref_main,
                    "ref_draft": ref_draft})
    return out


def test_shipped_checkpoint_is_the_default_model():
    from safetensors import safe_open

    from deltaserve.config import ModelConfig

    assert demo_model_dir() == DEMO
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size < 40e6, f"the shipped demo model is {size / 1e6:.1f} MB; keep it under 40 MB"
    config = ModelConfig.from_hf(DEMO)
    assert config.architecture == "Qwen3_5MoeForCausalLM" and config.is_moe and config.mtp_num_hidden_layers == 1
    assert {"linear_attention", "full_attention"} == set(config.layer_types)
    assert set(config.eos_token_ids) == {4087, 4089}  # <|endoftext|>, <|im_end|>
    with safe_open(str(DEMO / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(SPEC_MTP_TENSORS) == {n for n in names if n.startswith("mtp.")}
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "heldout.txt"):
        assert (DEMO / name).is_file(), name


def test_model_card_states_the_measured_numbers(metrics):
    card = (DEMO / "README.md").read_text()
    assert f"{metrics['heldout_ppl']:.2f}" in card
    assert f"{metrics['heldout_mtp_acc']:.1%}" in card
    assert f"{metrics['deltaserve_mtp_acc_heldout_sample']:.1%}" in card
    assert "Python Software Foundation License" in card and metrics["command"] in card


def test_transformers_loads_it_as_qwen3_5_moe(hf_model):
    assert type(hf_model).__name__ == "Qwen3_5MoeForCausalLM"
    assert hf_model.config.model_type == "qwen3_5_moe_text"


def test_cli_generate_writes_python():
    env = {**os.environ, "DELTASERVE_CACHE_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / "ds-demo-test")}
    out = subprocess.run([sys.executable, "-m", "deltaserve.cli", "generate", "--prompt", "def ", "--temperature", "0",
                          "--max-tokens", "40", "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    first, *rest = text.splitlines()
    assert re.fullmatch(r"def [A-Za-z_]\w*\(.*\):", first), text  # a function header ...
    assert any(line.startswith("    ") for line in rest), text  # ... with an indented body


def test_heldout_perplexity_far_below_uniform(logits, metrics):
    nll = torch.cat([F.cross_entropy(w["main"][:-1], w["ids"][1:], reduction="none") for w in logits])
    ppl = math.exp(float(nll.mean()))
    vocab = logits[0]["main"].shape[-1]
    assert ppl < vocab / 100, f"held-out perplexity {ppl:.1f} vs uniform {vocab}"
    assert ppl < metrics["unigram_ppl"] / 20
    assert metrics["heldout_ppl"] < vocab / 100  # the card's figure, over all held-out files


def test_deltaserve_main_and_mtp_logits_match_the_training_code(logits):
    for w in logits:
        torch.testing.assert_close(w["main"], w["ref_main"], rtol=0, atol=2e-4)
        torch.testing.assert_close(w["draft"], w["ref_draft"], rtol=0, atol=2e-4)


def test_mtp_head_predicts_the_token_after_next(logits, metrics):
    """Row i of the MTP head sees token i+1 and the main model's hidden state at i; it must predict token i+2."""
    hits = sum(int((w["draft"][:-1].argmax(-1) == w["ids"][2:]).sum()) for w in logits)
    total = sum(len(w["ids"]) - 2 for w in logits)
    acc = hits / total
    chance = metrics["most_frequent_token_acc"]
    assert acc > 0.4 and acc > 10 * chance, f"MTP next-next-token accuracy {acc:.3f} (chance {chance:.3f})"
    assert abs(acc - metrics["deltaserve_mtp_acc_heldout_sample"]) < 0.1  # same text as the card's figure


@pytest.mark.parametrize("prompt", ["def ", "import os\n", "class Parser:\n    def __init__(self"])
def test_greedy_output_equals_transformers(prompt, tokenizer, hf_model, llm):
    from deltaserve import SamplingParams

    n = 32
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[4087, 4089],
                                pad_token_id=4087)[0, len(ids):].tolist()
    got = list(llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0))[0].outputs[0].token_ids)
    assert got == ref, (tokenizer.decode(got), tokenizer.decode(ref))


# ---- chat markup (tools/finetune_demo_chat.py): held-out phrasings and values, greedy, the server's parsers -------

def _chat(kind: str, user: str, thinking: bool, tools: tuple[str, ...] = (), expect: dict | None = None):
    from tools.demo_chat_data import TOOLS_BY_NAME, Sample

    return Sample(kind, [{"role": "user", "content": user}], "", thinking,
                  [TOOLS_BY_NAME[t].schema() for t in tools] or None, expect or {})


# Held-out phrasings with held-out values (words, country, city the fine-tune never saw) that the shipped model handles:
# a regression check on the markup; the card's rates say how often it gets held-out prompts right in general.
HELDOUT_CHATS = {
    "think": _chat("plain", "Please say the words marble violin back to me.", True),
    "no_think": _chat("plain", "Which city is the seat of government of Croatia?", False),
    "tool": _chat("tool", "Could you look up the current conditions in Chennai?", True, ("run_python", "get_weather"),
                  {"name": "get_weather", "arguments": {"city": "Chennai"}}),
}


@pytest.fixture(scope="module")
def chat_scores(llm, tokenizer) -> dict[str, dict[str, bool]]:
    """Each held-out chat's reply, generated in one batch and scored as tools/eval_demo_chat.py scores them."""
    from tools.eval_demo_chat import generate, score

    completions = generate(llm, list(HELDOUT_CHATS.values()), max_tokens=128)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {name: score(tokenizer, s, c, im_end) | {"text": c.text}
            for (name, s), c in zip(HELDOUT_CHATS.items(), completions)}


@pytest.mark.parametrize("name", ["think", "no_think"])
def test_chat_reply_closes_its_think_block_and_ends_its_turn(chat_scores, name):
    row = chat_scores[name]
    assert row["ended"], f"no <|im_end|> within 128 tokens: {row['text']!r}"
    assert row.get("think_closed", True), f"<think> left open: {row['text']!r}"


def test_tool_prompt_gets_a_call_the_server_parser_accepts(chat_scores):
    row = chat_scores["tool"]
    assert row["think_closed"] and row["ended"], row["text"]
    assert row["tool_call"] and row["tool_args_exact"], f"expected get_weather(city=Chennai): {row['text']!r}"


def test_model_card_states_the_chat_rates(metrics):
    card = (DEMO / "README.md").read_text()
    scores = metrics["chat_eval"]["scores"]
    for key in ("think_closed", "ended", "tool_call"):
        assert f"**{scores[key]['rate']:.0%}** | {scores[key]['hits']} / {scores[key]['n']}" in card, key
    assert metrics["finetune"]["command"] in card and metrics["chat_eval"]["command"] in card


def test_model_card_is_what_demo_card_writes(tmp_path, capsys):
    """The shipped card is tools/demo_card.py's output for the shipped files (so a change goes through its
    template), and a directory that is not a model is refused by argparse in one line, not a traceback."""
    from tools import demo_card

    for name in ("config.json", "metrics.json"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    (tmp_path / "model.safetensors").symlink_to(DEMO / "model.safetensors")
    demo_card.main([str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == (DEMO / "README.md").read_text()
    with pytest.raises(SystemExit) as stop:
        demo_card.main([str(tmp_path / "missing")])
    assert stop.value.code == 2 and "missing/config.json not found" in capsys.readouterr().err


def test_demo_tools_refuse_a_bad_path_or_size_in_one_line(tmp_path, capsys):
    """A directory without config.json, a corpus without Python files or a size of 0 is a usage error naming the
    argument (they failed with tracebacks from huggingface_hub, torch.randint or SamplingParams)."""
    from tools import eval_demo_chat, finetune_demo_chat, train_demo, verify_demo

    cases = [
        (verify_demo.main, [str(tmp_path)], f"argument ckpt: {tmp_path} has no config.json"),
        (eval_demo_chat.main, [str(tmp_path)], f"argument ckpt: {tmp_path} has no config.json"),
        (eval_demo_chat.main, [str(DEMO), "--max-tokens", "0"], "argument --max-tokens: 0 is below 1"),
        (finetune_demo_chat.main, ["--from", str(tmp_path), "--out", str(tmp_path / "out")],
         f"argument --from: {tmp_path} has no config.json"),
        (train_demo.main, ["train", "--out", str(tmp_path / "out"), "--corpus-root", str(tmp_path)],
         f"argument --corpus-root: {tmp_path} holds no *.py files"),
        # the held-out code is measured after training in 1025-token windows: fewer tokens divided by zero there
        (finetune_demo_chat.main, ["--out", str(tmp_path / "out"), "--eval-tokens", "512"],
         "--eval-tokens 512: the held-out code is measured in windows of 1024 + 1 tokens"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()


def test_verify_demo_names_a_held_out_text_shorter_than_a_window(tmp_path):
    """A small corpus's heldout.txt can be shorter than --seq-len: that is named, not a ZeroDivisionError."""
    from tools import verify_demo

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    (tmp_path / "heldout.txt").write_text("def f():\n    return 1\n")
    with pytest.raises(SystemExit, match=r"heldout.txt is shorter than one window of --seq-len 512 tokens"):
        verify_demo.main([str(tmp_path)])
