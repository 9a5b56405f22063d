"""The engine config: one frozen object composed of validated sections (model, runner, cache, scheduler, parallel,
speculative, quantization). Built once from the user's options (`config.options.EngineArgs`) and never mutated; a
changed copy is made with dataclasses.replace. Every error names the option and a value that works."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deltaserve.config.common import ConfigError, is_int, require
from deltaserve.config.model import ModelConfig
from deltaserve.config.shapes import RankShapes

LOAD_FORMATS = ("auto", "safetensors", "dummy")
MODEL_DTYPES = ("bfloat16", "float16", "float32")
# GDN recurrent state storage (computed in fp32 either way). float16 is not offered: its 5-bit exponent cannot hold
# the state's range, and an fp16 state has been reported to wreck accuracy.
STATE_DTYPES = ("float32", "bfloat16")
# KV page storage of the full-attention layers: auto = the model dtype; the others keep a symmetric scale per token
# and KV head, computed when the KV is written (docs/KERNELS.md, "Quantized KV cache").
KV_CACHE_DTYPES = ("auto", "fp8", "int8", "int4")
FP8_ACTIVATIONS = ("off", "dynamic")
# Under max_step_ms a step with decode rows carries at least max_num_batched_tokens / this many prefill tokens
# (128 at 2048, 512 at 8192): a prompt of L tokens then needs at most 16 L / max_num_batched_tokens steps, however
# tight the budget.
MIN_PREFILL_CHUNK_DIVISOR = 16
# Token budget of a step by default (EngineArgs): large GPUs take an 8k prompt in one step, which reads the weights once
# instead of once per chunk. H200, the published 8k-in / 1k-out workload through the server (RESULTS.md 2026-12-04),
# 2048 -> 8192: 35B-A3B time per output token at concurrency 16 13.3 -> 11.8 ms, 10,205 -> 11,366 tok/s, inter-token
# p99 63 -> 21 ms; 27B 28.7 -> 25.3 ms, 4,615 -> 4,854 tok/s, p99 214 -> 47 ms. The cost: at concurrency 16 a new
# prompt waits behind whole 8k prefills (TTFT p50 35B-A3B 680 -> 828 ms though its mean fell, 27B 2.3 -> 4.2 s).
# Smaller GPUs keep 2048 (less activation memory; vLLM splits its default the same way); --max-step-ms bounds mixed
# steps either way.
LARGE_GPU_GIB = 70
LARGE_GPU_BATCHED_TOKENS = 8192
BATCHED_TOKENS = 2048
# Prefix-cache checkpoints along a long prompt: every this many tokens at least. A checkpoint position ends its
# prefill chunk (the state there must be a step's end state), so EngineArgs makes the interval a whole step when the
# step is larger: with 8192-token steps and a 4096 interval, every fresh 8k prompt ran as two 4096-token steps (and
# a 35B-A3B step reads every expert's weights once per step).
CHECKPOINT_INTERVAL = 4096
# Share of the cache memory given to prefix-cache checkpoints when their number is not set.
CHECKPOINT_FRACTION = 0.1


def _positive_int(value: object, option: str) -> None:
    require(is_int(value) and value > 0, f"'{option}' must be a positive integer, got {value!r}")  # type: ignore


@dataclass(frozen=True)
class RunnerConfig:
    """Where and how the model runs."""

    device: str | None = None       # None: cuda when a GPU is visible, cpu otherwise (the runner resolves it)
    dtype: str | None = None        # None: the checkpoint's dtype
    load_format: str = "auto"
    enforce_eager: bool = False     # no CUDA graphs
    prefill_graph_tokens: int | None = None  # varlen graphs at 64, 128, ... tokens (and a full step's) up to this;
    # < 64: none; None: chosen by the memory planner (engine/memory.py: the full step's where it costs little memory)
    step_trace: str | None = None   # a file the engine writes one JSON line per step into (engine/step_trace.py)

    def __post_init__(self) -> None:
        require(self.device is None or (isinstance(self.device, str) and self.device.split(":")[0] in ("cuda", "cpu")),
                f"'device' is {self.device!r}; use 'cuda', 'cuda:N' or 'cpu'")
        require(self.dtype is None or self.dtype in MODEL_DTYPES,
                f"'dtype' is {self.dtype!r}; use one of {MODEL_DTYPES} (or leave it out for the checkpoint's)")
        require(self.load_format in LOAD_FORMATS, f"'load_format' is {self.load_format!r}; use one of {LOAD_FORMATS}")
        require(isinstance(self.enforce_eager, bool), f"'enforce_eager' must be a bool, got {self.enforce_eager!r}")
        require(self.prefill_graph_tokens is None or (is_int(self.prefill_graph_tokens) and
                                                      self.prefill_graph_tokens >= 0),
                f"'prefill_graph_tokens' must be an integer >= 0 (0: no prefill graphs) or None (chosen from the "
                f"memory), got {self.prefill_graph_tokens!r}")
        require(self.step_trace is None or (isinstance(self.step_trace, str) and self.step_trace != ""),
                f"'step_trace' is {self.step_trace!r}; give the path of a file to write the trace into, or None")


@dataclass(frozen=True)
class CacheConfig:
    """Sizes of the paged KV pool (full-attention layers) and the GDN state pool."""

    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_pages: int | None = None        # None: planned from free memory
    num_state_slots: int | None = None  # None: max_num_seqs
    state_dtype: str = "float32"
    enable_prefix_caching: bool = True
    num_checkpoints: int | None = None   # prefix-cache GDN state checkpoints; None: CHECKPOINT_FRACTION of memory
    checkpoint_interval: int = CHECKPOINT_INTERVAL  # a checkpoint every this many tokens along long prompts
    kv_cache_dtype: str = "auto"

    @property
    def checkpoint_fraction(self) -> float:
        return CHECKPOINT_FRACTION if self.enable_prefix_caching else 0.0

    def __post_init__(self) -> None:
        require(is_int(self.page_size) and self.page_size > 0 and self.page_size & (self.page_size - 1) == 0,
                f"'page_size' is {self.page_size!r}; use a power of two (16 recommended)")
        u = self.gpu_memory_utilization
        require(isinstance(u, (int, float)) and not isinstance(u, bool) and math.isfinite(u) and 0 < u <= 1,
                f"'gpu_memory_utilization' is {u!r}; it must be in (0, 1]")
        for name in ("num_pages", "num_state_slots"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        require(self.state_dtype in STATE_DTYPES,
                f"'state_dtype' is {self.state_dtype!r}; use float32 (default) or bfloat16 (half the state memory)")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                f"'kv_cache_dtype' is {self.kv_cache_dtype!r}; use auto (the model dtype, default), fp8, int8 or int4")
        require(isinstance(self.enable_prefix_caching, bool),
                f"'enable_prefix_caching' must be a bool, got {self.enable_prefix_caching!r}")
        require(self.num_checkpoints is None or (is_int(self.num_checkpoints) and self.num_checkpoints >= 0),
                f"'num_checkpoints' must be an integer >= 0 (0: no prefix caching), got {self.num_checkpoints!r}")
        _positive_int(self.checkpoint_interval, "checkpoint_interval")
        require(self.checkpoint_interval % self.page_size == 0,
                f"'checkpoint_interval' ({self.checkpoint_interval}) must be a multiple of 'page_size' "
                f"({self.page_size})")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of the scheduler, and whether steps overlap."""

    max_model_len: int = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = BATCHED_TOKENS  # EngineArgs: LARGE_GPU_BATCHED_TOKENS on large GPUs
    # Schedule and launch step n+1 before reading step n's tokens, so a step's host work runs while the GPU computes.
    # None: on for CUDA (elsewhere there is nothing to overlap, and tokens would only come a step later).
    async_scheduling: bool | None = None
    # Per-step time budget (ms) for steps with decode rows: their prefill tokens are capped so the step's predicted
    # time (engine/step_cost.py) stays within it, never below MIN_PREFILL_CHUNK_FRACTION of the token budget.
    # None or 0: off (every step is filled up to max_num_batched_tokens).
    max_step_ms: float | None = None
    # Admission keeps KV pages free for the running requests' expected growth (engine/scheduler.py, GROWTH_*), so
    # that a server whose memory holds fewer requests than arrive queues them instead of preempting (recomputing)
    # the ones it runs. False: admit whenever the pages a prompt needs now are free (tests of preemption itself).
    growth_reserve: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(getattr(self, name), name)
        t = self.max_step_ms
        require(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0),
                f"'max_step_ms' is {t!r}; use a time in milliseconds > 0 (e.g. 50), or 0 / None to fill every step "
                "up to max_num_batched_tokens")
        require(self.async_scheduling is None or isinstance(self.async_scheduling, bool),
                f"'async_scheduling' must be a bool or None, got {self.async_scheduling!r}")
        require(isinstance(self.growth_reserve, bool), f"'growth_reserve' must be a bool, got {self.growth_reserve!r}")

    @property
    def step_budget_ms(self) -> float | None:
        """max_step_ms when the per-step time budget is on, else None."""
        return float(self.max_step_ms) if self.max_step_ms else None

    @property
    def min_prefill_chunk(self) -> int:
        """Prefill tokens a step with decode rows carries at least (when a prompt waits for them), whatever the
        predicted time: the floor that keeps long prompts progressing under a tight budget."""
        return max(1, self.max_num_batched_tokens // MIN_PREFILL_CHUNK_DIVISOR)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over ranks (one process per rank, docs/PARALLEL.md). `rank` is this process's rank,
    set by the launcher (parallel/launch.py), never by users: rank 0 runs the engine, the others run workers."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per rank instead of a slice of each
    rank: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.tensor_parallel_size, "tensor_parallel_size")
        require(isinstance(self.enable_expert_parallel, bool),
                f"'enable_expert_parallel' must be a bool, got {self.enable_expert_parallel!r}")
        require(is_int(self.rank) and 0 <= self.rank < self.tensor_parallel_size,
                f"rank {self.rank!r} is outside [0, tensor_parallel_size={self.tensor_parallel_size})")


MAX_SPECULATIVE_TOKENS = 4
# Largest batch a verify step is run for by default: above it every step is a plain decode step (MTP turns itself
# down). It also sizes the per-position GDN buffers (27B, K = 3: ~16 MB per request since the commit replays the
# recurrent state; ~151 MB when each position's state was kept). From benchmarks/bench_mtp.py on an H200 at the 27B
# shape with K = 3, derived speedups at the published acceptance length: 1.95x / 1.45x / 0.91x at batch 1 / 8 / 32
# (RESULTS.md, 2026-12-03), then, with the fused verify kernels, 2.65x / 2.26x / 1.47x (2026-12-04; the commit kernel
# since cut the batch-32 commit from 11.4 to ~2.5 ms). Drafting pays past 32 as well; 16 stays until a batch-64 run
# says where the break-even moved.
SPECULATIVE_MAX_BATCH = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the checkpoint's MTP head: K = num_speculative_tokens drafts per request and step
    (0: off). The MTP head is loaded, and given KV pages, only when this section enables it. Verify steps run only
    while at most `max_batch` requests are running (above that, drafting costs more than it saves). `draft_vocab`
    N: the draft passes compute logits over the first N token ids only (None: the whole vocabulary); the range
    1..vocab_size is checked by EngineConfig, which knows the model. `simulated_acceptance` (benchmarks with dummy
    weights only, checked by EngineConfig): the mean tokens a verify step keeps, drafts accepted at random instead of
    by the target's samples (engine/speculative.py SimulatedAcceptance)."""

    num_speculative_tokens: int = 0
    max_batch: int = SPECULATIVE_MAX_BATCH
    draft_vocab: int | None = None
    simulated_acceptance: float | None = None

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        require(is_int(k) and 0 <= k <= MAX_SPECULATIVE_TOKENS,
                f"'speculative_tokens' is {k!r}; use 1 to {MAX_SPECULATIVE_TOKENS} draft tokens per step (MTP), or 0 "
                "to turn speculative decoding off")
        _positive_int(self.max_batch, "speculative_max_batch")
        require(self.draft_vocab is None or is_int(self.draft_vocab),
                f"'speculative_draft_vocab' must be an integer number of token ids, got {self.draft_vocab!r}")
        al, k = self.simulated_acceptance, self.num_speculative_tokens
        require(al is None or (self.enabled and isinstance(al, (int, float)) and not isinstance(al, bool)
                               and 1 <= al <= 1 + k),
                f"'speculative_simulated_acceptance' is {al!r}" + (
                    f"; use a mean number of tokens a verify step keeps, 1 to {1 + k} (1 + speculative_tokens)"
                    if self.enabled else ": it applies to MTP speculative decoding, which is off; set "
                    "speculative_tokens too"))

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


def parse_speculative_config(text: str | dict | None) -> int | None:
    """vLLM's --speculative-config JSON ('{"method": "mtp", "num_speculative_tokens": K}') -> K (None: not given).
    Only the checkpoint's own MTP head is supported as a drafter."""
    if text is None or text == "":
        return None
    import json

    try:
        spec = json.loads(text) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"'speculative_config' is not valid JSON ({e}); use "
                          '\'{"method": "mtp", "num_speculative_tokens": 2}\'') from None
    if not isinstance(spec, dict):
        raise ConfigError(f"'speculative_config' must be a JSON object, got {text!r}")
    method = spec.get("method", "mtp")
    if method not in ("mtp", "qwen3_next_mtp", "qwen3_5_mtp"):
        raise ConfigError(f"'speculative_config' method {method!r} is not supported; deltaserve drafts with the "
                          "checkpoint's MTP head only: use \"method\": \"mtp\"")
    unknown = sorted(set(spec) - {"method", "num_speculative_tokens", "model"})
    if unknown:
        raise ConfigError(f"'speculative_config' has unsupported keys {unknown}; deltaserve reads 'method' and "
                          "'num_speculative_tokens'")
    k = spec.get("num_speculative_tokens")
    # checked here too, not only by SpeculativeConfig, so the error names the option the user gave
    if not is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"'speculative_config' needs an integer 'num_speculative_tokens' (1 to "
                          f"{MAX_SPECULATIVE_TOKENS}), got {k!r}")
    return int(k)


@dataclass(frozen=True)
class QuantizationConfig:
    """The checkpoint's `quantization_config`: its method and the raw fields the weight formats read."""

    method: str
    raw: dict[str, Any] = field(compare=False, hash=False, default_factory=dict)
    fp8_activations: str = "off"  # "dynamic": FP8 weights run W8A8, activations quantized per token and 128 columns

    def __post_init__(self) -> None:
        require(self.fp8_activations in FP8_ACTIVATIONS,
                f"fp8_activations must be one of {FP8_ACTIVATIONS}, got {self.fp8_activations!r}")

    @classmethod
    def from_model(cls, model: ModelConfig, fp8_activations: str = "off") -> QuantizationConfig | None:
        raw = model.quantization_config
        if not raw:
            require(fp8_activations == "off", f"fp8_activations={fp8_activations!r} applies to FP8 checkpoints, and "
                    f"{model.model_dir or 'this model'} is not quantized; leave it 'off'")
            return None
        if not isinstance(raw, dict):
            raise ConfigError(f"config field 'quantization_config' must be an object, got {raw!r}")
        return cls(method=str(raw.get("quant_method", "?")), raw=dict(raw), fp8_activations=fp8_activations)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from. Sections are validated on their own; this checks how they fit together."""

    model: ModelConfig
    runner: RunnerConfig = RunnerConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        self.rank_shapes(0)  # raises naming the dimension when the TP size does not divide the model
        k = self.speculative.num_speculative_tokens
        require(not self.speculative.enabled or self.model.mtp_num_hidden_layers > 0,
                f"'speculative_tokens' ({k}) asks for speculative decoding with the checkpoint's MTP head, but the "
                f"checkpoint in {self.model.model_dir} has no MTP head (mtp_num_hidden_layers is 0 in its "
                "config.json); use a checkpoint that ships its mtp.* tensors, or leave speculative_tokens at 0")
        # checked here, not when the caches are planned after the weights are loaded (kernels' kv_stored_dim)
        require(self.cache.kv_cache_dtype != "int4" or self.model.head_dim % 2 == 0,
                f"'kv_cache_dtype' int4 packs two values of a head vector per byte and needs an even head_dim, but "
                f"the model's head_dim is {self.model.head_dim}; use fp8 or int8")
        # a lone request of max_model_len must fit the pool, or it would preempt itself forever (the scheduler checks
        # it too; here it fails before the weights are loaded)
        cc, length = self.cache, self.scheduler.max_model_len
        need = -(-length // cc.page_size)
        require(cc.num_pages is None or cc.num_pages >= need,
                f"'num_pages' is {cc.num_pages}: {cc.num_pages} pages x {cc.page_size} tokens hold fewer tokens than "
                f"max_model_len ({length}), so a request of that length could never run; use num_pages >= {need}, "
                "a smaller max_model_len, or leave num_pages unset to plan it from memory")
        # quantized checkpoints shard under TP / EP too (layers/quant.py); a split a format cannot take fails when
        # the model is built, naming the module, the dimension and the sizes that work
        n, vocab = self.speculative.draft_vocab, self.model.vocab_size
        tp = self.parallel.tensor_parallel_size
        # each rank holds a slice of the lm_head's rows; the draft vocabulary is the first rows of the whole one
        require(n is None or tp == 1,
                f"'speculative_draft_vocab' ({n}) with tensor_parallel_size {tp} is not supported (the draft "
                "vocabulary is the first rows of the lm_head, which tensor parallelism splits over the ranks); "
                "leave speculative_draft_vocab unset (drafts over the whole vocabulary) or use tensor_parallel_size 1")
        require(n is None or 1 <= n <= vocab,
                f"'speculative_draft_vocab' is {n!r}; use 1 to {vocab} (the model's vocab_size): the draft passes "
                "score the token ids below it. Leave it unset to draft over the whole vocabulary")
        require(n is None or self.speculative.enabled,
                "'speculative_draft_vocab' applies to MTP speculative decoding, which is off; set speculative_tokens "
                "too, or leave speculative_draft_vocab unset")
        require(self.speculative.simulated_acceptance is None or self.runner.load_format == "dummy",
                "'speculative_simulated_acceptance' replaces the model's tokens by its drafts, to time serving at a "
                "chosen acceptance length with random weights: it needs load_format 'dummy'. With real weights the "
                "acceptance is measured, not simulated: leave it unset")

    def rank_shapes(self, rank: int | None = None) -> RankShapes:
        """The shapes of `rank` (default: this process's rank, parallel.rank)."""
        p = self.parallel
        return RankShapes.for_rank(self.model, p.tensor_parallel_size, p.rank if rank is None else rank,
                                   expert_parallel=p.enable_expert_parallel)

    @property
    def with_mtp(self) -> bool:
        """Whether the MTP head is built, loaded and given KV pages."""
        return self.speculative.enabled

    @property
    def num_speculative_tokens(self) -> int:
        return self.speculative.num_speculative_tokens

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len
