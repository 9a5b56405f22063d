"""Memory planning policy."""

from __future__ import annotations

import pytest

from deltaserve.cache.planner import OutOfMemoryError, max_full_length_sequences, plan_memory

MiB = 1 << 20


def test_slots_for_every_sequence_rest_to_pages():
    p = plan_memory(budget_bytes=1000 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                    max_num_seqs=8, max_model_len=3200)
    assert p.num_slots == 8 and p.num_pages == 1000 - 80
    assert "920 pages" in p.describe(16) and "8 slots" in p.describe(16)


def test_pages_capped_at_what_max_num_seqs_can_use():
    p = plan_memory(budget_bytes=10_000 * MiB, page_bytes=1 * MiB, slot_bytes=1 * MiB, page_size=16,
                    max_num_seqs=2, max_model_len=160)
    assert p.num_pages == 20 and p.num_slots == 2


def test_slots_traded_for_one_full_length_sequence():
    p = plan_memory(budget_bytes=200 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                    max_num_seqs=64, max_model_len=16 * 150)
    assert p.num_slots == 5 and p.num_pages >= 150


def test_one_sequence_does_not_fit_gives_numbers_and_options():
    with pytest.raises(OutOfMemoryError, match=r"max_model_len=262144.*smaller --max-model-len.*--gpu-memory-utilization"):
        plan_memory(budget_bytes=100 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                    max_num_seqs=4, max_model_len=262144)


def test_explicit_sizes_are_kept():
    p = plan_memory(budget_bytes=0, page_bytes=1, slot_bytes=1, page_size=16, max_num_seqs=4, max_model_len=64,
                    num_pages=7, num_slots=3)
    assert (p.num_pages, p.num_slots) == (7, 3)


def test_log_line_names_the_cache_formats():
    p = plan_memory(budget_bytes=1000 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                    max_num_seqs=8, max_model_len=3200, kv_format="fp8 e4m3 + scales", state_format="bfloat16")
    assert p.describe(16).startswith("KV cache (fp8 e4m3 + scales): 920 pages")
    assert "GDN state (bfloat16 recurrent state): 8 slots" in p.describe(16)


def test_out_of_memory_suggests_the_compressed_caches():
    with pytest.raises(OutOfMemoryError, match=r"--kv-cache-dtype fp8 or int4, --state-dtype bfloat16"):
        plan_memory(budget_bytes=10 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16, max_num_seqs=4,
                    max_model_len=1600)


@pytest.mark.parametrize("kv,state,hint", [
    ("auto", "float32", "smaller caches (--kv-cache-dtype fp8 or int4, --state-dtype bfloat16), or"),
    ("fp8", "bfloat16", "smaller caches (--kv-cache-dtype int4), or"),
    ("int4", "float32", "smaller caches (--state-dtype bfloat16), or"),
    ("int4", "bfloat16", "(less activation memory), or a GPU")])
def test_out_of_memory_suggests_only_caches_smaller_than_the_ones_in_use(kv, state, hint):
    """An int4 KV cache was told to try fp8 (twice its size), a bf16 state to try bf16."""
    with pytest.raises(OutOfMemoryError) as e:
        plan_memory(budget_bytes=10 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16, max_num_seqs=4,
                    max_model_len=1600, kv_cache_dtype=kv, state_format=state)
    assert hint in str(e.value)
    assert ("fp8" in str(e.value)) == (kv == "auto")


def test_max_full_length_sequences():
    # each: 10 MiB of state + 200 pages of 1 MiB
    assert max_full_length_sequences(budget_bytes=1000 * MiB, page_bytes=MiB, slot_bytes=10 * MiB, page_size=16,
                                     max_model_len=3200) == 4
    assert max_full_length_sequences(budget_bytes=100 * MiB, page_bytes=MiB, slot_bytes=10 * MiB, page_size=16,
                                     max_model_len=3200) == 0


def test_checkpoints_raise_the_page_cap():
    # prefix-cache checkpoints keep their prefixes' pages after the request ends: with max_num_seqs=1 the pool must
    # still hold more than one sequence, or every new request evicts the checkpoints it could have resumed from
    p = plan_memory(budget_bytes=10_000 * MiB, page_bytes=1 * MiB, slot_bytes=1 * MiB, page_size=16,
                    max_num_seqs=1, max_model_len=160, num_checkpoints=4)
    assert p.num_checkpoints == 4 and p.num_pages == 10 * (1 + 4)


@pytest.mark.parametrize("page_bytes, slot_bytes", [(1 * MiB, 0), (0, 1 * MiB)])
def test_a_cache_that_takes_no_memory_is_capped_by_the_sequences(page_bytes, slot_bytes):
    # no GDN layers: empty state slots; no attention layers: empty pages (the planner divided by their size)
    p = plan_memory(budget_bytes=1000 * MiB, page_bytes=page_bytes, slot_bytes=slot_bytes, page_size=16,
                    max_num_seqs=4, max_model_len=160, checkpoint_fraction=0.1)
    assert p.num_slots == 4 and p.num_checkpoints == 64 and p.num_pages == 10 * (4 + 64)


def test_log_line_gives_the_concurrency_at_max_model_len():
    """vLLM's start-up figure: requests of max_model_len tokens that fit at once (the pages or the slots, fewer)."""
    p = plan_memory(budget_bytes=1000 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                    max_num_seqs=8, max_model_len=3200)
    assert p.describe(16, 3200).endswith("maximum concurrency for 3200 tokens per request: 4.60x")
    assert p.concurrency(16, 160) == 8.0  # short requests: every slot


@pytest.mark.parametrize("checkpoints", [0, 5])
def test_long_request_hint_names_the_max_num_seqs_that_runs_more_of_them(checkpoints):
    """64 slots of 10 MiB leave the pages of one 200-page request; the hint's max_num_seqs, planned again, runs as
    many of them at once as it says, with the same checkpoints."""
    args = dict(budget_bytes=1000 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16, max_model_len=3200,
                num_checkpoints=checkpoints)
    p = plan_memory(max_num_seqs=64, **args)
    assert p.concurrency(16, 3200) == (1.55 if checkpoints else 1.8) and p.num_slots == 64
    hint = p.long_request_hint(16, 3200)
    assert hint is not None and "wait for KV pages once 1 of them run" in hint
    assert "--max-num-seqs 4 (max_num_seqs=4) runs 4 of them at once" in hint
    again = plan_memory(max_num_seqs=4, **args)
    assert again.num_checkpoints == checkpoints and again.concurrency(16, 3200) == 4.0


def test_no_long_request_hint_when_the_slots_do_not_hold_them_back():
    roomy = plan_memory(budget_bytes=10_000 * MiB, page_bytes=1 * MiB, slot_bytes=1 * MiB, page_size=16,
                        max_num_seqs=2, max_model_len=160)
    assert roomy.long_request_hint(16, 160) is None  # every slot has its pages
    # 8 slots, pages for 4: giving up slots would not fit a 5th (each costs 10 MiB + 200 pages)
    tight = plan_memory(budget_bytes=1000 * MiB, page_bytes=1 * MiB, slot_bytes=10 * MiB, page_size=16,
                        max_num_seqs=8, max_model_len=3200)
    assert tight.long_request_hint(16, 3200) is None
