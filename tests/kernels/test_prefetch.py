"""The weight prefetch into L2 on a side stream (kernels/_prefetch.py): a hint that must change nothing. CPU: the
layers' calls are no-ops (no Triton, no stream). GPU tier: the kernel leaves every tensor as it was (odd sizes,
tensors too small to prefetch, misaligned views it must skip), and a chain of GEMVs with a prefetch in its middle,
captured in a CUDA graph and replayed, gives the bits of the same chain without it."""

from __future__ import annotations

import pytest
import torch

from deltaserve.layers.linear import Linear, join_prefetches

gpu = pytest.mark.gpu


def test_prefetch_is_a_no_op_on_cpu():
    layer = Linear(64, 32, dtype=torch.float32)
    before = layer.weight.detach().clone()
    layer.prefetch(tokens=1)
    join_prefetches(before)
    assert torch.equal(layer.weight, before)


def _cuda_sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs an sm_90+ GPU (the bulk prefetch)")
    from deltaserve.kernels import _prefetch
    return _prefetch


@gpu
def test_prefetch_leaves_tensors_unchanged(monkeypatch):
    _prefetch = _cuda_sm90()
    monkeypatch.setattr(_prefetch, "ENABLED", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(4097, 1001, device="cuda", generator=g).to(torch.bfloat16)  # not a multiple of 16 bytes
    words = torch.randint(0, 1 << 30, (12288, 257), device="cuda", generator=g, dtype=torch.int32)
    small = torch.randn(7, device="cuda", generator=g)  # below MIN_BYTES: skipped
    view = big.view(-1)[3:]  # 6 bytes into its storage: skipped
    tensors = [big, words, small, view]
    want = [t.clone() for t in tensors]
    _prefetch.prefetch_l2(tensors, tokens=1)
    _prefetch.join(big.device)
    torch.cuda.synchronize()
    assert all(torch.equal(t, w) for t, w in zip(tensors, want))
    assert not _prefetch._pending


def _chain(x, layers):
    """in_proj, a prefetch of out_proj's weights, a few small kernels, out_proj: a GDN layer's order."""
    a, b = layers
    h = a(x)
    b.prefetch(tokens=x.shape[0])
    h = torch.nn.functional.silu(h) * 0.5 + h.square().mean(dim=-1, keepdim=True)
    out = b(h)
    join_prefetches(out)
    return out


@gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_graph_with_prefetch_equals_without(monkeypatch, rows):
    _prefetch = _cuda_sm90()
    torch.manual_seed(0)
    layers = [Linear(4096, 12288, dtype=torch.bfloat16, device="cuda"),
              Linear(12288, 4096, dtype=torch.bfloat16, device="cuda")]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0, 0.02)
        inputs = [torch.randn(rows, 4096, device="cuda").to(torch.bfloat16) for _ in range(3)]
        monkeypatch.setattr(_prefetch, "ENABLED", False)
        want = [_chain(x, layers).clone() for x in inputs]
        monkeypatch.setattr(_prefetch, "ENABLED", True)
        for x, w in zip(inputs, want):  # eager, with the side stream
            assert torch.equal(_chain(x, layers), w)
        static = inputs[0].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(static, layers)
        for _ in range(2):
            for x, w in zip(inputs, want):
                static.copy_(x)
                graph.replay()
                assert torch.equal(out, w)
