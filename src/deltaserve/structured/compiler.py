"""GrammarCompiler: a StructuredSpec -> a compiled llguidance grammar, once per spec (LRU cache), thread-safe.

Compiling takes 1-40 ms for typical schemas and building the tokenizer's token trie ~1-6 s (once, 248k tokens): the
server compiles on a worker thread before a request reaches the engine, so the engine thread only finds the
grammar in the cache and copies its initial matcher (~20 us). The offline LLM compiles when a request is added.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deltaserve.structured.grammars import Markup, build_grammar
from deltaserve.structured.spec import StructuredError, StructuredKind, StructuredSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 512  # compiled grammars kept; a few MB at most (llguidance builds lexer states lazily)


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar that compiled, and a matcher in its initial state that new requests copy."""

    spec: StructuredSpec
    grammar: str
    initial: Any  # llguidance.LLMatcher, never advanced

    def new_matcher(self) -> Any:
        return self.initial.deep_copy()


class GrammarCompiler:
    """Owns the llguidance tokenizer of one model and the cache of compiled grammars.

    tokenizer: the checkpoint's Hugging Face tokenizer; vocab_size: the model's (padded) vocabulary, the width of
    the mask (ids past the tokenizer are never allowed); eos_token_ids: the tokens that end an output, the only
    ones allowed once the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._markup: Markup | None = None
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()  # the tokenizer build and the cache; compiling itself runs outside it
        self._cache: OrderedDict[StructuredSpec, CompiledGrammar] = OrderedDict()

    @property
    def ll_tokenizer(self) -> Any:
        """The llguidance tokenizer, built on first use (seconds for a large vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = _build_ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._ll_tokenizer

    @property
    def markup(self) -> Markup:
        if self._markup is None:
            self._markup = Markup(special_tokens(self.tokenizer, self.ll_tokenizer))
        return self._markup

    def cached(self, spec: StructuredSpec) -> CompiledGrammar | None:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
            return compiled

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache or compiled now. StructuredError names what is wrong."""
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredSpec) -> CompiledGrammar:
        import llguidance

        grammar = build_grammar(spec, self.markup)
        tokenizer = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        own_text = spec.kind is StructuredKind.GRAMMAR  # positions in the client's grammar help; in ours they do not
        if is_error:
            raise StructuredError(_clean(messages[0] if messages else "", own_text))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredError(_clean(matcher.get_error(), own_text))
        if messages:
            log.debug("grammar warnings for %s: %s", spec.describe(), messages)
        return CompiledGrammar(spec, grammar, matcher)


def special_tokens(tokenizer: Any, ll_tokenizer: Any) -> frozenset[str]:
    """The added tokens llguidance treats as special (it does so for added tokens that tokenizer.json does not
    flag special too, such as Qwen's </think>): a grammar can match them only by name."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return frozenset(t.content for i, t in added.items() if i < ll_tokenizer.vocab_size and
                     ll_tokenizer.is_special_token(i))


def _build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    import llguidance.hf

    if tokenizer is None:
        raise StructuredError("structured outputs need the model's tokenizer, and this checkpoint has none")
    if not eos_token_ids:
        raise StructuredError("structured outputs need an end-of-sequence token, and this model declares none")
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids)


def _clean(message: str, keep_excerpt: bool) -> str:
    """llguidance's error without its internal state; for grammars this module wrote, without the grammar excerpt
    and line position (they point into text the client never saw)."""
    text = message.split("\n<state>", 1)[0].strip()
    if not keep_excerpt:
        text = _POSITION.sub("", text.split("\n   1 | ", 1)[0]).strip()
    for hint, fix in _FIXES:
        text = text.replace(hint, fix)
    return text[:1000] or "the grammar does not compile"


_POSITION = re.compile(r"^at \d+\(\d+\): ")
# llguidance's advice names its own options; the client sets them in the schema ("x-guidance", grammars.py)
_FIXES = (("oneOf constraints are not supported. Enable 'coerce_one_of' option to approximate oneOf with anyOf",
           "oneOf is enforced only where a value can match just one branch, and here a value could match several; "
           "use anyOf, or add \"x-guidance\": {\"coerce_one_of\": true} to the schema to enforce oneOf as anyOf"),)
