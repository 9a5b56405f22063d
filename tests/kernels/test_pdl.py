"""Programmatic Dependent Launch (kernels/_device.py's switch, kernels/_pdl.py in the kernels): DELTASERVE_PDL
parsing, the default, the gating by device (sm_90+, CUDA >= 12.3, never CPU or the interpreter), and that the switch
is inert on CPU. GPU tier: a chain of the participating kernels at model shapes (norms, the skinny linear with and
without split-K, MoE routing and experts) launched with PDL, eagerly and replayed from a CUDA graph, gives the bits of
the same chain without PDL. benchmarks/pdl_check.py shows the PTX (griddepcontrol present when on, main's PTX
when off)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deltaserve.kernels import _device

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def switch(monkeypatch):
    """A supported-looking CUDA device (sm_90, CUDA 12.4, compiled kernels), whatever this machine is."""
    monkeypatch.setattr(_device, "capability", lambda device: (9, 0))
    monkeypatch.setattr(_device, "_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(_device, "_interpreting", lambda: False)
    monkeypatch.setattr(_device, "PDL", None)
    monkeypatch.setattr(_device, "_launch_kwargs", {})  # pdl_launch's cache, filled under the fakes above
    return monkeypatch


@pytest.mark.parametrize("value, want", [("", None), ("auto", None), ("1", True), ("on", True), (" TRUE ", True),
                                         ("yes", True), ("0", False), ("off", False), ("False", False), ("no", False)])
def test_env_values_parse(value, want):
    assert _device.parse_pdl(value) is want


def test_unknown_env_value_is_an_error():
    with pytest.raises(ValueError, match="DELTASERVE_PDL"):
        _device.parse_pdl("sometimes")


@pytest.mark.parametrize("env, want", [(None, "None"), ("0", "False")])
def test_switch_reads_the_env_at_import(env, want):
    environ = {k: v for k, v in os.environ.items() if k != "DELTASERVE_PDL"}
    if env is not None:
        environ["DELTASERVE_PDL"] = env
    out = subprocess.run([sys.executable, "-c", "from deltaserve.kernels import _device; print(_device.PDL)"],
                         env=environ, capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == want


def test_default_is_on_only_at_sm90_and_later(switch):
    assert _device.pdl_enabled(CUDA) and _device.pdl_launch(CUDA) == {"PDL": True, "launch_pdl": True}
    for cap in [(8, 0), (8, 9)]:
        switch.setattr(_device, "capability", lambda device, cap=cap: cap)
        assert not _device.pdl_supported(CUDA) and not _device.pdl_enabled(CUDA)
    switch.setattr(_device, "capability", lambda device: (10, 0))
    assert _device.pdl_enabled(CUDA)


def test_old_cuda_or_the_interpreter_turn_it_off(switch):
    switch.setattr(_device, "_cuda_version", lambda: (12, 2))
    assert not _device.pdl_enabled(CUDA)
    switch.setattr(_device, "_cuda_version", lambda: (12, 3))
    assert _device.pdl_enabled(CUDA)
    switch.setattr(_device, "_interpreting", lambda: True)
    assert not _device.pdl_enabled(CUDA)


def test_switch_off_wins_and_on_is_never_forced(switch):
    switch.setattr(_device, "PDL", False)
    assert _device.pdl_launch(CUDA) == {"PDL": False, "launch_pdl": False}
    switch.setattr(_device, "PDL", True)
    assert _device.pdl_enabled(CUDA)
    switch.setattr(_device, "capability", lambda device: (8, 0))
    assert not _device.pdl_enabled(CUDA)  # griddepcontrol would not compile before sm_90


@pytest.mark.parametrize("setting", [None, True])
def test_inert_on_cpu(switch, setting):
    """CPU tensors (the references, and the Triton interpreter's inputs) never get PDL, whatever the switch says;
    a kernel run through the interpreter with the switch on matches the reference."""
    switch.setattr(_device, "PDL", setting)
    assert _device.pdl_launch(CPU) == {"PDL": False, "launch_pdl": False}
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter half runs where there is no GPU")
    from deltaserve.kernels.norm import ref
    from deltaserve.kernels.norm import triton as norm

    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(norm.rms_norm(x=x, weight=w, eps=1e-6), ref.rms_norm(x=x, weight=w, eps=1e-6))


# ------------------------------------------------------------------------------------------------------ GPU tier


def _chain_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Decode-like shapes that reach every tile_config branch of the skinny linear and the per-pair MoE kernels."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    E, D, I = 64, 2048, 512
    return {"norm": rnd(4096, scale=0.1), "wide": rnd(24576, 4096),  # 64-column tiles, no split
            "narrow": rnd(4096, 12288),  # split-K
            "down": rnd(2048, 4096),  # split-K, BN 32
            "router": rnd(E, 2048), "w13": rnd(E, 2 * I, D), "w2": rnd(E, D, I), "sw13": rnd(2 * 512, D),
            "sw2": rnd(D, 512), "sgate": rnd(1, D), "norm2": rnd(D, scale=0.1)}


def _chain(x: torch.Tensor, res: torch.Tensor, w: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each kernel reads what the one before it wrote (the race PDL could introduce if a wait were misplaced)."""
    from deltaserve.kernels.activation.triton import silu_and_mul
    from deltaserve.kernels.linear.gpu import linear
    from deltaserve.kernels.moe.triton import fused_moe_pairs, moe_topk_softmax
    from deltaserve.kernels.norm.triton import rms_norm

    y, h = rms_norm(x=x, weight=w["norm"], eps=1e-6, residual=res)
    a = linear(x=y, weight=w["wide"])
    b = linear(x=silu_and_mul(x=a), weight=w["narrow"])
    c = linear(x=b, weight=w["down"])
    d, h2 = rms_norm(x=c, weight=w["norm2"], eps=1e-6, residual=c)
    weights, ids = moe_topk_softmax(router_logits=linear(x=d, weight=w["router"]), top_k=8, dtype=d.dtype)
    gate = linear(x=d, weight=w["sgate"])
    m = fused_moe_pairs(x=d, w13=w["w13"], w2=w["w2"], topk_weights=weights, topk_ids=ids, shared_w13=w["sw13"],
                        shared_w2=w["sw2"], shared_gate=gate)
    return [h, a, b, c, ids, m]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_pdl_chain_eager_and_graph_replays_equal_no_pdl(monkeypatch, rows):
    if not torch.cuda.is_available() or not _device.pdl_supported(CUDA):
        pytest.skip("needs a GPU that supports PDL (sm_90+, CUDA >= 12.3)")
    w = _chain_weights()
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = [(torch.randn(rows, 4096, device="cuda", generator=gen).to(torch.bfloat16),
               torch.randn(rows, 4096, device="cuda", generator=gen).to(torch.bfloat16)) for _ in range(6)]
    monkeypatch.setattr(_device, "PDL", False)
    with torch.no_grad():
        want = [[t.clone() for t in _chain(x, r, w)] for x, r in inputs]
    monkeypatch.setattr(_device, "PDL", None)  # the default: on at sm_90+
    with torch.no_grad():
        for (x, r), exp in zip(inputs, want):  # eager, launched with PDL (also compiles the PDL variants)
            for got, e in zip(_chain(x, r, w), exp):
                assert torch.equal(got, e)
        sx, sr = inputs[0][0].clone(), inputs[0][1].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _chain(sx, sr, w)
        for _ in range(3):  # replays back to back, each against its eager result
            for (x, r), exp in zip(inputs, want):
                sx.copy_(x)
                sr.copy_(r)
                graph.replay()
                for got, e in zip(outs, exp):
                    assert torch.equal(got, e)


def _quant_chain_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """int4 (g128) and fp8 (128-column blocks) weights at decode-like shapes: GEMV and tl.dot paths, split-K, and the
    fused per-pair MoE with its shared expert."""
    from deltaserve.kernels.quant import ref

    g = torch.Generator(device="cuda").manual_seed(seed)

    def int4(*lead_n_k):
        *lead, n, k = lead_n_k
        codes = torch.randint(0, 16, (*lead, n, k), dtype=torch.uint8, device="cuda", generator=g)
        return (ref.pack_int4(codes), torch.rand(*lead, n, k // 128, device="cuda", generator=g) * 2e-3 + 1e-4,
                torch.randint(0, 16, (*lead, n, k // 128), dtype=torch.uint8, device="cuda", generator=g))

    def fp8(n, k):
        return ((torch.randn(n, k, device="cuda", generator=g) * 8).to(torch.float8_e4m3fn),
                torch.rand(n, k // 128, device="cuda", generator=g) * 1e-3 + 1e-4)

    E, D, I = 64, 2048, 512
    return {"wide": int4(12288, 4096), "fp8": fp8(4096, 12288), "down": int4(2048, 4096),
            "w13": int4(E, 2 * I, D), "w2": int4(E, D, I), "sw13": int4(2 * I, D), "sw2": int4(D, I),
            "router": torch.randn(E, D, device="cuda", generator=g).to(torch.bfloat16) * 0.02}


def _quant_chain(x: torch.Tensor, w: dict) -> list[torch.Tensor]:
    """Each quantized kernel reads what the one before it wrote."""
    from deltaserve.kernels.quant import triton as qt

    def lin(h, name):
        qw, s, z = w[name]
        return qt.int4_linear(x=h, qweight=qw, scales=s, zeros=z, group_size=128)

    a = lin(x, "wide")
    b = qt.fp8_linear(x=a, weight=w["fp8"][0], scale=w["fp8"][1], block_k=128)
    c = lin(b, "down")
    weights, ids = torch.topk(torch.softmax(c.float() @ w["router"].float().T, -1), 8)
    (q13, s13, z13), (q2, s2, z2) = w["w13"], w["w2"]
    m = qt.int4_fused_moe(x=c, w13_qweight=q13, w13_scales=s13, w13_zeros=z13, w2_qweight=q2, w2_scales=s2,
                          w2_zeros=z2, group_size=128, topk_weights=weights, topk_ids=ids, shared_w13=w["sw13"],
                          shared_w2=w["sw2"], shared_gate=c[:, :1])
    return [a, b, c, m]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_pdl_quantized_chain_equals_no_pdl(monkeypatch, rows):
    """The quantized kernels (GEMV and its activations' copy, tl.dot GEMM, fused MoE) launched with PDL, eagerly and
    replayed in a CUDA graph, give what they give without it."""
    if not torch.cuda.is_available() or not _device.pdl_supported(CUDA):
        pytest.skip("needs a GPU that supports PDL (sm_90+, CUDA >= 12.3)")
    w = _quant_chain_weights()
    gen = torch.Generator(device="cuda").manual_seed(2)
    inputs = [torch.randn(rows, 4096, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
    monkeypatch.setattr(_device, "PDL", False)
    with torch.no_grad():
        want = [[t.clone() for t in _quant_chain(x, w)] for x in inputs]
    monkeypatch.setattr(_device, "PDL", None)
    with torch.no_grad():
        for x, exp in zip(inputs, want):
            for got, e in zip(_quant_chain(x, w), exp):
                assert torch.equal(got, e)
        sx = inputs[0].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _quant_chain(sx, w)
        for _ in range(3):
            for x, exp in zip(inputs, want):
                sx.copy_(x)
                graph.replay()
                for got, e in zip(outs, exp):
                    assert torch.equal(got, e)

