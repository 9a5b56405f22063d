"""The engine's user-facing options, in one table: each field of `EngineArgs` is an option with its default, help
text and the config section it fills. The CLI's flags (`add_engine_options`), the keyword arguments of `LLM(...)`
and the server's options are all generated from this table, so every default lives here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from deltaserve.config.common import ConfigError, is_int
from deltaserve.config.engine import (BATCHED_TOKENS, CHECKPOINT_INTERVAL, FP8_ACTIVATIONS, KV_CACHE_DTYPES,
                                      LARGE_GPU_BATCHED_TOKENS, LARGE_GPU_GIB, LOAD_FORMATS, MODEL_DTYPES,
                                      SPECULATIVE_MAX_BATCH, STATE_DTYPES, CacheConfig, EngineConfig, ParallelConfig,
                                      QuantizationConfig, RunnerConfig, SchedulerConfig, SpeculativeConfig,
                                      parse_speculative_config)
from deltaserve.config.model import ModelConfig

log = logging.getLogger(__name__)


def _option(default: Any, help: str, *, section: str, type: type | None = None, choices: tuple | None = None,
            flag: str | None = None) -> Any:
    """A field of EngineArgs: `type` is what argparse converts to (None: a bool switch); `flag` overrides the
    generated --flag-name (for switches that turn a default-on feature off)."""
    meta = {"help": help, "section": section, "type": type, "choices": choices, "flag": flag}
    return field(default=default, metadata=meta)


def default_batched_tokens(device: object) -> int:
    """max_num_batched_tokens when not given: LARGE_GPU_BATCHED_TOKENS on a CUDA device of at least LARGE_GPU_GIB
    (device None: the first visible GPU, as the runner resolves it), else BATCHED_TOKENS (also for a device string
    that does not parse: RunnerConfig names what is wrong with it)."""
    import torch

    if not torch.cuda.is_available():
        return BATCHED_TOKENS
    try:
        resolved = torch.device("cuda" if device is None else device)
    except (RuntimeError, TypeError, ValueError):
        return BATCHED_TOKENS
    index = resolved.index or 0
    if resolved.type != "cuda" or index >= torch.cuda.device_count():
        return BATCHED_TOKENS  # the runner names a missing device
    large = torch.cuda.get_device_properties(index).total_memory >= LARGE_GPU_GIB * 2**30
    return LARGE_GPU_BATCHED_TOKENS if large else BATCHED_TOKENS


def default_checkpoint_interval(step_tokens: object, page_size: object) -> object:
    """checkpoint_interval when not given: CHECKPOINT_INTERVAL, or step_tokens rounded down to whole pages when
    larger, so a long prompt's chunks end on the interval's checkpoints (rounded up, a step of 8190 tokens would
    leave 2-token chunks before every checkpoint at 8192); a page larger than CHECKPOINT_INTERVAL makes it one page
    (the interval must be a page multiple). Invalid inputs fall back for the configs to name."""
    if not (is_int(step_tokens) and is_int(page_size) and step_tokens > 0 and page_size > 0):
        return CHECKPOINT_INTERVAL
    return max(-(-CHECKPOINT_INTERVAL // page_size) * page_size, step_tokens // page_size * page_size)


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build an engine, as flat options; `create_engine_config` validates and composes them."""

    model: str
    device: str | None = _option(None, "cuda or cpu (default: cuda when a GPU is visible)", section="runner",
                                 type=str)
    dtype: str | None = _option(None, "model dtype (default: the checkpoint's)", section="runner", type=str,
                                choices=MODEL_DTYPES)
    max_model_len: int | None = _option(
        None, "longest prompt + output in tokens (default: the model's max_position_embeddings)",
        section="scheduler", type=int)
    max_num_seqs: int = _option(64, "most sequences running at once", section="scheduler", type=int)
    max_num_batched_tokens: int | None = _option(
        None, "token budget of one step; longer prompts are prefilled in chunks (default: 8192 on GPUs of at least "
              "70 GiB, else 2048). A prompt that fits it is not split for the decode rows running beside it: its "
              "step goes past the budget by one token a decode row (and the prompt keeps no prefix-cache "
              "checkpoint before its last token unless its renderer marked one or the same prompt waits)",
        section="scheduler", type=int)
    max_step_ms: float | None = _option(
        None, "per-step time budget in ms for steps that carry decode rows: their prefill chunks are sized so the "
              "step's predicted time (a cost model fitted to measured steps) stays within it, bounding inter-token "
              "latency while long prompts prefill (at least max_num_batched_tokens/16 prefill tokens per step; steps "
              "without decode rows keep the full token budget). Off (None/0) by default: on an H200 (27B) a 50 ms "
              "budget cut the inter-token p99 from 501 to 147 ms but raised its p50 from 17 to 93 ms and long "
              "prompts' TTFT 3.5x (benchmarks/RESULTS.md 2026-12-06; benchmarks/bench_step_budget.py measures it)",
        section="scheduler", type=float)
    growth_reserve: bool = _option(
        True, "admit a request whenever the KV pages its prompt needs are free (by default admission also leaves "
              "pages for the running requests' expected growth, learnt from how much of their output limit ended "
              "requests wrote, so a server short of memory queues new requests instead of preempting and "
              "recomputing running ones)", section="scheduler", flag="--no-growth-reserve")
    gpu_memory_utilization: float = _option(0.9, "fraction of device memory deltaserve may use", section="cache",
                                            type=float)
    page_size: int = _option(16, "tokens per KV page", section="cache", type=int)
    num_pages: int | None = _option(None, "KV pages to allocate (default: planned from memory)", section="cache",
                                    type=int)
    state_dtype: str = _option("float32", "GDN recurrent state storage (computed in fp32 either way)",
                               section="cache", type=str, choices=STATE_DTYPES)
    kv_cache_dtype: str = _option(
        "auto", "KV cache storage: auto (the model dtype), fp8 (e4m3), int8 or int4, with a scale per token and KV "
                "head computed as the KV is written (no calibration); benchmarks/bench_accuracy.py measures the cost",
        section="cache", type=str, choices=KV_CACHE_DTYPES)
    enable_prefix_caching: bool = _option(
        True, "turn prefix caching off (on by default: a prompt that shares a prefix with an earlier one resumes from "
              "a GDN state checkpoint and its cached KV instead of prefilling it again)", section="cache",
        flag="--no-prefix-caching")
    num_checkpoints: int | None = _option(
        None, "GDN state checkpoints the prefix cache may keep (default: 10%% of the cache memory)", section="cache",
        type=int)
    checkpoint_interval: int | None = _option(
        None, "a prefix-cache checkpoint every this many tokens of a long prompt; a multiple of --page-size (default: "
              "4096 (one page if pages are larger), or one step of --max-num-batched-tokens rounded down to whole "
              "pages when that is larger: a checkpoint inside a step's chunk would split the step)", section="cache",
        type=int)
    load_format: str = _option("auto", "dummy: random weights at the checkpoint's shapes, for benchmarks",
                               section="runner", type=str, choices=LOAD_FORMATS)
    enforce_eager: bool = _option(False, "disable CUDA graphs (on by default on GPU)", section="runner")
    prefill_graph_tokens: int | None = _option(
        None, "steps with prefill chunks and at most 16 rows (a prompt's chunks, a resumed chat turn, a short prompt "
              "beside a few decode rows) replay CUDA graphs captured at 64, 128, ... tokens and at a full step "
              "(--max-num-batched-tokens + 1, to a multiple of 64), none above this value, instead of launching every "
              "kernel from Python (a step fits a graph of more tokens than it has); their memory is reserved beside "
              "the activations'; below 64: they run eagerly (default: up to the full step where its graphs take at "
              "most 10%% of the cache memory more than those up to 4096 tokens, else 4096)", section="runner",
        type=int)
    step_trace: str | None = _option(
        None, "write one JSON line per launched engine step to this file: host and device times, GPU idle time "
              "before the step, rows and prefill chunks (benchmarks/step_trace.py summarizes it)",
        section="runner", type=str)
    async_scheduling: bool | None = _option(
        None, "make every step wait for its own tokens before the next is scheduled (by default on GPU the next "
              "step is launched first, so host work overlaps the GPU)", section="scheduler",
        flag="--no-async-scheduling")
    speculative_tokens: int = _option(
        0, "MTP speculative decoding: draft tokens per request and step, 1 to 4 (the checkpoint's own MTP head "
           "drafts, one forward verifies; outputs are unchanged). 0: off", section="speculative", type=int)
    speculative_config: str | None = _option(
        None, 'vLLM-style alternative to --speculative-tokens: \'{"method": "mtp", "num_speculative_tokens": K}\'',
        section="speculative", type=str)
    speculative_max_batch: int = _option(
        SPECULATIVE_MAX_BATCH, "verify drafts only while at most this many requests run (larger batches decode "
                               "plainly: drafting stops paying there)", section="speculative", type=int)
    speculative_draft_vocab: int | None = _option(
        None, "MTP drafts score only the first N token ids (BPE ids are roughly ordered by frequency): the draft "
              "passes read N rows of the lm_head instead of all of them. Outputs are unchanged (a draft outside the "
              "subset is never proposed; verification is exact); acceptance may drop. Default: the whole vocabulary",
        section="speculative", type=int)
    speculative_simulated_acceptance: float | None = _option(
        None, "benchmarks with --load-format dummy only (random weights draft nothing the model accepts): accept each "
              "draft at random so that a verify step keeps this many tokens on average, 1 to 1 + "
              "--speculative-tokens (Qwen3.5's published MTP acceptance length is 3.39 at 3 drafts), to time serving "
              "at that acceptance length; the output is then made of the drafts, not the model's choices (sampling "
              "parameters and logprobs do not apply to a forced draft)",
        section="speculative", type=float)
    fp8_activations: str = _option(
        "off", "FP8 checkpoints: 'dynamic' quantizes each linear layer's input to FP8 per token and 128 columns as it "
               "runs and multiplies on FP8 tensor cores (W8A8, as the peers serve Qwen's FP8 releases; routed experts "
               "keep model-dtype inputs); 'off' keeps activations in the model dtype (W8A16: the logits of the "
               "dequantized model). benchmarks/RESULTS.md has its measured accuracy", section="quantization",
        type=str, choices=FP8_ACTIVATIONS)
    tensor_parallel_size: int = _option(
        1, "ranks (GPUs, or CPU processes) the model is split over by tensor parallelism; one worker process per rank, "
           "spawned on this host (several hosts: torchrun-style MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, "
           "see the README)", section="parallel", type=int)
    enable_expert_parallel: bool = _option(
        False, "MoE models under tensor parallelism: give each rank whole experts (num_experts / "
               "tensor_parallel_size of them) instead of a slice of every expert", section="parallel")

    def create_engine_config(self) -> EngineConfig:
        """Read the checkpoint's config.json and compose the validated sections (ConfigError names what is wrong)."""
        self._check_prefix_cache_options()
        model = ModelConfig.from_hf(self.model)
        sections: dict[str, dict[str, Any]] = {"runner": {}, "cache": {}, "scheduler": {}, "speculative": {},
                                               "parallel": {}, "quantization": {}}
        for f in dataclasses.fields(self):
            if f.metadata:
                sections[f.metadata["section"]][f.name] = getattr(self, f.name)
        scheduler = sections["scheduler"]
        if scheduler["max_model_len"] is None:
            scheduler["max_model_len"] = model.max_position_embeddings
        elif is_int(scheduler["max_model_len"]) and scheduler["max_model_len"] > model.max_position_embeddings:
            # allowed (a config may understate it); a value that is no int is named by SchedulerConfig
            log.warning("max_model_len %d is longer than the model's max_position_embeddings %d: positions past it "
                        "were never trained and outputs there may be garbage", scheduler["max_model_len"],
                        model.max_position_embeddings)
        if scheduler["max_num_batched_tokens"] is None:
            scheduler["max_num_batched_tokens"] = default_batched_tokens(self.device)
        cache = sections["cache"]
        if cache["checkpoint_interval"] is None:
            cache["checkpoint_interval"] = default_checkpoint_interval(scheduler["max_num_batched_tokens"],
                                                                       cache["page_size"])
        return EngineConfig(model=model, runner=RunnerConfig(**sections["runner"]),
                            cache=CacheConfig(**sections["cache"]), scheduler=SchedulerConfig(**scheduler),
                            speculative=self._speculative(sections["speculative"]),
                            parallel=ParallelConfig(**sections["parallel"]),
                            quantization=QuantizationConfig.from_model(model, **sections["quantization"]))

    def _check_prefix_cache_options(self) -> None:
        """Checkpoint options given with prefix caching off were silently ignored. Only values the user gave count
        (None: not given; the interval's default is filled in later), and num_checkpoints 0 agrees with off."""
        if self.enable_prefix_caching is not False:
            return
        given = [f"'{name}' ({value})" for name, value in (("checkpoint_interval", self.checkpoint_interval),
                                                          ("num_checkpoints", self.num_checkpoints))
                 if value is not None and not (name == "num_checkpoints" and value == 0)]
        if given:
            verb, it = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise ConfigError(f"{' and '.join(given)} only {verb} with prefix caching on, but "
                              f"enable_prefix_caching=False (--no-prefix-caching): drop {it} or turn prefix caching "
                              "on")

    @staticmethod
    def _speculative(options: dict[str, Any]) -> SpeculativeConfig:
        k, from_json = options["speculative_tokens"], parse_speculative_config(options["speculative_config"])
        if from_json is not None:
            if k not in (0, None, from_json):
                raise ConfigError(f"'speculative_tokens' ({k}) and 'speculative_config' "
                                  f"(num_speculative_tokens {from_json}) disagree; give one of them")
            k = from_json
        return SpeculativeConfig(num_speculative_tokens=0 if k is None else k,
                                 max_batch=options["speculative_max_batch"],
                                 draft_vocab=options["speculative_draft_vocab"],
                                 simulated_acceptance=options["speculative_simulated_acceptance"])

    @classmethod
    def from_kwargs(cls, model: str, **options: Any) -> EngineArgs:
        """EngineArgs from keyword arguments (LLM(...)); an unknown name is a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; the engine options are {option_names()}")
        return cls(model=model, **options)


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(EngineArgs) if f.metadata]


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """One --flag per engine option, with EngineArgs' defaults and help (the `engine` argument group)."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineArgs):
        meta = f.metadata
        if not meta:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = "" if f.default is None else f" (default {f.default})"
        if meta["type"] is None:  # a switch: store_true for off-by-default, store_false for on-by-default
            negative = flag.startswith("--no-")
            group.add_argument(flag, dest=f.name, action="store_false" if negative else "store_true",
                               default=f.default, help=meta["help"])
        else:
            group.add_argument(flag, dest=f.name, type=meta["type"], default=f.default, choices=meta["choices"],
                               help=meta["help"] + default)


def engine_args_from(namespace: argparse.Namespace, model: str, **overrides: Any) -> EngineArgs:
    """EngineArgs from a parsed namespace; options the namespace lacks keep their defaults."""
    given = {name: getattr(namespace, name) for name in option_names() if hasattr(namespace, name)}
    return EngineArgs(model=model, **{**given, **overrides})


__all__ = ["ConfigError", "EngineArgs", "add_engine_options", "engine_args_from", "option_names"]
