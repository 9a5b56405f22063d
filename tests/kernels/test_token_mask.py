"""Grammar masks: the reference against the bit-by-bit definition, the Triton kernel against the reference
(under TRITON_INTERPRET=1 without a GPU; `pytest -m gpu` at the real vocabulary)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (read at @triton.jit time)

triton = pytest.importorskip("triton")

from deltaserve.kernels.token_mask import ref  # noqa: E402
from deltaserve.kernels.token_mask import triton as tk  # noqa: E402

GPU = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def case(n: int, vocab: int, words: int, rows: list[int], device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen).to(device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=gen, dtype=torch.int64)
    bitmask[0, 0] = -1  # all allowed
    bitmask[-1, -1] = 0  # all forbidden
    return logits, torch.tensor(rows, dtype=torch.int64, device=device), bitmask.to(torch.int32).to(device)


@pytest.mark.parametrize("vocab,words", [(100, 4), (100, 3), (64, 2)])  # mask wider, narrower, exact
def test_reference_is_the_bitwise_definition(vocab, words):
    logits, rows, bitmask = case(5, vocab, words, [3, 0, 4], "cpu")
    out = ref.apply_token_bitmask_(logits=logits.clone(), rows=rows, bitmask=bitmask)
    for r, row in enumerate(rows.tolist()):
        for t in range(vocab):
            allowed = t < 32 * words and (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if allowed else float("-inf"))
    untouched = [1, 2]
    assert torch.equal(out[untouched], logits[untouched])


@pytest.mark.parametrize("vocab,words", [(100, 4), (100, 3), (5000, 157)])
def test_kernel_matches_reference(vocab, words):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, rows, bitmask = case(6, vocab, words, [5, 1, 2], device, seed=vocab)
    want = ref.apply_token_bitmask_(logits=logits.clone(), rows=rows, bitmask=bitmask)
    got = tk.apply_token_bitmask_(logits=logits.clone(), rows=rows, bitmask=bitmask)
    assert torch.equal(got, want)


def test_kernel_rejects_a_mask_of_the_wrong_type():
    logits, rows, bitmask = case(2, 64, 2, [0], "cpu")
    with pytest.raises(ValueError, match="bitmask must be int32"):
        tk.apply_token_bitmask_(logits=logits, rows=rows, bitmask=bitmask.long())


@GPU
@needs_cuda
def test_kernel_at_the_real_vocabulary_gpu():
    vocab = 248320
    logits, rows, bitmask = case(64, vocab, vocab // 32, list(range(1, 64, 2)), "cuda", seed=7)
    want = ref.apply_token_bitmask_(logits=logits.clone(), rows=rows, bitmask=bitmask)
    assert torch.equal(tk.apply_token_bitmask_(logits=logits.clone(), rows=rows, bitmask=bitmask), want)
