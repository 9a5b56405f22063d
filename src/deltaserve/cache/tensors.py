"""Device memory of the caches: paged K/V for full-attention layers, conv + recurrent state slots for GDN layers.

Memory only, no policy: which page or slot belongs to which request is decided by the scheduler's allocators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.config import ModelConfig


@dataclass(frozen=True)
class CacheShape:
    """Sizes of one cache allocation."""

    num_pages: int
    page_size: int
    num_slots: int
    kv_dtype: torch.dtype
    conv_dtype: torch.dtype
    state_dtype: torch.dtype = torch.float32


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype, *, with_mtp: bool) -> int:
    layers = len(config.full_attention_layers) + (1 if with_mtp else 0)
    elem = torch.empty((), dtype=dtype).element_size()
    return layers * 2 * page_size * config.num_key_value_heads * config.head_dim * elem


def state_bytes_per_slot(config: ModelConfig, conv_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    n = len(config.linear_attention_layers)
    conv = (config.linear_conv_kernel_dim - 1) * config.conv_dim * torch.empty((), dtype=conv_dtype).element_size()
    ssm = (config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
           * torch.empty((), dtype=state_dtype).element_size())
    return n * (conv + ssm)


class ModelCache:
    """Owns the cache tensors of every layer (and of the MTP layer when present).

    Attention layer i: (k_cache, v_cache), each [P, page_size, Hkv, D].
    GDN layer i: (conv_state [S, W-1, conv_dim] in the model dtype, ssm_state [S, HV, K, V] in state_dtype).
    """

    def __init__(self, config: ModelConfig, shape: CacheShape, *, device: torch.device | str,
                 with_mtp: bool = False) -> None:
        self.shape = shape
        self._layers: dict[int | str, tuple[torch.Tensor, torch.Tensor]] = {}
        kv_shape = (shape.num_pages, shape.page_size, config.num_key_value_heads, config.head_dim)
        attn_keys: list[int | str] = list(config.full_attention_layers) + (["mtp.0"] if with_mtp else [])
        for key in attn_keys:
            self._layers[key] = (torch.zeros(kv_shape, dtype=shape.kv_dtype, device=device),
                                 torch.zeros(kv_shape, dtype=shape.kv_dtype, device=device))
        conv_shape = (shape.num_slots, config.linear_conv_kernel_dim - 1, config.conv_dim)
        ssm_shape = (shape.num_slots, config.linear_num_value_heads, config.linear_key_head_dim,
                     config.linear_value_head_dim)
        for i in config.linear_attention_layers:
            self._layers[i] = (torch.zeros(conv_shape, dtype=shape.conv_dtype, device=device),
                               torch.zeros(ssm_shape, dtype=shape.state_dtype, device=device))

    def layer(self, key: int | str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self._layers.values() for t in pair)
