"""deltaserve: an inference engine for the Qwen3.5 / Qwen3.6 hybrid (Gated DeltaNet + gated attention) models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import deltaserve.engine.scheduler` (pure Python) never pulls in torch through the package root.
    if name == "LLM":
        from deltaserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from deltaserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
