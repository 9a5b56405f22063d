"""Offline Python API in the shape vLLM users know: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence, Union

from deltaserve.config import EngineArgs
from deltaserve.engine.engine import LLMEngine
from deltaserve.engine.tokenizer import render_chat, require_tokenizer
from deltaserve.outputs import CompletionOutput, RequestOutput, apply_delta
from deltaserve.sampling_params import SamplingParams

PromptType = Union[str, Sequence[int], dict]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    """Runs an engine in this process. `model`: a Hugging Face checkpoint directory (None: the bundled demo model).
    Keyword arguments are the engine options, the command line's flags with underscores and the same defaults
    (`deltaserve.config.EngineArgs`, e.g. device, dtype, max_model_len, max_num_seqs, kv_cache_dtype,
    speculative_tokens, tensor_parallel_size; a --no-X switch is its option set False: enable_prefix_caching=False,
    async_scheduling=False); an unknown keyword is a TypeError listing them all. With tensor_parallel_size > 1 the
    engine spawns worker processes: build the LLM under `if __name__ == "__main__":`, and call
    `llm.engine.shutdown()` to stop them before the process ends (or let the exit handler do it)."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        if model is None:
            from deltaserve.demo import demo_model_dir

            model = str(demo_model_dir())
        self.engine = LLMEngine(EngineArgs.from_kwargs(str(model), **options))
        self._ids = itertools.count()
        self._default_params: SamplingParams | None = None

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What sampling_params=None means (as in vLLM, and as the server's requests get): the sampling the
        checkpoint's generation_config.json sets (Qwen3.5 ships its recommended one there), else SamplingParams()."""
        if self._default_params is None:  # read once (the file is logged as it is read)
            from deltaserve.sampling_params import generation_defaults

            self._default_params = SamplingParams(**generation_defaults(self.engine.model_config.model_dir))
        return self._default_params

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | Callable[..., Any] = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (text, token ids, or {"prompt_token_ids": [...]}); outputs in order.
        use_tqdm (as vLLM's): a progress bar over the prompts; False for none, or the tqdm class to use."""
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params if sampling_params is not None else
                                 self.get_default_sampling_params(), len(items))
        outputs: dict[str, RequestOutput] = {}
        bar = None
        try:
            for item, p in zip(items, params):
                text, ids = self._tokenize(item)
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p)
                outputs[rid] = RequestOutput(rid, text, list(ids), [CompletionOutput(i) for i in range(p.n)])
            bar = _progress_bar(use_tqdm, len(outputs))
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    if delta.request_id in outputs:
                        apply_delta(outputs[delta.request_id], delta)
                        if bar is not None and outputs[delta.request_id].finished:
                            bar.update(1)
        except BaseException:
            for rid in outputs:  # never leave half-run requests holding pages and slots
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return list(outputs.values())

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             use_tqdm: bool | Callable[..., Any] = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template and generate the assistant's reply
        (add_generation_prompt=False: the template's opening of that reply is left out, as in vLLM)."""
        if isinstance(messages, (str, dict)):
            conversations = []  # refused below: not a list of messages
        elif messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = messages
        if not conversations or not all(isinstance(c, list) and c and all(isinstance(m, dict) for m in c)
                                        for c in conversations):
            raise TypeError("messages must be a conversation (a non-empty list of {'role': ..., 'content': ...} "
                            f"dicts) or a list of them, got {_shown(messages)}; for plain text use LLM.generate")
        conversations = [_with_known_roles(c) for c in conversations]
        prompts = [{"prompt_token_ids": render_chat(self.engine.tokenizer, conv, tools=tools,
                                                    add_generation_prompt=add_generation_prompt,
                                                    chat_template_kwargs=chat_template_kwargs)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, item: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(item, str):
            tok = require_tokenizer(self.engine.tokenizer, "a text prompt")
            return item, tok.encode(item, add_special_tokens=False)
        if isinstance(item, dict):
            if "prompt_token_ids" in item:
                return item.get("prompt"), _token_ids(item["prompt_token_ids"])
            if "prompt" in item:
                return self._tokenize(item["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(item)}")
        return None, _token_ids(item)


def _progress_bar(use_tqdm: bool | Callable[..., Any], total: int):
    """vLLM's bar: finished prompts out of `total` (None when use_tqdm is False)."""
    if not use_tqdm:
        return None
    if callable(use_tqdm):
        factory = use_tqdm
    else:
        from tqdm import tqdm as factory
    return factory(total=total, desc="Processed prompts", dynamic_ncols=True)


PROMPT_KINDS = "a str, a list of int token ids, or a dict with 'prompt' or 'prompt_token_ids'"


def _token_ids(item: Any) -> list[int]:
    """A token-id prompt as a list of Python ints; anything else is a TypeError naming the accepted kinds (bytes
    would otherwise be read as byte values, an int or None fail deep inside list())."""
    if hasattr(item, "tolist"):  # a numpy array or torch tensor of ids
        item = item.tolist()
    if isinstance(item, (str, bytes, bytearray)) or not isinstance(item, (list, tuple)):
        raise TypeError(f"a prompt must be {PROMPT_KINDS}; got {_shown(item)}"
                        + ("; decode bytes to str first" if isinstance(item, (bytes, bytearray)) else ""))
    wrong = next((t for t in item if not isinstance(t, int) or isinstance(t, bool)), None)
    if wrong is not None:
        raise TypeError(f"token ids must be ints; the prompt holds {_shown(wrong)} (a prompt must be {PROMPT_KINDS})")
    return list(item)


def _with_known_roles(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with OpenAI's 'developer' role as 'system' (as the server reads it: Qwen templates know
    system/user/assistant/tool). A message without one of those roles is a ValueError: the template renders messages
    by role, and such a message was left out of the prompt without a word."""
    out = []
    for i, m in enumerate(conv):
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i} has role {m.get('role')!r}; use 'system', 'user', 'assistant', 'tool' "
                             f"or 'developer' (the message: {_shown(m)})")
        out.append(m if role == m["role"] else {**m, "role": role})
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if hasattr(prompts, "tolist"):  # a numpy array or torch tensor: 1-D is one prompt, 2-D a batch
        prompts = prompts.tolist()
    if isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        _token_ids(prompts)  # raises the TypeError naming what a prompt may be
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (str, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    wrong = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if wrong:
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them; the list holds {wrong[0]}")
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return params
