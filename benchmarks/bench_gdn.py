"""GDN kernels at Qwen3.5 layer shapes: fused decode (CUDA graph and eager), conv1d, chunked prefill; against the copy
bandwidth measured in the same run and against fla-core's fused_recurrent / chunk kernels at the same shapes.

    PYTHONPATH=src:. python benchmarks/bench_gdn.py [--sweep] [--skip-prefill]
    PYTHONPATH=src:. python benchmarks/bench_gdn.py --multistep [--sweep]   # verify-step GDN layer and its replay
    PYTHONPATH=src:. python benchmarks/bench_gdn.py --commit   # verify-step commit, 27B: conv install, ssm replay
    PYTHONPATH=src:. python benchmarks/bench_gdn.py --conv-prefill [--sweep]   # conv prefill only (and its tiles)

Decode rotates through enough separate layers (state pools) per timed pass that the states do not sit in L2, as in a
real step, and reports per-layer time. 'state GB/s' counts the fp32 state bytes read + written (2 * B * HV * K * V * 4).
fla's fused_recurrent reads and writes a contiguous [B, HV, K, V] state (no slots, no conv, q/k/v given post-conv): it
does less work than the fused op, and a slot pool would add a gather and a scatter around it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.testing

from benchmarks.common import header, measure_copy_bandwidth, require_cuda, table

MODELS = {"27B": (16, 48), "35B-A3B": (16, 32)}  # (H, HV); K = V = 128, conv width 4
K = V = 128
WIDTH = 4
L2_BYTES = 200 << 20  # per timed pass, touch at least this many state bytes so L2 (50-60 MB) cannot hold them


def bench(fn: Callable[[], Any]) -> float:
    """Median ms."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_of(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    fn()  # warm-up outside capture (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def decode_layers(h: int, hv: int, batch: int, layers: int) -> list[dict[str, Any]]:
    """Inputs of fused_gdn_decode for `layers` independent layers (each its own pools, shuffled slots)."""
    conv_dim = 2 * h * K + hv * V
    slots_n = batch + 8
    out = []
    for i in range(layers):
        gen = torch.Generator(device="cuda").manual_seed(i)

        def rnd(*shape: int, gen: torch.Generator = gen) -> torch.Tensor:
            return torch.randn(*shape, device="cuda", generator=gen)

        out.append({
            "mixed_qkv": rnd(batch, conv_dim).bfloat16(), "a": rnd(batch, hv).bfloat16(),
            "b": rnd(batch, hv).bfloat16(), "A_log": torch.rand(hv, device="cuda", generator=gen) * 2.5,
            "dt_bias": rnd(hv).bfloat16(), "conv_weight": (rnd(conv_dim, WIDTH) * 0.5).bfloat16(),
            "conv_state": rnd(slots_n, WIDTH - 1, conv_dim).bfloat16(), "ssm_state": rnd(slots_n, hv, K, V) * 0.1,
            "slots": torch.randperm(slots_n, device="cuda", generator=gen)[:batch].contiguous(),
            "num_k_heads": h, "head_k_dim": K, "num_v_heads": hv, "head_v_dim": V, "scale": K**-0.5,
        })
    return out


def fla_decode_layers(h: int, hv: int, batch: int, layers: int) -> list[dict[str, Any]]:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda")

    return [{"q": rnd(batch, 1, h, K).bfloat16(), "k": rnd(batch, 1, h, K).bfloat16(),
             "v": rnd(batch, 1, hv, V).bfloat16(), "g": -torch.rand(batch, 1, hv, device="cuda"),
             "beta": torch.rand(batch, 1, hv, device="cuda").bfloat16(), "initial_state": rnd(batch, hv, K, V) * 0.1}
            for _ in range(layers)]


# (BV, num_warps) tilings of the recurrence kernel timed with --sweep, per batch size
SWEEP = {1: [(8, 1), (16, 1), (16, 2), (32, 2)], 16: [(16, 1), (32, 2), (32, 4), (64, 4)],
         64: [(16, 1), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8)]}


def _config_name(config: tuple[int, int]) -> str:
    return f"fused_gdn_decode BV={config[0]} w={config[1]}"


def decode_shape(rows: list[dict[str, Any]], copy_bw: float, sweep: bool, model: str, batch: int) -> None:
    from fla.ops.gated_delta_rule import (
        fused_recurrent_gated_delta_rule as fla_recurrent,
    )

    from deltaserve.kernels.gated_delta_rule import fused_gdn_decode
    from deltaserve.kernels.gated_delta_rule import triton as gdn_triton

    h, hv = MODELS[model]
    state_bytes = 2 * batch * hv * K * V * 4
    layers = max(2, -(-L2_BYTES // state_bytes))

    def add(kernel: str, mode: str, ms_per_layer: float) -> None:
        gbs = state_bytes / (ms_per_layer * 1e-3) / 1e9
        rows.append({"kernel": kernel, "shape": f"{model} H{h}/HV{hv} B={batch}", "mode": mode,
                     "us": ms_per_layer * 1e3, "state_GBps": gbs, "pct_copy": 100 * gbs * 1e9 / copy_bw})

    lays = decode_layers(h, hv, batch, layers)

    def ours(config: tuple[int, int] | None = None) -> Callable[[], None]:
        def fn() -> None:
            for kw in lays:
                if config is None:
                    fused_gdn_decode(**kw)
                else:
                    gdn_triton.fused_gdn_decode_launch(block_v=config[0], num_warps=config[1], **kw)
        return fn

    default = gdn_triton.decode_config(batch, hv)
    add(_config_name(default) + " (default)", "graph", bench(graph_of(ours()).replay) / layers)
    add(_config_name(default) + " (default)", "eager", bench(ours()) / layers)
    if sweep:
        for config in SWEEP[batch]:
            if config != default:
                add(_config_name(config), "graph", bench(graph_of(ours(config)).replay) / layers)
    lays.clear()  # free this shape's pools before the next

    flas = fla_decode_layers(h, hv, batch, layers)

    def fla_fn() -> None:
        for kw in flas:
            fla_recurrent(**kw, scale=K**-0.5, output_final_state=True, use_qk_l2norm_in_kernel=True)

    add("fla fused_recurrent (no conv, no slots)", "eager", bench(fla_fn) / layers)
    try:
        add("fla fused_recurrent (no conv, no slots)", "graph", bench(graph_of(fla_fn).replay) / layers)
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        print(f"fla fused_recurrent in a CUDA graph failed: {exc!r}", file=sys.stderr)
    flas.clear()
    torch.cuda.empty_cache()


def conv_update_shape(rows: list[dict[str, Any]], copy_bw: float, batch: int) -> None:
    from deltaserve.kernels.conv1d import causal_conv1d_update

    h, hv = MODELS["27B"]
    conv_dim = 2 * h * K + hv * V
    weight = torch.randn(conv_dim, WIDTH, device="cuda").bfloat16()
    pool = torch.randn(batch + 8, WIDTH - 1, conv_dim, device="cuda").bfloat16()
    x = torch.randn(batch, conv_dim, device="cuda").bfloat16()
    slots = torch.randperm(batch + 8, device="cuda")[:batch].contiguous()
    ms = bench(graph_of(lambda: causal_conv1d_update(x=x, weight=weight, conv_state=pool, slots=slots)).replay)
    nbytes = batch * conv_dim * 2 * (1 + 1 + 2 * (WIDTH - 1))  # x, y, window read + write
    rows.append({"kernel": "causal_conv1d_update", "shape": f"27B C={conv_dim} B={batch}", "mode": "graph",
                 "us": ms * 1e3, "state_GBps": nbytes / ms / 1e6, "pct_copy": 100 * nbytes / ms / 1e-3 / copy_bw})


# (BT tokens, BC channels, num_warps) of the conv prefill programs timed with --sweep (each program walks BT tokens of
# BC channels; BC = 256 x warps puts one 16-byte vector per thread and row, 512 x warps two)
CONV_PREFILL_SWEEP = [(128, 512, 2), (64, 512, 2), (256, 512, 2), (32, 512, 2), (16, 512, 2), (512, 512, 2),
                      (128, 256, 1), (256, 256, 1), (32, 256, 1), (64, 256, 2), (64, 1024, 4), (128, 1024, 4),
                      (64, 1024, 2), (128, 1024, 2)]


def conv_prefill_inputs(model: str, total: int, seqs: int, device: str = "cuda") -> tuple[dict[str, Any], int]:
    """Inputs of causal_conv1d_prefill_split as the GDN layer passes them at a model's shape: x a column slice of the
    merged in-projection output (qkv | z | b | a, so its row stride is wider than its C channels), `seqs` sequences
    of about total / seqs tokens from their slot's history; and the split (q and k channels | v channels)."""
    h, hv = MODELS[model]
    conv_dim = 2 * h * K + hv * V
    merged = torch.randn(total, conv_dim + hv * V + 2 * hv, device=device).bfloat16()
    args = {"x": merged[:, :conv_dim], "weight": torch.randn(conv_dim, WIDTH, device=device).bfloat16(),
            "conv_state": torch.randn(seqs + 4, WIDTH - 1, conv_dim, device=device).bfloat16(),
            "cu_seqlens": torch.linspace(0, total, seqs + 1, device=device).round().int(),
            "slots": torch.arange(seqs, device=device),
            "has_initial_state": torch.ones(seqs, dtype=torch.bool, device=device)}
    return args, 2 * h * K


def conv_prefill_shape(rows: list[dict[str, Any]], copy_bw: float, model: str, total: int, seqs: int,
                       sweep: bool) -> None:
    """The conv prefill (with its final-state launch) against copy bandwidth: 'pct_copy' counts x read + y written."""
    from deltaserve.kernels.conv1d import causal_conv1d_prefill_qkv, causal_conv1d_prefill_split
    from deltaserve.kernels.conv1d import triton as conv_triton
    from deltaserve.kernels.gated_delta_rule.triton import l2norm_qk

    args, split = conv_prefill_inputs(model, total, seqs)
    nbytes = 2 * args["x"].numel() * 2
    shape = f"{model} C={args['x'].shape[1]} T={total} N={seqs}"

    def add(name: str, ms: float) -> None:
        rows.append({"kernel": name, "shape": shape, "mode": "eager", "us": ms * 1e3, "state_GBps": nbytes / ms / 1e6,
                     "pct_copy": 100 * nbytes / ms / 1e-3 / copy_bw})

    default = conv_triton.PREFILL_TILE
    add(f"causal_conv1d_prefill_split BT={default[0]} BC={default[1]} w={default[2]} (default)",
        bench(lambda: causal_conv1d_prefill_split(**args, split=split)))

    def split_then_l2norm():  # the layer's calls before the fused L2-norm: the split conv, then l2norm_qk
        qk, _ = causal_conv1d_prefill_split(**args, split=split)
        half = qk.view(total, 2, -1, K)
        return l2norm_qk(half[:, 0], half[:, 1])

    add("split conv + l2norm_qk (two launches)", bench(split_then_l2norm))
    qkv_tile = conv_triton.PREFILL_QKV_TILE
    add(f"causal_conv1d_prefill_qkv BT={qkv_tile[0]} BC={qkv_tile[1]} w={qkv_tile[2]} (L2-norm fused, the layer's "
        "call)",
        bench(lambda: causal_conv1d_prefill_qkv(**args, key_dim=split // 2, head_dim=K)))
    for tile in CONV_PREFILL_SWEEP if sweep else []:
        if tile != default:
            add(f"causal_conv1d_prefill_split BT={tile[0]} BC={tile[1]} w={tile[2]}",
                bench(lambda tile=tile: conv_triton.causal_conv1d_prefill_launch(**args, split=split, tile=tile)))
        if tile != conv_triton.PREFILL_QKV_TILE:  # the layer's call (q, k normed in two planes) at this tile
            add(f"causal_conv1d_prefill_qkv BT={tile[0]} BC={tile[1]} w={tile[2]}",
                bench(lambda tile=tile: conv_triton.causal_conv1d_prefill_launch(**args, split=split, tile=tile,
                                                                                 planes=2, norm_head=K)))
    args.clear()
    torch.cuda.empty_cache()


def conv_prefill_table(sweep: bool, copy_bw: float) -> list[dict[str, Any]]:
    """Both models' channels at T = 2048 and 8192 (one sequence) and 8192 over 64 sequences; the sweep (the split
    conv's tiles and the conv with the L2-norm's) on one sequence."""
    rows: list[dict[str, Any]] = []
    for model in MODELS:
        for total, seqs in ((2048, 1), (8192, 1), (8192, 64)):
            conv_prefill_shape(rows, copy_bw, model, total, seqs, sweep and seqs == 1)
    return rows


def prefill_inputs(model: str, total: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(ours, fla's) chunked prefill of one sequence of `total` tokens from an initial state, at a model's shape."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    from deltaserve.kernels.gated_delta_rule import chunk_gated_delta_rule

    h, hv = MODELS[model]
    q = torch.randn(total, h, K, device="cuda").bfloat16()
    k = torch.randn(total, h, K, device="cuda").bfloat16()
    v = torch.randn(total, hv, V, device="cuda").bfloat16()
    g = -torch.rand(total, hv, device="cuda") * 0.1
    beta = torch.rand(total, hv, device="cuda").bfloat16()
    pool = torch.randn(8, hv, K, V, device="cuda") * 0.1
    cu = torch.tensor([0, total], dtype=torch.int32, device="cuda")
    slots, init = torch.tensor([3], device="cuda"), torch.tensor([True], device="cuda")
    h0 = pool[3:4].clone()
    cu64 = cu.long()

    cu_cpu = cu.cpu()

    def ours() -> None:  # with the hints the engine passes: host copy of cu_seqlens, no padding rows
        chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, state=pool, cu_seqlens=cu, slots=slots,
                               has_initial_state=init, scale=K**-0.5, cu_seqlens_cpu=cu_cpu, any_padding=False)

    def theirs() -> None:
        fla_chunk(q[None], k[None], v[None], g[None], beta[None], scale=K**-0.5, initial_state=h0,
                  output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu64)

    return ours, theirs


def prefill_shape(rows: list[dict[str, Any]], model: str, total: int) -> None:
    ours, theirs = prefill_inputs(model, total)
    ms_ours, ms_fla = bench(ours), bench(theirs)
    h, hv = MODELS[model]
    shape = f"{model} H{h}/HV{hv} T={total}"
    nan = float("nan")
    rows.append({"kernel": "chunk_gated_delta_rule (fla forward + slot gather/scatter)", "shape": shape, "mode": "eager",
                 "us": ms_ours * 1e3, "state_GBps": nan, "pct_copy": nan})
    rows.append({"kernel": "fla chunk_gated_delta_rule", "shape": shape, "mode": "eager", "us": ms_fla * 1e3,
                 "state_GBps": nan, "pct_copy": nan})


MULTISTEP_MODELS = {"9B": (16, 32), "27B": (16, 48)}  # (H, HV) of the models bench_mtp.py measures by default


def multistep_layers(h: int, hv: int, batch: int, tokens: int, layers: int) -> list[dict[str, Any]]:
    """Inputs of fused_gdn_multistep for `layers` independent layers: `batch` rows x `tokens` tokens, each layer its
    own pools and per-position buffers (the cache's [R, k, ...] buffers, as the verify step slices them)."""
    conv_dim = 2 * h * K + hv * V
    rows = batch * tokens
    out = []
    for i, kw in enumerate(decode_layers(h, hv, rows, layers)):
        gen = torch.Generator(device="cuda").manual_seed(1000 + i)
        slots_n = batch + 8
        kw["conv_state"] = kw["conv_state"][:slots_n]
        kw["ssm_state"] = kw["ssm_state"][:slots_n].clone()
        kw["slots"] = torch.randperm(slots_n, device="cuda", generator=gen)[:batch].contiguous()
        kw["tokens_per_row"] = tokens
        kw["conv_states_out"] = torch.empty(batch, tokens, WIDTH - 1, conv_dim, device="cuda", dtype=torch.bfloat16)
        kw["y_out"] = torch.empty(batch, tokens, conv_dim, device="cuda", dtype=torch.bfloat16)
        kw["gates_out"] = torch.empty(batch, tokens, 2, hv, device="cuda")
        out.append(kw)
    return out


def multistep_shape(rows: list[dict[str, Any]], copy_bw: float, model: str, h: int, hv: int, batch: int,
                    tokens: int, sweep: bool = False) -> None:
    """One GDN layer's verify step (`tokens` = 1 + K per row) and its commit's replay of all `tokens` positions, CUDA
    graph replay, per layer. 'state GB/s' counts the fp32 state read once (verify), read and written once (replay)."""
    from deltaserve.kernels.gated_delta_rule import triton as gdn_triton

    state_bytes = batch * hv * K * V * 4
    layers = max(2, -(-L2_BYTES // state_bytes))  # enough layers that their states overflow L2
    lays = multistep_layers(h, hv, batch, tokens, layers)

    def add(kernel: str, ms_per_layer: float) -> None:
        gbs = state_bytes / (ms_per_layer * 1e-3) / 1e9
        rows.append({"kernel": kernel, "shape": f"{model} H{h}/HV{hv} B={batch} T={tokens}", "mode": "graph",
                     "us": ms_per_layer * 1e3, "state_GBps": gbs, "pct_copy": 100 * gbs * 1e9 / copy_bw})

    def run(fn: Callable[..., Any]) -> Callable[[], None]:
        def step() -> None:
            for kw in lays:
                fn(**kw)
        return step

    def add_replay() -> None:
        rows_, kept = torch.arange(batch, device="cuda"), torch.full((batch,), tokens, device="cuda")

        def step() -> None:
            for kw in lays:
                gdn_triton.replay_kept_states(
                    states=kw["ssm_state"].unsqueeze(0), ys=kw["y_out"].unsqueeze(0),
                    gates=kw["gates_out"].unsqueeze(0), slots=kw["slots"], rows=rows_, num_kept=kept, num_k_heads=h,
                    head_k_dim=K, num_v_heads=hv, head_v_dim=V)
        ms = bench(graph_of(step).replay) / layers
        gbs = 2 * state_bytes / (ms * 1e-3) / 1e9
        rows.append({"kernel": f"replay_kept_states ({tokens} positions)", "shape": f"{model} H{h}/HV{hv} B={batch}",
                     "mode": "graph", "us": ms * 1e3, "state_GBps": gbs, "pct_copy": 100 * gbs * 1e9 / copy_bw})

    add("fused_gdn_multistep", bench(graph_of(run(gdn_triton.fused_gdn_multistep)).replay) / layers)
    add_replay()
    if sweep:
        for block_v, warps in SWEEP[min(SWEEP, key=lambda b: abs(b - batch))]:
            def fn(**kw: Any) -> Any:
                return gdn_triton.fused_gdn_multistep_launch(block_v=block_v, num_warps=warps, **kw)
            add(f"fused_gdn_multistep BV={block_v} w={warps}", bench(graph_of(run(fn)).replay) / layers)
    lays.clear()
    torch.cuda.empty_cache()


def multistep_table(models: list[str], batches: list[int], tokens: list[int], sweep: bool = False,
                    copy_bw: float | None = None) -> list[dict[str, Any]]:
    copy_bw = copy_bw or measure_copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for model in models:
        h, hv = MULTISTEP_MODELS[model]
        for batch in batches:
            for t in tokens:
                multistep_shape(rows, copy_bw, model, h, hv, batch, t, sweep)
    return rows


COMMIT_27B = (48, 16, 48)  # 27B: GDN layers, H, HV
PREDICT_BW = 4e12  # bytes read + written per second an H200 copy reaches (~85% of 4.8 TB/s)


def commit_table(batches: list[int], positions: int, copy_bw: float) -> list[dict[str, Any]]:
    """The verify step's commit at 27B (ModelCache.commit_verified over every GDN layer): the conv windows'
    install_kept_states (the reference's gather + index_copy against the copy kernel) and the recurrent states'
    replay_kept_states kernel, eager as the engine runs them. 'MB' = states written (the kernels read each once and
    write it once; the reference moves it twice); 'predicted' = 2 x MB at PREDICT_BW; 'pct_copy' = 2 x MB / time
    against the copy bandwidth measured in the same run."""
    from deltaserve.kernels.gated_delta_rule import ref as gdn_ref
    from deltaserve.kernels.gated_delta_rule import triton as gdn_triton

    layers, h, hv = COMMIT_27B
    conv_dim = 2 * h * K + hv * V
    out: list[dict[str, Any]] = []
    for batch in batches:
        gen = torch.Generator(device="cuda").manual_seed(batch)
        num_slots = batch + 8
        r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
        conv = r(layers, num_slots, WIDTH - 1, conv_dim).bfloat16()
        conv_steps = r(layers, batch, positions, WIDTH - 1, conv_dim).bfloat16()
        ssm = r(layers, num_slots, hv, K, V) * 0.1
        ys = r(layers, batch, positions, conv_dim).bfloat16()
        gates = torch.stack([-r(layers, batch, positions, hv).abs(), r(layers, batch, positions, hv).sigmoid()], 3)
        slots = torch.randperm(num_slots, device="cuda", generator=gen)[:batch]
        rows = torch.arange(batch, device="cuda")
        kept = torch.randint(1, positions + 1, (batch,), device="cuda", generator=gen)
        shape = f"27B L={layers} B={batch} k={positions}"

        def row(commit: str, impl: str, nbytes: int, ms: float) -> dict[str, Any]:
            return {"commit": commit, "impl": impl, "shape": shape, "MB": nbytes / 1e6, "us": ms * 1e3,
                    "predicted us": 2 * nbytes / PREDICT_BW * 1e6, "pct_copy": 100 * 2 * nbytes / (ms * 1e-3) / copy_bw}

        for impl, fn in (("index_copy (ref)", gdn_ref.install_kept_states), ("kernel", gdn_triton.install_kept_states)):
            ms = bench(lambda fn=fn: fn(states=conv, kept_states=conv_steps, slots=slots, rows=rows, num_kept=kept))
            out.append(row("conv install", impl, conv[:, 0].nbytes * batch, ms))
        ms = bench(lambda: gdn_triton.replay_kept_states(states=ssm, ys=ys, gates=gates, slots=slots, rows=rows,
                                                         num_kept=kept, num_k_heads=h, head_k_dim=K, num_v_heads=hv,
                                                         head_v_dim=V))
        out.append(row("ssm replay", "kernel", ssm[:, 0].nbytes * batch, ms))
        expected = conv.clone()
        gdn_ref.install_kept_states(states=expected, kept_states=conv_steps, slots=slots, rows=rows, num_kept=kept)
        gdn_triton.install_kept_states(states=conv, kept_states=conv_steps, slots=slots, rows=rows, num_kept=kept)
        out[-1]["conv same"] = bool(torch.equal(conv, expected))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time every decode tile config")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--multistep", action="store_true",
                        help="only the verify step's GDN layer (1 + K tokens per row) and the commit's replay, 9B and "
                             "27B, batches 1 8 32, T 2 4 (with --sweep: the recurrence's tilings too)")
    parser.add_argument("--commit", action="store_true",
                        help="only the verify step's commit at 27B, batches 1 8 32, 1 + K = 4: conv install, "
                             "ssm replay")
    parser.add_argument("--conv-prefill", action="store_true",
                        help="only the conv prefill, 27B and 35B-A3B channels (with --sweep: its tiles, one sequence)")
    args = parser.parse_args()
    # only the default table times fla-core's kernels
    require_cuda("bench_gdn.py", fla=not (args.conv_prefill or args.commit or args.multistep))
    if args.conv_prefill:
        copy_bw = measure_copy_bandwidth()
        print(header(" ".join(sys.argv)) + f" | copy bandwidth (read + write): {copy_bw / 1e12:.3f} TB/s")
        print(table(conv_prefill_table(args.sweep, copy_bw)))
        return
    if args.commit:
        copy_bw = measure_copy_bandwidth()
        print(header(" ".join(sys.argv)) + f" | copy bandwidth (read + write): {copy_bw / 1e12:.3f} TB/s")
        print(table(commit_table([1, 8, 32], 4, copy_bw)))
        return
    if args.multistep:
        copy_bw = measure_copy_bandwidth()
        print(header(" ".join(sys.argv)) + f" | copy bandwidth (read + write): {copy_bw / 1e12:.3f} TB/s")
        print(table(multistep_table(list(MULTISTEP_MODELS), [1, 8, 32], [2, 4], args.sweep, copy_bw)))
        return
    import fla

    copy_bw = measure_copy_bandwidth()
    print(header(" ".join(sys.argv)) + f" | fla-core {getattr(fla, '__version__', '?')}")
    print(f"copy bandwidth (read + write): {copy_bw / 1e12:.3f} TB/s")
    rows: list[dict[str, Any]] = []
    for model in MODELS:
        for batch in (1, 16, 64):
            decode_shape(rows, copy_bw, args.sweep, model, batch)
    for batch in (1, 64):
        conv_update_shape(rows, copy_bw, batch)
    rows += conv_prefill_table(args.sweep, copy_bw)
    if not args.skip_prefill:
        for model in MODELS:
            for total in (2048, 8192):
                prefill_shape(rows, model, total)
    print(table(rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_gdn.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "copy_bw": copy_bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
