"""Tokenizer and chat template of a checkpoint (transformers' fast tokenizer over tokenizer.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    """The checkpoint's tokenizer is missing or cannot render a request."""


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when the directory has none (token-id prompts still work then)."""
    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; name the directory and the cause
        raise TokenizerError(f"cannot load the tokenizer in {path}: {e}") from e


def require_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise TokenizerError(f"{what} needs a tokenizer, but the model directory has no tokenizer.json; "
                             "pass token ids instead or add the checkpoint's tokenizer files")
    return tokenizer


def require_chat_template(tokenizer):
    """The tokenizer, if it can render chats (it exists and has a chat template); else a TokenizerError saying why."""
    tokenizer = require_tokenizer(tokenizer, "chat")
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizerError("the checkpoint's tokenizer has no chat template; use completions (plain prompts)")
    return tokenizer


def render_chat(tokenizer, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Render messages with the checkpoint's chat template (enable_thinking etc. via chat_template_kwargs)."""
    tokenizer = require_chat_template(tokenizer)
    if not messages:
        raise TokenizerError("messages is empty; a chat request needs at least one message")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **(chat_template_kwargs or {}))
    except Exception as e:  # jinja errors: show the template's own message
        raise TokenizerError(f"the chat template could not render these messages: {e}") from e
    return tokenizer.encode(text, add_special_tokens=False)


def eos_token_ids(tokenizer, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """Stop ids: config.json + generation_config.json eos ids, plus the tokenizer's eos (chat turn end)."""
    ids = list(config_eos)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(tok_eos, int) and tok_eos not in ids:
        ids.append(tok_eos)
    return tuple(ids)
