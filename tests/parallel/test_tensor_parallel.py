"""Tensor and expert parallelism on CPU (gloo, worker processes spawned by the engine): the same greedy tokens as one
process and logprobs within LOGPROB_ATOL, on tiny dense (tied embedding) and MoE (fused and per-expert experts)
checkpoints, also with MTP speculative decoding; each rank reads only its part of the sharded tensors; impossible sizes
fail at start naming the dimension; a killed or hung worker stops the engine with an error (naming the rank when it
died) in bounded time, and one whose load or step raises at once with its error."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.config import ConfigError, ModelConfig, RankShapes
from deltaserve.demo import write_byte_tokenizer
from deltaserve.parallel.runner import RankFailure
from tests.engine.test_speculative import Oracle
from tests.models.factory import TinySpec, save_checkpoint
from tests.parallel.compare import assert_same

VOCAB = 320
# fp32 everywhere; the ranks' partial sums are added in another order than one process adds them, so logprobs differ
# by rounding only (observed ~1e-6).
LOGPROB_ATOL = 1e-4
BF16_LOGPROB_ATOL = 0.05  # about two bf16 steps at the tiny model's logit scale
# GDN: 4 key heads / 8 value heads, so the q, k and v sections split 4 ways; 4 query heads over 2 KV heads, so TP 4
# replicates each KV head on 2 ranks.
TP4_HEADS = {"vocab_size": VOCAB, "linear_num_key_heads": 4, "linear_num_value_heads": 8}


def _checkpoint(path, spec: TinySpec, seed: int):
    save_checkpoint(spec, path, seed=seed)
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text('{"eos_token_id": [256, 258]}')
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp_dense"), TinySpec("tp_dense", tie=True, extra=TP4_HEADS), 11)


@pytest.fixture(scope="module")
def moe_fused(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp_moe_fused"),
                       TinySpec("tp_moe_fused", moe=True, per_expert=False, extra=TP4_HEADS), 12)


@pytest.fixture(scope="module")
def moe_per_expert(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp_moe_pe"), TinySpec("tp_moe_pe", moe=True, extra=TP4_HEADS), 13)


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch):
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "60")  # inherited by the spawned workers


def make_llm(path, tp: int = 1, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=256, num_pages=64, max_num_seqs=8,
               tensor_parallel_size=tp, **kw)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in (37, 5, 70)]


PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def run(llm: LLM) -> list:
    try:
        return [o.outputs[0] for o in llm.generate(prompts(), PARAMS)]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("fixture, options", [
    ("dense", {}),                                                  # tied vocab-parallel embedding / lm_head
    ("moe_fused", {}),                                              # expert tensors sliced along dims 1 and 2
    ("moe_fused", {"enable_expert_parallel": True}),                # 4 whole experts per rank (fused tensors)
    ("moe_per_expert", {"enable_expert_parallel": True}),           # per-expert tensors under their global ids
])
def test_two_ranks_match_one_process(request, fixture, options):
    path = request.getfixturevalue(fixture)
    # small steps: chunked prefill, then mixed prefill / decode batches
    ref = run(make_llm(path, max_num_batched_tokens=32))
    assert_same(run(make_llm(path, 2, max_num_batched_tokens=32, **options)), ref, LOGPROB_ATOL)


def test_two_ranks_in_bf16_stay_within_rounding(dense):
    """bf16: each rank's partial outputs are rounded before the all-reduce sums them, so the ranks' results differ
    from one process by rounding (greedy tokens may then part after many steps; the demo model's do after ~15).
    Prompt logprobs stay within BF16_LOGPROB_ATOL (observed 2.5e-3)."""
    prompt = prompts()[2]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(llm: LLM) -> list[float]:
        try:
            return [e.logprob for e in llm.generate([prompt], params)[0].prompt_logprobs if e is not None]
        finally:
            llm.engine.shutdown()

    one = prompt_logprobs(LLM(str(dense), dtype="bfloat16", device="cpu", max_model_len=256, num_pages=64))
    two = prompt_logprobs(LLM(str(dense), dtype="bfloat16", device="cpu", max_model_len=256, num_pages=64,
                              tensor_parallel_size=2))
    assert len(one) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(one, two)) < BF16_LOGPROB_ATOL


@pytest.mark.parametrize("fixture, options", [
    ("dense", {}),
    pytest.param("moe_per_expert", {"enable_expert_parallel": True}, marks=pytest.mark.slow),  # ~10 s more
])
def test_four_ranks_match_one_process(request, fixture, options):
    """TP 4: each KV head replicated on two ranks, GDN sections split four ways (and 2 experts per rank)."""
    path = request.getfixturevalue(fixture)
    assert_same(run(make_llm(path, 4, **options)), run(make_llm(path)), LOGPROB_ATOL)


def test_ranks_read_only_their_part(dense, monkeypatch):
    """Rank 1 of 2 and rank 3 of 4 (no process group needed to load): their GDN in_proj and conv weight hold their
    q, k and v heads from each section, k_proj holds the KV head of their query heads (replicated at TP 4), and no
    split tensor is read whole."""
    from safetensors.torch import load_file

    from deltaserve.models import loader

    full = {loader.text_model_name(n): t for n, t in load_file(dense / "model.safetensors").items()}
    model_config = ModelConfig.from_hf(str(dense))
    reads: list[tuple[str, int]] = []
    real_read = loader.read_entry
    monkeypatch.setattr(loader, "read_entry", lambda e: reads.append((e.name, e.end - e.begin)) or real_read(e))
    for tp, rank in ((2, 1), (4, 3)):
        reads.clear()
        shapes = RankShapes.for_rank(model_config, tp, rank)
        model = loader.load_model(model_config, dtype=torch.float32, shapes=shapes)
        gdn = model.model.layers[0].linear_attn
        p = "model.layers.0.linear_attn."
        kd, vd = model_config.key_dim, model_config.value_dim
        k, v = kd // tp, vd // tp
        sections = [(rank * k, k), (kd + rank * k, k), (2 * kd + rank * v, v)]
        want_qkv = torch.cat([full[p + "in_proj_qkv.weight"][s:s + n] for s, n in sections])
        assert torch.equal(gdn.in_proj.weight[:2 * k + v], want_qkv)
        assert torch.equal(gdn.conv1d.weight, torch.cat([full[p + "conv1d.weight"][s:s + n] for s, n in sections]))
        hv = model_config.linear_num_value_heads // tp
        assert torch.equal(gdn.A_log, full[p + "A_log"][rank * hv:(rank + 1) * hv])
        assert torch.equal(gdn.out_proj.weight, full[p + "out_proj.weight"][:, rank * v:(rank + 1) * v])
        attn = model.model.layers[3].self_attn
        hd, kv_head = model_config.head_dim, rank // shapes.kv_replicas * shapes.num_kv_heads
        k_rows = attn.qkv_proj.weight[2 * shapes.num_heads * hd:][:shapes.num_kv_heads * hd]
        k_full = full["model.layers.3.self_attn.k_proj.weight"]
        assert torch.equal(k_rows, k_full[kv_head * hd:(kv_head + shapes.num_kv_heads) * hd])
        sizes = {n: t.numel() * t.element_size() for n, t in load_file(dense / "model.safetensors").items()}
        whole = {n for n, size in reads if size == sizes[n]}
        assert not any(n.endswith(("proj.weight", "conv1d.weight", "embed_tokens.weight")) for n in whole), whole


def test_prefix_cache_async_scheduling_and_grammar_under_two_ranks(dense):
    """The paths where rank 0 sends more than step inputs: steps launched before the previous step's tokens reach
    the host (workers read rank 0's last-token buffer), prefix-cache state copies and snapshots, and sampling that
    waits for a grammar mask."""
    from deltaserve.structured import StructuredSpec

    regex = SamplingParams(temperature=0, max_tokens=12, structured=StructuredSpec.regex("[a-f]{3}[0-9]{4}"))

    def outputs(llm: LLM) -> list[list[int]]:
        try:
            first = llm.generate(prompts(), PARAMS)
            again = llm.generate(prompts()[:2], PARAMS)  # their prefixes are cached now
            constrained = llm.generate(prompts(), regex)
            assert llm.engine.stats()["prompt_tokens_cached"] > 0
            return [o.outputs[0].token_ids for o in first + again + constrained]
        finally:
            llm.engine.shutdown()

    opts = dict(async_scheduling=True, max_num_batched_tokens=32)
    assert outputs(make_llm(dense, 2, **opts)) == outputs(make_llm(dense, **opts))


# MTP heads; seeds whose greedy continuations of prompts() change token every step (the stop tokens below)
@pytest.fixture(scope="module")
def dense_mtp(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp_dense_mtp"), TinySpec("tp_dense_mtp", mtp=True, extra=TP4_HEADS),
                       14)


@pytest.fixture(scope="module")
def moe_mtp(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp_moe_mtp"), TinySpec("tp_moe_mtp", moe=True, mtp=True,
                                                                       extra=TP4_HEADS), 16)


@pytest.mark.parametrize("fixture, options", [("dense_mtp", {}), ("moe_mtp", {}),
                                              ("moe_mtp", {"enable_expert_parallel": True})])
def test_two_ranks_with_mtp_match_one_process_without(request, fixture, options):
    """MTP speculative decoding under two ranks: every rank keeps the verified tokens rank 0 sampled, commits its
    shard of the GDN states and joins the MTP head's passes (their collectives). Rank 0's drafts are replaced by
    oracle ones: right in the first turn, whose stop tokens then end requests inside accepted runs (each rank
    commits the state at the stop token: `keep_fewer`), 60% right in the second, which resumes from the first
    turn's prefix-cache checkpoints, so that verify steps keep every count of drafts. Greedy tokens and logprobs are
    those of one process without MTP."""
    path = request.getfixturevalue(fixture)
    first = prompts()
    one = make_llm(path, max_num_batched_tokens=32)
    ahead = [list(o.outputs[0].token_ids) for o in one.generate(first, SamplingParams(temperature=0, max_tokens=16,
                                                                                        ignore_eos=True))]
    ends = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[c[n]], ignore_eos=True, logprobs=3)
            for c, n in zip(ahead, (5, 6, 9))]  # inside verify steps' runs of up to 4 kept tokens
    assert all(c.index(c[n]) == n for c, n in zip(ahead, (5, 6, 9)))

    def turns(llm: LLM, oracle: Oracle | None = None) -> list:
        out = [o.outputs[0] for o in llm.generate(first, ends)]
        if oracle is not None:
            oracle.always_right = False
        again = [p + list(o.token_ids) + [3, 1, 4] for p, o in zip(first, out)]
        out += [o.outputs[0] for o in llm.generate(again, PARAMS)]
        assert llm.engine.stats()["prompt_tokens_cached"] > 0
        return out

    ref = turns(one)
    reference = {tuple(p): c for p, c in zip(first, ahead)}
    reference.update({tuple(p + list(o.token_ids) + [3, 1, 4]): list(o2.token_ids)
                      for p, o, o2 in zip(first, ref, ref[3:])})
    llm = make_llm(path, 2, max_num_batched_tokens=32, speculative_tokens=3, **options)
    try:
        oracle = Oracle(llm, reference, always_right=True)
        ended_inside = spy(llm.engine.runner, "keep_fewer")
        assert_same(turns(llm, oracle), ref, LOGPROB_ATOL)
    finally:
        llm.engine.shutdown()
    accepted, drafted = llm.engine.spec_accepted_per_position, llm.engine.spec_drafted_per_position
    assert accepted[-1] > 0 and accepted[0] < drafted[0] and ended_inside


def test_two_ranks_with_mtp_and_a_grammar(dense_mtp):
    """A step with a constrained row samples once rank 0 has the grammar mask (the workers' "sample" command): every
    rank then runs the MTP head's passes from rank 0's tokens there too (the constrained row verifies placeholder
    drafts). Outputs as one process without MTP."""
    from deltaserve.structured import StructuredSpec

    regex = SamplingParams(temperature=0, max_tokens=12, structured=StructuredSpec.regex("[a-f]{3}[0-9]{4}"))
    params = [regex, PARAMS, PARAMS]

    def outputs(llm: LLM) -> list[list[int]]:
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts(), params)]
        finally:
            llm.engine.shutdown()

    mtp = make_llm(dense_mtp, 2, speculative_tokens=2)
    assert outputs(mtp) == outputs(make_llm(dense_mtp)) and mtp.engine.spec_counters["spec_verify_steps"] > 0


def spy(obj, name: str) -> list:
    """Record the arguments of each call of obj.name (still calling it)."""
    calls, fn = [], getattr(obj, name)

    def recorded(*args):
        calls.append(args)
        return fn(*args)

    setattr(obj, name, recorded)
    return calls


def test_impossible_sizes_fail_at_start(dense, moe_fused):
    with pytest.raises(ConfigError, match=r"does not divide the model's num_attention_heads \(4\); sizes that work "
                                          r"for it: \[1, 2, 4\]; tensor_parallel_size values that fit every "
                                          r"dimension of this model: \[1, 2, 4\]"):
        make_llm(dense, 3)
    with pytest.raises(ConfigError, match=r"larger than num_key_value_heads \(2\) but not a multiple"):
        RankShapes.for_rank(dataclasses.replace(ModelConfig.from_hf(str(dense)), num_attention_heads=6,
                                                linear_num_key_heads=3, linear_num_value_heads=6), 3)
    six_experts = dataclasses.replace(ModelConfig.from_hf(str(moe_fused)), num_experts=6)
    RankShapes.for_rank(six_experts, 4)  # a slice of each of the 6 experts: fine
    with pytest.raises(ConfigError, match=r"num_experts \(6\); sizes that work for it: \[1, 2, 3, 6\]; .* with "
                                          r"expert parallelism: \[1, 2\]"):
        RankShapes.for_rank(six_experts, 4, expert_parallel=True)


def test_killed_worker_stops_the_engine_naming_it(dense):
    """The step that finds the rank dead gives back what schedule() reserved for it (here the checkpoint at the
    40-token prompt's end: its pages and checkpoint slot stayed reserved for ever), so aborting the requests leaves
    only published checkpoints holding memory."""
    llm = make_llm(dense, 2)
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        os.kill(llm.engine.runner.workers[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="tensor-parallel rank 1 died"):
            llm.generate([list(range(1, 41))], SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 20
        assert llm.engine.cache.is_empty() and not llm.engine.has_unfinished()  # generate aborted its request
        with pytest.raises(RankFailure):  # and stays stopped
            llm.generate([[4, 5]], SamplingParams(max_tokens=2))
    finally:
        llm.engine.shutdown()


def test_hung_worker_stops_the_engine_after_the_timeout(dense, monkeypatch):
    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "4")
    llm = make_llm(dense, 2)
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        os.kill(llm.engine.runner.workers[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="tensor-parallel rank 1 did not take the next command within 4 s"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 12
    finally:
        llm.engine.shutdown()  # kills the stopped worker


@pytest.mark.parametrize("fault, raised", [
    (RuntimeError("injected fault on rank 0"), RankFailure),
    (KeyboardInterrupt(), KeyboardInterrupt),  # Ctrl-C: raised as it is, and the engine stops
])
def test_a_fault_on_rank_0_inside_a_step_stops_the_engine_at_once_with_its_error(dense, monkeypatch, fault, raised):
    """Rank 0's sampler fails after the step's model collectives, while the worker waits for rank 0's last-token
    broadcast. Before: the step's request failed (or the Ctrl-C left) and the engine went on; its next command, and
    the shutdown's stop command, waited the collective timeout (300 s by default) for the worker still in that
    broadcast, and the next command then blamed rank 1 for hanging."""
    from deltaserve.engine.runner import ModelRunner

    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "10")
    llm = make_llm(dense, 2)

    def fail(*args, **kwargs):
        raise fault

    monkeypatch.setattr(ModelRunner, "sample", fail)  # in this process (rank 0) only: the worker was spawned
    error = rf"tensor-parallel rank 0 failed \({type(fault).__name__}(: injected fault on rank 0)?\).*engine stopped"
    try:
        start = time.monotonic()
        with pytest.raises(raised, match=error if raised is RankFailure else None):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        assert llm.engine.cache.is_empty() and not llm.engine.has_unfinished()
        with pytest.raises(RankFailure, match=error):  # and stays stopped
            llm.generate([[4, 5]], SamplingParams(max_tokens=2))
        llm.engine.shutdown()  # the worker is killed, not sent a command it cannot take
        assert time.monotonic() - start < 5
    finally:
        llm.engine.shutdown()


# Rank 1 of a torchrun-style launch where a function of its own (deltaserve.MODULE:NAME) fails (a fault of its
# device, say) while rank 0's does not: parts of its load, or each of its steps. The error path under test (the
# worker's start and loop, rank 0's driver) is the real one.
RANK1_FAULT = """
import importlib, sys

target, message = sys.argv.pop(1), sys.argv.pop(1)
module, path = target.split(":")
*parents, name = path.split(".")
owner = importlib.import_module("deltaserve." + module)
for parent in parents:
    owner = getattr(owner, parent)

def fail(*args, **kwargs):
    raise RuntimeError(message)

setattr(owner, name, fail)
from deltaserve.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("where, message", [
    ("parallel.runner:TPModelRunner.__init__", "injected fault on rank 1 (its device failed to start)"),
    ("engine.runner:ModelRunner.plan_memory", "injected fault on rank 1"),  # after the start handshake
    ("engine.runner:new_cache", "injected fault on rank 1"),  # after the ranks agreed on the plan
    ("parallel.runner:TPModelRunner.launch", "injected fault on rank 1"),
    ("parallel.runner:TPModelRunner.launch", "device timeout (lost connection)"),  # not a collective's, whatever
])
def test_a_fault_on_rank_1_alone_stops_the_engine_at_once_with_its_error(dense, monkeypatch, where, message):
    """Before: a step that failed on rank 1 alone left rank 0 in the step's collectives until their timeout, then
    reported a collective failure without the rank's error; an error whose text said "timeout", "connection" or
    "failed to start" was taken for the group's and not reported; and a load that failed after the start handshake
    hung rank 0's start (in the plan's all-reduce) or its first step (until the timeout, blaming a hang)."""
    import re
    import subprocess
    import sys
    import threading

    from deltaserve.parallel.launch import _free_port

    monkeypatch.setenv("DELTASERVE_DIST_TIMEOUT", "20")
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    args = ["generate", str(dense), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
            "--num-pages", "64", "--max-num-seqs", "8", "--tensor-parallel-size", "2", "--log-level", "ERROR"]
    worker = subprocess.Popen([sys.executable, "-c", RANK1_FAULT, where, message, *args], stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **launch, "RANK": "1", "LOCAL_RANK": "1"})
    for name, value in {**launch, "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    llm = None
    watchdog = threading.Timer(40, worker.kill)  # a rank 0 that waits for the worker for ever fails instead
    watchdog.start()
    try:
        with pytest.raises(RankFailure, match=rf"tensor-parallel rank 1 failed.*RuntimeError: {re.escape(message)}"):
            llm = make_llm(dense, 2)
            start = time.monotonic()
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        if llm is not None:
            assert time.monotonic() - start < 10  # the worker's error, not the collective's timeout (20 s)
        assert worker.wait(10) == 1
    finally:
        watchdog.cancel()
        if llm is not None:
            llm.engine.shutdown()
        worker.kill()
        worker.communicate()


def test_torchrun_style_launch(dense, tmp_path):
    """Two processes started with MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK and the same command:
    rank 0 prints the generation (the same as one process), rank 1 runs its steps and exits with it."""
    import subprocess
    import sys

    from deltaserve.parallel.launch import _free_port

    cmd = [sys.executable, "-c", "import sys; from deltaserve.cli import main; sys.exit(main())", "generate",
           str(dense), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--num-pages", "64",
           "--temperature", "0", "--max-tokens", "8", "--prompt", "hello", "--log-level", "WARNING"]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen(cmd + ["--tensor-parallel-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == one.stdout and outs[1][0] == ""


def test_torchrun_style_variables_must_match(dense, monkeypatch):
    from deltaserve.parallel.launch import is_worker_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert not is_worker_process(2)
    with pytest.raises(ConfigError, match=r"\['MASTER_ADDR', 'MASTER_PORT', 'LOCAL_RANK'\] are not"):
        make_llm(dense, 2)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="WORLD_SIZE is 2 but tensor_parallel_size is 4"):
        make_llm(dense, 4)
    monkeypatch.setenv("RANK", "1")
    assert is_worker_process(2) and not is_worker_process(1)  # TP 1: an engine per process, whatever the launch


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "two"), ("RANK", "x"), ("MASTER_PORT", "abc"),
                                         ("LOCAL_RANK", "0.5")])
def test_a_torchrun_style_variable_that_is_no_number_is_named(dense, monkeypatch, name, value):
    """Each said only "invalid literal for int() with base 10: 'two'", not which variable held it."""
    for var, good in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29556"),
                      ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, good)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^{name}={value!r}: expected an integer"):
        make_llm(dense, 2)
