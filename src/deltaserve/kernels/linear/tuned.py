"""Tiles measured on one card for the projections where `tile_config`'s general rule loses there.

The rule was fitted on the H100 (RESULTS.md 2026-11-27); on the H200 (more bandwidth, same SMs) the fixed costs of
a tile weigh more and a third of the decode projections preferred another tile or cuBLAS. Each entry is the best
of `benchmarks/bench_linear.py --models 35B-A3B 27B 9B --batches 1 --sweep` (H200, RESULTS.md 2026-12-04) where it
beat the rule's pick by 3% or more; the rest keep the rule. Keys: (rows, out_features, in_features) as the engine
calls them unsharded; value: the Tile, or None for torch's GEMM. Only one-row calls (decode at batch 1) have been
swept, so only they are listed."""

from __future__ import annotations

from deltaserve.kernels.linear.triton import Tile

TUNED_TILES: dict[str, dict[tuple[int, int, int], Tile | None]] = {
    "NVIDIA H200": {
        # 35B-A3B: GDN in_proj (rule: torch, 18.1 us), out_proj and o_proj (32x256 k4: 9.46), router (16x256 k2: 4.26)
        (1, 12352, 2048): Tile(64, 128, 8, 4),  # 17.4 us
        (1, 2048, 4096): Tile(64, 256, 4, 4, 4),  # 8.1
        (1, 264, 2048): Tile(16, 256, 4, 4, 8),  # 3.31
        # 27B: out_proj and o_proj (rule: 32x256 k2, 23.5 us), MLP gate_up (64x256: 96.7), down (32x256 k2: 52.8)
        (1, 5120, 6144): None,  # torch: 21.5
        (1, 34816, 5120): Tile(32, 256, 4, 4),  # 89.9
        (1, 5120, 17408): Tile(64, 256, 4, 4),  # 50.8
        # 9B: GDN in_proj (rule: 64x256, 34.4 us), out_proj and o_proj (32x256 k2: 15.4), attention qkv (64x256:
        # 33.3), MLP gate_up (64x256: 55.5), lm_head (64x256: 462)
        (1, 12352, 4096): Tile(32, 128, 4, 6),  # 31.8
        (1, 4096, 4096): Tile(32, 128, 4, 6),  # 13.1
        (1, 10240, 4096): None,  # torch: 28.3
        (1, 24576, 4096): None,  # torch: 54.1
        (1, 248320, 4096): Tile(32, 128, 4, 6),  # 449
    },
}

_MISSING = object()


def tuned_tile(card: str, rows: int, out_features: int, in_features: int) -> Tile | None | object:
    """The card's measured tile for this call (None: torch's GEMM), or _MISSING where nothing was measured."""
    return TUNED_TILES.get(card, {}).get((rows, out_features, in_features), _MISSING)
