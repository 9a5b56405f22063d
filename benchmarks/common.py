"""Shared pieces of the benchmark scripts: real model shapes, the card's measured ceilings, table printing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Text-model shapes of published checkpoints (docs/MODEL.md, "Published shapes").
_BASE = {"vocab_size": 248320, "head_dim": 256, "linear_num_key_heads": 16, "linear_key_head_dim": 128,
         "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 262144, "dtype": "bfloat16",
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}
SHAPES: dict[str, dict[str, Any]] = {
    "9B": {**_BASE, "architectures": ["Qwen3_5ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
           "intermediate_size": 12288, "num_attention_heads": 16, "num_key_value_heads": 4,
           "linear_num_value_heads": 32},
    "27B": {**_BASE, "architectures": ["Qwen3_5ForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 64,
            "intermediate_size": 17408, "num_attention_heads": 24, "num_key_value_heads": 4,
            "linear_num_value_heads": 48},
    "35B-A3B": {**_BASE, "architectures": ["Qwen3_5MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 40,
                "num_attention_heads": 16, "num_key_value_heads": 2, "linear_num_value_heads": 32,
                "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                "shared_expert_intermediate_size": 512},
    # 48 layers (36 GDN / 12 attention) from the model card; does not fit one GPU in bf16 (projections only)
    "122B-A10B": {**_BASE, "architectures": ["Qwen3_5MoeForCausalLM"], "hidden_size": 3072, "num_hidden_layers": 48,
                  "num_attention_heads": 32, "num_key_value_heads": 2, "linear_num_value_heads": 64,
                  "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 1024,
                  "shared_expert_intermediate_size": 1024},
    # a few-MB shape for smoke-testing the benchmark scripts on CPU (tests/test_benchmarks.py)
    "tiny": {**_BASE, "architectures": ["Qwen3_5ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
             "num_hidden_layers": 4, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
             "linear_value_head_dim": 16, "dtype": "float32"},
}


def positive_int(text: str) -> int:
    """argparse type of a count or length: an integer >= 1 (a 0 failed deep inside a run, or looped for ever)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a positive integer")
    return value


def parse_tree(text: str) -> tuple[str, Path]:
    """argparse type of --tree NAME=PATH (serve_ab.py, tree_ab.py): a name and a directory holding deltaserve."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--tree takes NAME=PATH (a directory holding the deltaserve package, e.g. "
                                         f"after=src), got {text!r}")
    if not (Path(path) / "deltaserve" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"--tree {text}: {path} holds no deltaserve package (give the tree's src "
                                         f"directory)")
    return name, Path(path).resolve()


def require_cuda(script: str, *, fla: bool = False, cpu_alternative: str = "") -> None:
    """Stops a GPU-only benchmark in one line on a machine without CUDA (or without fla-core where it times fla),
    before it fails deep inside torch with "Torch not compiled with CUDA enabled" or an ImportError."""
    if not torch.cuda.is_available():
        hint = f"; on CPU: {cpu_alternative}" if cpu_alternative else ""
        raise SystemExit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False here){hint}")
    if fla:
        try:
            import fla  # noqa: F401
        except ImportError:
            raise SystemExit(f"{script} compares against fla-core, which is not installed: pip install -e '.[gpu]'")


def model_config(name: str):
    from deltaserve.config import ModelConfig

    return ModelConfig.from_dict(SHAPES[name])


def state_bytes(cfg, state_dtype: torch.dtype = torch.float32) -> int:
    """GDN state of one sequence (every layer's conv window in bf16 and recurrent state), one rank."""
    from deltaserve.cache.tensors import state_bytes_per_slot
    from deltaserve.config import RankShapes

    return state_bytes_per_slot(RankShapes.for_rank(cfg), len(cfg.linear_attention_layers), torch.bfloat16,
                                state_dtype)


def kv_bytes_per_token(cfg, page_dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V of one token over the full-attention layers (no MTP layer) in pages of page_dtype (bf16, or a
    quantized format with its scales)."""
    from deltaserve.cache.tensors import kv_bytes_per_page
    from deltaserve.config import RankShapes

    return kv_bytes_per_page(RankShapes.for_rank(cfg), 1, page_dtype, num_layers=len(cfg.full_attention_layers))


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def read_stream(nbytes: int) -> Callable[[], object]:
    """A launch that reads `nbytes` of a device buffer once, contiguously, and nothing else: time it with the
    benchmark's own timer for the least time one kernel needs to read that many bytes (ramp-up and tail included).
    At decode sizes (tens of MB a projection) that is well under the copy bandwidth, so a weight-streaming kernel is
    compared with it as well as with the copy floor."""
    import triton

    words = -(-nbytes // 4)
    w = torch.zeros(words, dtype=torch.int32, device="cuda")
    out = torch.empty(4 * torch.cuda.get_device_properties(0).multi_processor_count, dtype=torch.int32,
                      device="cuda")
    per = triton.cdiv(triton.cdiv(words, out.numel()), _READ_BLOCK) * _READ_BLOCK
    grid = (triton.cdiv(words, per),)
    return lambda: _read_kernel()[grid](w, out, words, per, BLOCK=_READ_BLOCK, num_warps=8)


_READ_BLOCK = 4096  # int32 words a program loads at once (16 KB)


@functools.cache
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read(w_ptr, out_ptr, words, per, BLOCK: tl.constexpr):
        start = tl.program_id(0) * per
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        for off in range(start, tl.minimum(start + per, words), BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc ^= tl.load(w_ptr + idx, mask=idx < words, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc))  # the loads feed a store: none is dropped

    return read


def measure_matmul_rate(n: int = 8192) -> float:
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3)


@contextlib.contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """Collects the names of the Triton kernels compiled inside the block. A compile inside a timed region is a
    stall of seconds that the steady state never pays: benchmarks print these so such a run is not mistaken for
    a slow engine."""
    import triton

    names: list[str] = []
    runtime = triton.knobs.runtime
    previous = runtime.jit_post_compile_hook

    def hook(*, fn, **_: Any) -> None:
        names.append(fn.name)

    runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        runtime.jit_post_compile_hook = previous


@contextlib.contextmanager
def moe_blocked_tiles(tiles: tuple) -> Iterator[None]:
    """moe.blocked runs every call inside with these (BLOCK_M, gate_up, down) tiles (launches read blocked.TILES)."""
    from deltaserve.kernels.moe import blocked

    saved, blocked.TILES = blocked.TILES, [(None, *tiles)]
    try:
        yield
    finally:
        blocked.TILES = saved


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 900, log: Path | None = None) -> float:
    """Seconds until the server at url answers GET /health (a GPU server may take minutes); exits naming what went
    wrong, with the end of the server's log where given, if it dies first or the time runs out."""
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering{_log_end(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s{_log_end(log)}")


def _log_end(log: Path | None, lines: int = 20) -> str:
    if log is None:
        return ""
    return f"; its log ({log}) ends:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def header(command: str) -> str:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"card: {name} | torch {torch.__version__} | triton {triton.__version__} | python "
            f"{platform.python_version()}\ncommand: {command or ' '.join(sys.argv)}")


def print_report(rows: list[dict[str, Any]], copy_bandwidth: float) -> None:
    """A floor-relative benchmark's closing output: the run header, the copy bandwidth its floors use, the table."""
    print(header(""))
    print(f"copy bandwidth measured: {copy_bandwidth / 1e12:.2f} TB/s")
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every row's keys, first seen first; a missing cell is blank
    fmt = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: " | ".join(v.rjust(w) for v, w in zip(vals, fmt))  # noqa: E731
    return "\n".join([line(cols), "-+-".join("-" * w for w in fmt)]
                     + [line([_fmt(r.get(c, "")) for c in cols]) for r in rows])


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
