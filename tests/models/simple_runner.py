"""A minimal driver for model tests: runs chunks of sequences through the model with real caches and page tables
(the engine's scheduler does this for real; here the tests choose the chunks)."""

from __future__ import annotations

import torch

from deltaserve.cache.tensors import CacheShape, ModelCache
from deltaserve.engine.device_inputs import build_forward_batch


class SimpleRunner:
    def __init__(self, model, *, num_slots: int = 8, num_pages: int = 256, page_size: int = 16,
                 device: str = "cpu") -> None:
        self.model, self.page_size, self.device = model, page_size, device
        dtype = model.model.embed_tokens.weight.dtype
        shape = CacheShape(num_pages=num_pages, page_size=page_size, num_slots=num_slots, kv_dtype=dtype,
                           conv_dtype=dtype)
        self.cache = ModelCache(model.config, shape, device=device, with_mtp=model.mtp is not None)
        # Hand out pages and slots in a scrambled order so tests never depend on contiguous layouts.
        self.free_pages = list(torch.randperm(num_pages, generator=torch.Generator().manual_seed(0)).tolist())
        self.free_slots = list(reversed(range(num_slots)))
        self.seqs: dict[int, dict] = {}

    def _seq(self, sid: int) -> dict:
        if sid not in self.seqs:
            self.seqs[sid] = {"slot": self.free_slots.pop(), "pages": [], "ctx": 0}
        return self.seqs[sid]

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]], *, all_logits: bool = False) -> dict[int, torch.Tensor]:
        """Run one flat batch; chunks maps sequence id -> new token ids. Returns logits per sequence
        ([qlen, V] if all_logits else [1, V] for the last token)."""
        ids, qlens, ctxs, slots, tables = [], [], [], [], []
        for sid, toks in chunks.items():
            s = self._seq(sid)
            need = -(-(s["ctx"] + len(toks)) // self.page_size)
            while len(s["pages"]) < need:
                s["pages"].append(self.free_pages.pop())
            ids += toks
            qlens.append(len(toks)); ctxs.append(s["ctx"]); slots.append(s["slot"]); tables.append(s["pages"])
        total = sum(qlens)
        idx = list(range(total)) if all_logits else None
        batch = build_forward_batch(query_lens=qlens, context_lens=ctxs, state_slots=slots, block_tables=tables,
                                    page_size=self.page_size, device=self.device, logits_indices=idx)
        hidden = self.model(torch.tensor(ids, device=self.device), batch, self.cache)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        out, start = {}, 0
        for n, sid in enumerate(chunks):
            self.seqs[sid]["ctx"] += qlens[n]
            if all_logits:
                out[sid] = logits[start:start + qlens[n]]
                start += qlens[n]
            else:
                out[sid] = logits[n:n + 1]
        return out

    def generate_greedy(self, sid: int, prompt: list[int], max_new_tokens: int) -> list[int]:
        logits = self.step({sid: prompt})[sid]
        out = []
        for _ in range(max_new_tokens):
            tok = int(logits[-1].argmax())
            out.append(tok)
            logits = self.step({sid: [tok]})[sid]
        return out
