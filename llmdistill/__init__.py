"""llmdistill: turn a large language model into a smaller one that keeps most of its ability."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """Where llmdistill keeps what it builds once per machine (the embedded corpus and tokenizers, task data,
    vLLM's caches): $LLMDISTILL_CACHE, else ~/.cache/llmdistill. Imports nothing heavy."""
    return Path(os.environ.get("LLMDISTILL_CACHE", Path.home() / ".cache" / "llmdistill"))
