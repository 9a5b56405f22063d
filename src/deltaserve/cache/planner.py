"""Memory planning: split what the device has left after weights and activations between KV pages and state slots.

Pure arithmetic (no torch), so the policy is easy to test: the runner measures the numbers and calls `plan_memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve.cache.allocator import pages_for_tokens

GiB = 1 << 30


class OutOfMemoryError(RuntimeError):
    """The model cannot serve even one sequence of max_model_len on this device; the message gives the numbers."""


@dataclass(frozen=True)
class MemoryPlan:
    num_pages: int
    num_slots: int
    page_bytes: int
    slot_bytes: int
    budget_bytes: int
    num_checkpoints: int = 0  # prefix-cache checkpoints: state slots of their own, in the state tensors
    kv_format: str = "model dtype"  # what a page holds, for the log line (e.g. "fp8 e4m3 + scales")
    state_format: str = "float32"   # the GDN recurrent state's storage dtype
    prefill_graph_tokens: int = 0   # varlen CUDA graphs up to this many tokens, their pool reserved (engine/memory.py)

    @property
    def checkpoint_bytes(self) -> int:
        return self.num_checkpoints * self.slot_bytes

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def state_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def concurrency(self, page_size: int, tokens: int) -> float:
        """How many requests of `tokens` tokens run at once: each takes a state slot and the pages of its tokens."""
        return min(float(self.num_slots), self.num_pages / pages_for_tokens(tokens, page_size))

    def describe(self, page_size: int, max_model_len: int | None = None) -> str:
        """The start-up log line; with max_model_len it ends with how many requests of that length fit at once
        (vLLM's "maximum concurrency" figure)."""
        line = (f"KV cache ({self.kv_format}): {self.num_pages} pages x {page_size} tokens = "
                f"{self.num_pages * page_size} tokens ({self.kv_bytes / GiB:.2f} GiB); GDN state "
                f"({self.state_format} recurrent state): {self.num_slots} slots "
                f"({self.state_bytes / GiB:.2f} GiB, {self.slot_bytes / 2**20:.1f} MiB each); prefix-cache "
                f"checkpoints: {self.num_checkpoints} ({self.checkpoint_bytes / GiB:.2f} GiB); "
                f"budget {self.budget_bytes / GiB:.2f} GiB")
        if max_model_len is None:
            return line
        return (f"{line}; maximum concurrency for {max_model_len} tokens per request: "
                f"{self.concurrency(page_size, max_model_len):.2f}x")

    def long_request_hint(self, page_size: int, max_model_len: int) -> str | None:
        """When requests of max_model_len tokens would wait for KV pages while state slots stand empty: the number
        of slots (--max-num-seqs) that gives each slot the pages of one such request, keeping the checkpoints; None
        when that runs no more of them at once than this plan (the slots are not what holds them back)."""
        pages_each = pages_for_tokens(max_model_len, page_size)
        fit = int(self.num_pages // pages_each)
        if fit >= self.num_slots:
            return None
        balanced = max_full_length_sequences(budget_bytes=self.budget_bytes - self.checkpoint_bytes,
                                             page_bytes=self.page_bytes, slot_bytes=self.slot_bytes,
                                             page_size=page_size, max_model_len=max_model_len)
        if balanced <= fit:
            return None
        return (f"requests of max_model_len={max_model_len} tokens wait for KV pages once {fit} of them run, while "
                f"{self.num_slots} GDN state slots take {self.state_bytes / GiB:.2f} GiB: if most requests are "
                f"that long, --max-num-seqs {balanced} (max_num_seqs={balanced}) runs {balanced} of them at once "
                f"({balanced * self.slot_bytes / GiB:.2f} GiB of state, the rest KV pages); shorter requests "
                f"then run at most {balanced} at once too")


def plan_memory(*, budget_bytes: int, page_bytes: int, slot_bytes: int, page_size: int, max_num_seqs: int,
                max_model_len: int, num_pages: int | None = None, num_slots: int | None = None,
                num_checkpoints: int | None = None, checkpoint_fraction: float = 0.0,
                kv_format: str = "model dtype", state_format: str = "float32",
                kv_cache_dtype: str = "auto") -> MemoryPlan:
    """Give every one of max_num_seqs sequences a state slot, `checkpoint_fraction` of the budget (or
    num_checkpoints) to prefix-cache checkpoints (at most max(64, 4 per sequence)), and the rest to KV pages, never
    more pages than max_num_seqs full-length sequences plus the checkpoints' prefixes can use (the checkpoints hold
    their pages after their requests end: capped at the running sequences alone, a new request evicts them). If
    that leaves less than one max_model_len of KV, trade slots and checkpoints for pages; if even one slot plus one
    full sequence does not fit, raise with the numbers and the options. kv_format and state_format label the plan's
    log line; state_format (the state_dtype option) and kv_cache_dtype also say which cache options the error
    suggests."""
    pages_per_seq = pages_for_tokens(max_model_len, page_size)
    one_seq = slot_bytes + pages_per_seq * page_bytes
    labels = dict(kv_format=kv_format, state_format=state_format)
    wanted = num_checkpoints if num_checkpoints is not None else min(
        _how_many(int(checkpoint_fraction * max(budget_bytes, 0)), slot_bytes), max(64, 4 * max_num_seqs))
    if num_pages is not None and num_slots is not None:
        return MemoryPlan(num_pages, num_slots, page_bytes, slot_bytes, budget_bytes, wanted, **labels)
    if budget_bytes < one_seq:
        raise OutOfMemoryError(
            f"not enough memory for one sequence of max_model_len={max_model_len}: it needs "
            f"{one_seq / GiB:.2f} GiB ({slot_bytes / 2**20:.1f} MiB of GDN state + {pages_per_seq} KV pages of "
            f"{page_bytes / 2**20:.2f} MiB) but only {max(budget_bytes, 0) / GiB:.2f} GiB is left after the weights "
            "and activations. Options: a smaller --max-model-len, a larger --gpu-memory-utilization, a smaller "
            "--max-num-batched-tokens (less activation memory), "
            f"{_smaller_caches(kv_cache_dtype, state_format)}or a GPU with more memory.")
    slots = num_slots if num_slots is not None else max_num_seqs
    slots = max(1, min(slots, _how_many(budget_bytes - pages_per_seq * page_bytes, slot_bytes)))
    left = budget_bytes - slots * slot_bytes
    checkpoints = max(0, min(wanted, _how_many(left - pages_per_seq * page_bytes, slot_bytes)))
    left -= checkpoints * slot_bytes
    if num_pages is None:
        num_pages = min(_how_many(left, page_bytes), pages_per_seq * (max_num_seqs + checkpoints))
    return MemoryPlan(int(num_pages), int(slots), page_bytes, slot_bytes, budget_bytes, int(checkpoints), **labels)


def _how_many(budget_bytes: int, each_bytes: int) -> int | float:
    """How many items of each_bytes fit in budget_bytes; unlimited when they take no memory (a model without GDN
    layers has empty state slots, one without attention layers empty pages): the caller's other caps apply."""
    return budget_bytes // each_bytes if each_bytes else float("inf")


def _smaller_caches(kv_cache_dtype: str, state_dtype: str) -> str:
    """The error's hint at cache options smaller than the ones in use (none once both are at their smallest: fp8
    suggested to an int4 KV cache would be twice its size)."""
    options = [{"auto": "--kv-cache-dtype fp8 or int4", "fp8": "--kv-cache-dtype int4",
                "int8": "--kv-cache-dtype int4"}.get(kv_cache_dtype),
               "--state-dtype bfloat16" if state_dtype == "float32" else None]
    given = [o for o in options if o is not None]
    return f"smaller caches ({', '.join(given)}), " if given else ""


def max_full_length_sequences(*, budget_bytes: int, page_bytes: int, slot_bytes: int, page_size: int,
                              max_model_len: int) -> int:
    """How many sequences of max_model_len tokens fit in budget_bytes at once (each a state slot and its pages)."""
    one_seq = slot_bytes + pages_for_tokens(max_model_len, page_size) * page_bytes
    return max(0, budget_bytes // one_seq)
