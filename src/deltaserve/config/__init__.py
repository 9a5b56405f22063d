"""Frozen, validated configuration, pure Python (no torch import: the scheduler reads these and must never import
torch). `EngineArgs` (options.py) is the table of user-facing options; `EngineConfig` (engine.py) the composed,
validated config an engine is built from; `ModelConfig` (model.py) the checkpoint's decoder; `RankShapes`
(shapes.py) what one tensor-parallel rank holds of each layer."""

from deltaserve.config.common import ConfigError, env_flag
from deltaserve.config.engine import (CacheConfig, EngineConfig, ParallelConfig, QuantizationConfig, RunnerConfig,
                                      SchedulerConfig, SpeculativeConfig)
from deltaserve.config.model import LAYER_TYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from deltaserve.config.options import EngineArgs, add_engine_options, engine_args_from
from deltaserve.config.shapes import RankShapes

__all__ = ["CacheConfig", "ConfigError", "EngineArgs", "EngineConfig", "LAYER_TYPES", "ModelConfig",
           "ParallelConfig", "QuantizationConfig", "RankShapes", "RunnerConfig", "SUPPORTED_ARCHITECTURES",
           "SchedulerConfig", "SpeculativeConfig", "add_engine_options", "engine_args_from", "env_flag"]
