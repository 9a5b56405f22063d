"""The one place deltaserve reaches fla-core (flash-linear-attention): its public chunked gated delta rule, which
returns (o, final_state). Imported lazily, on the first GPU prefill; the installed version is checked against the
range this project is tested with (the `gpu` extra pins the same range), and a mismatch is a clear error rather than
a wrong answer from a changed internal."""

from __future__ import annotations

import torch

SUPPORTED = ((0, 6), (0, 7))  # [0.6, 0.7): what `pip install deltaserve[gpu]` installs and the GPU tests run


def _version(text: str) -> tuple[int, int]:
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
    return major, minor


def _load():
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise ImportError("GPU prefill of Gated DeltaNet layers needs fla-core: pip install 'deltaserve[gpu]' (or "
                          "pip install 'fla-core>=0.6,<0.7')") from e
    version = _version(getattr(fla, "__version__", "0.0"))
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise ImportError(f"fla-core {fla.__version__} is installed, but deltaserve is tested with "
                          f">={'.'.join(map(str, SUPPORTED[0]))},<{'.'.join(map(str, SUPPORTED[1]))}: "
                          "pip install 'fla-core>=0.6,<0.7'")
    return chunk_gated_delta_rule


_CHUNK: list = []


def chunk_forward(*, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float, initial_state: torch.Tensor, cu_seqlens: torch.Tensor,
                  chunk_indices: torch.Tensor | None, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's chunked forward over a flat varlen batch: q, k [T, H, K] (already L2-normalised), v [T, HV, V],
    g [T, HV] fp32 log-decay, beta [T, HV], initial_state [N, HV, K, V] fp32, cu_seqlens [N+1] int64,
    chunk_indices [C, 2] int64 or None (then fla derives them, with a host sync). Returns (o [T, HV, V],
    final_state [N, HV, K, V] fp32)."""
    if not _CHUNK:
        _CHUNK.append(_load())
    o, final = _CHUNK[0](q[None], k[None], v[None], g[None], beta[None], scale=scale, initial_state=initial_state,
                         output_final_state=True, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                         chunk_size=chunk_size)
    return o[0], final
