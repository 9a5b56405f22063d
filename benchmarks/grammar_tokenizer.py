"""A tokenizer for the structured-output benchmarks: a real checkpoint's (``--tokenizer DIR``), or a synthetic
byte-level BPE the size of Qwen3.5's vocabulary, trained once on this Python's own sources and cached.

Mask cost depends on the vocabulary's size and on its token strings, so a 320-token byte tokenizer says nothing
about a 248k-token model. Machines without network have no Qwen tokenizer; a BPE with Qwen's pre-tokenizer and
248k merges over ~160 MB of Python is the closest thing that can be built offline (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

QWEN35_TOKENIZER_SIZE = 248077  # tokens in Qwen3.5's tokenizer.json (the model pads its vocabulary to 248320)


def load_tokenizer(path: str | None, size: int = QWEN35_TOKENIZER_SIZE, corpus_mb: float = 160.0):
    """The tokenizer at `path`, else the cached synthetic one of `size` tokens (trained on first use)."""
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from deltaserve.demo import cache_root

    target = cache_root() / f"bench-bpe-{size}"
    if not (target / "tokenizer.json").is_file():
        _train(target, size, corpus_mb)
    return AutoTokenizer.from_pretrained(str(target))


def _train(target: Path, size: int, corpus_mb: float) -> None:
    from tools.train_demo import train_tokenizer

    print(f"training a synthetic {size}-token BPE on this Python's sources (once; cached in {target})", flush=True)
    texts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total > corpus_mb * 1e6:
            break
    train_tokenizer(texts, size).save_pretrained(str(target))
