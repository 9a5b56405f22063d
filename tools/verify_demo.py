"""Check the demo model through deltaserve: load the checkpoint with deltaserve's loader, run its model, caches and
`mtp_forward` on held-out text, and compare the main and MTP logits with tools/train_demo.py's training math
(transformers' Qwen3_5MoeForCausalLM + the script's MTPHead), both fp32 on CPU; report the MTP head's next-next-token
accuracy measured through deltaserve.

    python tools/verify_demo.py src/deltaserve/demo_model [--update-metrics]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tools.demo_card import write_card
from tools.train_demo import checkpoint_dir, load_training_modules, mtp_hidden, positive_int


@torch.no_grad()
def deltaserve_logits(ckpt: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """deltaserve's main logits [T, V] and MTP draft logits [T-1, V] (row i predicts ids[i+2]) of one sequence,
    in fp32 on CPU, through the engine's model, caches and ForwardBatch."""
    from deltaserve.cache.tensors import CacheShape, ModelCache
    from deltaserve.config import ModelConfig
    from deltaserve.engine.device_inputs import build_forward_batch
    from deltaserve.models.loader import load_model

    model = load_model(ModelConfig.from_hf(ckpt), dtype=torch.float32, with_mtp=True)
    page = 16
    pages = -(-len(ids) // page)
    cache = ModelCache(model.config, CacheShape(num_pages=pages, page_size=page, num_slots=1, kv_dtype=torch.float32,
                                                conv_dtype=torch.float32), device="cpu", with_mtp=True)
    batch = build_forward_batch(query_lens=[len(ids)], context_lens=[0], state_slots=[0],
                                block_tables=[list(range(pages))], page_size=page, logits_indices=list(range(len(ids))))
    x = torch.tensor(ids)
    hidden = model(x, batch, cache)
    next_ids = torch.cat([x[1:], x[-1:]])  # the last row has no next token; its draft is dropped below
    draft = model.compute_logits(model.mtp_forward(next_ids, hidden, batch, cache))
    return model.compute_logits(hidden), draft[:-1]


@torch.no_grad()
def reference_logits(ckpt: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two tensors from this script's training modules (transformers + MTPHead), fp32."""
    model, mtp = load_training_modules(ckpt)
    x = torch.tensor([ids])
    hidden = model.model(input_ids=x).last_hidden_state
    return model.lm_head(hidden)[0].float(), model.lm_head(mtp_hidden(model, mtp, x, hidden))[0].float()


def heldout_windows(ckpt: Path, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok.encode((ckpt / "heldout.txt").read_text(), add_special_tokens=False)
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def cmd_verify(args) -> int:
    ckpt = Path(args.ckpt)
    windows = heldout_windows(ckpt, args.seq_len)[: args.windows]
    if not windows:  # else the accuracy below divides by zero
        sys.exit(f"{ckpt / 'heldout.txt'} is shorter than one window of --seq-len {args.seq_len} tokens: pass a "
                 "smaller --seq-len")
    worst_main = worst_mtp = 0.0
    hits = hits_ref = total = 0
    for ids in windows:
        main, draft = deltaserve_logits(ckpt, ids)
        ref_main, ref_draft = reference_logits(ckpt, ids)
        worst_main = max(worst_main, float((main - ref_main).abs().max()))
        worst_mtp = max(worst_mtp, float((draft - ref_draft).abs().max()))
        target = torch.tensor(ids[2:])
        hits += int((draft[:-1].argmax(-1) == target).sum())  # the last row's target is past the window
        hits_ref += int((ref_draft[:-1].argmax(-1) == target).sum())
        total += len(target)
    result = {"verify_windows": len(windows), "verify_seq_len": args.seq_len,
              "verify_max_abs_diff_main_logits": worst_main, "verify_max_abs_diff_mtp_logits": worst_mtp,
              "deltaserve_mtp_acc_heldout_sample": round(hits / total, 4),
              "training_code_mtp_acc_heldout_sample": round(hits_ref / total, 4), "verify_tokens": total}
    print(json.dumps(result, indent=1))
    metrics_path = ckpt / "metrics.json"
    if args.update_metrics and metrics_path.is_file():
        metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), **result}, indent=1) + "\n")
        write_card(ckpt)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=checkpoint_dir,
                   help="checkpoint directory written by tools/train_demo.py (with heldout.txt)")
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--windows", type=positive_int, default=8)
    p.add_argument("--update-metrics", action="store_true",
                   help="merge the results into DIR/metrics.json and rewrite DIR/README.md")
    return cmd_verify(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
