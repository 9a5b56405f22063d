"""Device memory of the caches: paged K/V for full-attention layers, conv + recurrent state slots for GDN layers.

Memory only, no policy: which page or slot belongs to which request is decided by the cache manager. Sizes come from
the rank's shapes (config.RankShapes), the same object the layers are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deltaserve.config import ModelConfig, RankShapes
from deltaserve.kernels.attention.ref import is_quantized_kv, kv_stored_dim
from deltaserve.kernels.gated_delta_rule import install_kept_states, replay_kept_states

MTP_LAYER = "mtp.0"  # cache key of the MTP head's own attention layer
# Page dtypes of the quantized kv_cache_dtype options; "auto" keeps the model dtype. uint8 pages hold int4 pairs.
KV_PAGE_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
_SCALE_BYTES = 4  # one fp32 scale per token, KV head and K/V in quantized pages


@dataclass(frozen=True)
class CacheShape:
    """Sizes of one cache allocation."""

    num_pages: int
    page_size: int
    num_slots: int
    kv_dtype: torch.dtype  # the pages' dtype (kv_page_dtype); quantized ones come with scale tensors
    conv_dtype: torch.dtype
    state_dtype: torch.dtype = torch.float32


class KVPages(NamedTuple):
    """One attention layer's pages: k and v, each [P, page_size, Hkv, D] (int4: D/2 bytes), and for quantized pages
    their scales, k_scale and v_scale [P, page_size, Hkv] fp32 (docs/KERNELS.md, "Quantized KV cache")."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class GDNState(NamedTuple):
    """One GDN layer's state slots: conv [S, W-1, conv_dim] (pre-conv inputs, model dtype), ssm [S, HV, K, V].

    With speculative decoding, for each of the k positions of the first R rows of a verify step: conv_steps
    [R, k, W-1, conv_dim] receives the conv window after it, y_steps [R, k, conv_dim] its post-conv row and
    gate_steps [R, k, 2, HV] fp32 its gates, from which the runner's commit replays the recurrent state up to the
    last kept position (gated_delta_rule.replay_kept_states)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    conv_steps: torch.Tensor | None = None
    y_steps: torch.Tensor | None = None
    gate_steps: torch.Tensor | None = None


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_page_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pages' dtype for the kv_cache_dtype option ("auto": the model dtype)."""
    return model_dtype if kv_cache_dtype == "auto" else KV_PAGE_DTYPES[kv_cache_dtype]


def kv_bytes_per_page(shapes: RankShapes, page_size: int, dtype: torch.dtype, *, num_layers: int) -> int:
    """K and V of one page over num_layers layers in pages of `dtype`, scales included."""
    per_head = kv_stored_dim(dtype, shapes.head_dim) * _elem(dtype) + (_SCALE_BYTES if is_quantized_kv(dtype) else 0)
    return num_layers * 2 * page_size * shapes.num_kv_heads * per_head


def verify_bytes_per_position(shapes: RankShapes, num_layers: int, conv_dtype: torch.dtype) -> int:
    """What a verify step keeps of one row's position for the commit, over num_layers GDN layers: the conv window,
    the post-conv row (both conv_dtype) and the fp32 gates."""
    conv = shapes.conv_kernel * shapes.conv_dim * _elem(conv_dtype)  # W-1 window rows + the post-conv row
    return num_layers * (conv + 2 * shapes.linear_num_value_heads * 4)


def state_bytes_per_slot(shapes: RankShapes, num_layers: int, conv_dtype: torch.dtype,
                         state_dtype: torch.dtype, mtp_hidden_size: int = 0) -> int:
    """One slot's GDN states over num_layers layers, and with an MTP head (mtp_hidden_size: the model's hidden size)
    the hidden state it keeps (conv_dtype, the model's)."""
    conv = (shapes.conv_kernel - 1) * shapes.conv_dim * _elem(conv_dtype)
    ssm = shapes.linear_num_value_heads * shapes.linear_key_head_dim * shapes.linear_value_head_dim * _elem(state_dtype)
    return num_layers * (conv + ssm) + mtp_hidden_size * _elem(conv_dtype)


class ModelCache:
    """Owns the cache tensors of every layer (and of the MTP layer when present): `attention(key)` -> KVPages,
    `gdn(key)` -> GDNState. Layer keys are decoder layer indices, and MTP_LAYER for the MTP head's attention."""

    def __init__(self, config: ModelConfig, shape: CacheShape, *, device: torch.device | str, with_mtp: bool = False,
                 shapes: RankShapes | None = None, verify_rows: int = 0, verify_positions: int = 0) -> None:
        """shapes: the rank's shapes (default: the whole model, one rank); verify_rows x verify_positions: the
        per-position GDN buffers a verify step keeps for the commit (speculative decoding; 0: none)."""
        shapes = shapes or RankShapes.for_rank(config)
        self.shape = shape
        self._kv: dict[int | str, KVPages] = {}
        self._gdn: dict[int, GDNState] = {}
        attn_keys: list[int | str] = list(config.full_attention_layers) + ([MTP_LAYER] if with_mtp else [])
        for key in attn_keys:
            self._kv[key] = _new_pages(shape, shapes, device)
        conv_shape = (shape.num_slots, shapes.conv_kernel - 1, shapes.conv_dim)
        ssm_shape = (shape.num_slots, shapes.linear_num_value_heads, shapes.linear_key_head_dim,
                     shapes.linear_value_head_dim)
        keep = verify_rows > 0 and verify_positions > 0
        self.verify_rows = verify_rows if keep else 0
        # Every GDN layer's slots in one tensor per kind ([L, S, ...]; each layer holds a view): copying or committing
        # states is then one op for all layers instead of one per layer (the commit after each verify step was ~100
        # small launches on 27B).
        layers = list(config.linear_attention_layers)
        n = len(layers)
        self._conv = torch.zeros((n, *conv_shape), dtype=shape.conv_dtype, device=device)
        self._ssm = torch.zeros((n, *ssm_shape), dtype=shape.state_dtype, device=device)
        self._conv_steps = self._y_steps = self._gate_steps = None
        self._rows: torch.Tensor | None = None  # 0 .. verify_rows - 1: the buffers' rows that commit_verified reads
        self._heads = (shapes.linear_num_key_heads, shapes.linear_key_head_dim, shapes.linear_num_value_heads,
                       shapes.linear_value_head_dim)
        if keep:
            self._rows = torch.arange(verify_rows, device=device)
            lead = (n, verify_rows, verify_positions)
            self._conv_steps = torch.zeros((*lead, *conv_shape[1:]), dtype=shape.conv_dtype, device=device)
            self._y_steps = torch.zeros((*lead, shapes.conv_dim), dtype=shape.conv_dtype, device=device)
            self._gate_steps = torch.zeros((*lead, 2, shapes.linear_num_value_heads), dtype=torch.float32,
                                           device=device)
        for j, i in enumerate(layers):
            steps = (self._conv_steps[j], self._y_steps[j], self._gate_steps[j]) if keep else ()  # type: ignore
            self._gdn[i] = GDNState(self._conv[j], self._ssm[j], *steps)
        # With an MTP head, each slot keeps the target's final-normed hidden state at its last computed position, as
        # part of its state (copied with it): the head's input there, for a request that resumes from a checkpoint
        # of the slot (MTPDrafter.rewrite_resume_kv).
        self.mtp_hidden = torch.zeros((shape.num_slots, config.hidden_size), dtype=shape.conv_dtype,
                                      device=device) if with_mtp else None

    def attention(self, key: int | str) -> KVPages:
        return self._kv[key]

    def gdn(self, key: int) -> GDNState:
        return self._gdn[key]

    def layer(self, key: int | str) -> KVPages | GDNState:
        """The cache of decoder layer `key`, whichever kind it is."""
        return self._gdn[key] if key in self._gdn else self._kv[key]  # type: ignore[index]

    def copy_states(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every GDN layer's state (conv window and recurrent state), and the MTP head's kept hidden state, of slots
        `src` into slots `dst` ([n] int64, on the cache's device; a slot appears at most once in dst)."""
        if self._gdn:
            self._conv.index_copy_(1, dst, self._conv.index_select(1, src))
            self._ssm.index_copy_(1, dst, self._ssm.index_select(1, src))
        if self.mtp_hidden is not None:
            self.mtp_hidden.index_copy_(0, dst, self.mtp_hidden.index_select(0, src))

    def commit_verified(self, slots: torch.Tensor, kept: torch.Tensor) -> None:
        """After a verify step: put in each row's slot the GDN states after its kept[i]-th position (slots [n]
        int64, all real; kept [n] int64 in [1, k]; row i of the step is row i of the buffers): the conv window as
        kept, the recurrent state replayed from the slot's through the kept positions. The math is the kernels'
        commit (gated_delta_rule.commit_gdn_states), here over every layer at once: on the GPU two launches, no host
        sync."""
        if not self._gdn:
            return
        assert self._conv_steps is not None and self._y_steps is not None and self._gate_steps is not None
        assert self._rows is not None
        rows = self._rows[:slots.shape[0]]
        install_kept_states(states=self._conv, kept_states=self._conv_steps, slots=slots, rows=rows, num_kept=kept)
        hk, dk, hv, dv = self._heads
        replay_kept_states(states=self._ssm, ys=self._y_steps, gates=self._gate_steps, slots=slots, rows=rows,
                           num_kept=kept, num_k_heads=hk, head_k_dim=dk, num_v_heads=hv, head_v_dim=dv)

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every attention layer's K/V (and their scales, when quantized) of pages `src` into pages `dst` ([n] int64
        on the cache's device)."""
        for pages in self._kv.values():
            for t in pages:
                if t is not None:
                    # as bytes: index_copy_ has no fp8 kernel on the CPU, and a byte copy is exact for every format
                    raw = t.view(torch.uint8)
                    raw.index_copy_(0, dst, raw.index_select(0, src))

    def nbytes(self) -> int:
        tensors = [t for pair in self._kv.values() for t in pair] + [self._conv, self._ssm, self._conv_steps,
                                                                     self._y_steps, self._gate_steps, self.mtp_hidden]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _new_pages(shape: CacheShape, shapes: RankShapes, device: torch.device | str) -> KVPages:
    """One layer's zeroed pages (and scales, when quantized)."""
    lead = (shape.num_pages, shape.page_size, shapes.num_kv_heads)
    kv_shape = (*lead, kv_stored_dim(shape.kv_dtype, shapes.head_dim))
    pages = [torch.zeros(kv_shape, dtype=shape.kv_dtype, device=device) for _ in range(2)]
    if not is_quantized_kv(shape.kv_dtype):
        return KVPages(*pages)
    return KVPages(*pages, *(torch.zeros(lead, dtype=torch.float32, device=device) for _ in range(2)))
