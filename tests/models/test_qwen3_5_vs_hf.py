"""The model against Hugging Face transformers' own Qwen3.5 implementation on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch

from deltaserve.config import ModelConfig
from deltaserve.models.loader import load_model
from tests.models.factory import SPECS, TinySpec, save_checkpoint
from tests.models.simple_runner import SimpleRunner

REL_TOL = 1e-4  # max abs diff relative to the logits' scale (max abs logit), fp32


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def pair(request, tmp_path_factory):
    spec: TinySpec = request.param
    path = tmp_path_factory.mktemp(spec.name)
    hf = save_checkpoint(spec, path)
    ours = load_model(ModelConfig.from_hf(path), dtype="float32")
    return spec, hf, ours


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= REL_TOL * scale, f"max abs diff {diff:.3g} > {REL_TOL} x logit scale {scale:.3g}"


def prompt(n: int, seed: int = 0, vocab: int = 160) -> list[int]:
    """Random ids, never 0 (generate() below treats 0 as padding)."""
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids])).logits[0].float()


def test_full_sequence_logits_match(pair):
    _, hf, ours = pair
    ids = prompt(150)
    got = SimpleRunner(ours).step({0: ids}, all_logits=True)[0]
    assert_logits_close(got, hf_logits(hf, ids))


@pytest.mark.parametrize("split", [1, 7, 63, 64, 65, 100])
def test_prefill_then_decode_matches_full_prefill(pair, split):
    _, _, ours = pair
    ids = prompt(110, seed=1)
    full = SimpleRunner(ours).step({0: ids}, all_logits=True)[0]
    runner = SimpleRunner(ours)
    parts = [runner.step({0: ids[:split]}, all_logits=True)[0]]
    for tok in ids[split:]:
        parts.append(runner.step({0: [tok]})[0])
    assert_logits_close(torch.cat(parts), full)


def test_chunked_prefill_matches_full_prefill(pair):
    _, _, ours = pair
    ids = prompt(200, seed=2)
    full = SimpleRunner(ours).step({0: ids}, all_logits=True)[0]
    runner = SimpleRunner(ours)
    bounds = [0, 3, 67, 130, 131, 200]
    parts = [runner.step({0: ids[a:b]}, all_logits=True)[0] for a, b in zip(bounds, bounds[1:])]
    assert_logits_close(torch.cat(parts), full)


def test_varlen_batch_matches_each_sequence_alone(pair):
    _, _, ours = pair
    lens = [1, 5, 64, 65, 130]
    seqs = {i: prompt(n, seed=10 + i) for i, n in enumerate(lens)}
    batched = SimpleRunner(ours).step(seqs, all_logits=True)
    for i, ids in seqs.items():
        alone = SimpleRunner(ours).step({0: ids}, all_logits=True)[0]
        assert_logits_close(batched[i], alone)


def test_mixed_prefill_and_decode_batch(pair):
    """Sequences at different stages share one flat batch: decodes of some, prefill chunks of others."""
    _, _, ours = pair
    a, b, c = prompt(40, seed=20), prompt(70, seed=21), prompt(9, seed=22)
    runner = SimpleRunner(ours)
    runner.step({0: a[:39], 1: b[:20]})
    mixed = runner.step({0: a[39:], 1: b[20:], 2: c}, all_logits=True)
    for sid, ids, start in ((0, a, 39), (1, b, 20), (2, c, 0)):
        alone = SimpleRunner(ours).step({0: ids}, all_logits=True)[0]
        assert_logits_close(mixed[sid], alone[start:])


def test_greedy_generation_matches_transformers(pair):
    _, hf, ours = pair
    ids = prompt(20, seed=3)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()
    got = SimpleRunner(ours).generate_greedy(0, ids, 32)
    assert got == expected
