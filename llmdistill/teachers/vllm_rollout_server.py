"""The student's rollouts from separate vLLM servers holding a copy of the student
(teacher.on_policy.generator=vllm_server): the sibling of the teacher server, for the student.

Serving: `llmdistill serve-student` (launch/serve_student.sh) writes the student's config and tokenizer and
starts vLLM's OpenAI server on them (`student_serve_command`): dummy weights, eager, no prefix cache (cached
keys and values would be of older weights), in vLLM's dev mode (VLLM_SERVER_DEV_MODE=1, for its
/collective_rpc route) with `StudentWeightsFromDisk` mixed into its workers (--worker-extension-cls). Dev mode
opens routes that run methods on the workers: serve it on a trusted network only.

Weights: the trainer pushes them before the first rollout and every `sync_every` optimizer steps. Rank 0
writes them (`student_weights`: gathered under ZeRO-3 one parameter at a time, LoRA merged) as safetensors
into <run dir>/rollout_weights, which the servers must be able to read (same node, or a shared filesystem),
and asks each server to load them in place (POST /collective_rpc): no NCCL between trainer and servers. The
ranks meet before the push (no rank still samples from the old weights) and after it (none samples before
it), and agree on whether it worked.

Rollouts: one /v1/completions request per row (token-id prompt, row i seeded seed + i, stopping at EOS, token
ids back), the rows sent at once so the server batches them; every rank sends its own. A server that stops
answering raises TeacherUnavailable after teacher.on_policy.server.retries: the trainer checkpoints its last
whole step and stops; the same command resumes once the server is back (it gets the checkpoint's weights).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import torch

from llmdistill.config import Config, LLMDistillError
from llmdistill.distributed import all_reduce_sum, barrier, first_reason
from llmdistill.models import model_shape
from llmdistill.teachers.base import TeacherUnavailable
from llmdistill.teachers.vllm_client import ServerClient
from llmdistill.teachers.vllm_generator import (
    quiet_expected_reload_warnings,
    reprocess_tied_layers,
    rollout_rows,
    row_budgets,
    sampling_settings,
)

SERVED_NAME = "student"
EXTENSION = f"{__name__}.StudentWeightsFromDisk"
# Rank 0 holds at most one shard of the student's weights in memory while writing them.
SHARD_BYTES = 2**30
SERVE = "`llmdistill serve-student --config <this config>` (launch/serve_student.sh)"


class StudentWeightsFromDisk:
    """Mixed into the student server's vLLM workers (--worker-extension-cls); its methods are what the
    trainer calls through /collective_rpc."""

    def load_student_weights(self, directory: str) -> None:
        """Replace the model's weights, in place, by the safetensors files in `directory`."""
        from vllm.config import set_current_vllm_config

        tied = getattr(self.vllm_config.model_config.hf_config, "tie_word_embeddings", False)
        quiet_expected_reload_warnings(bool(tied))
        self.reload_weights(weights_iterator=read_weights(Path(directory)), is_checkpoint_format=True)
        with set_current_vllm_config(self.vllm_config):
            reprocess_tied_layers(self.model_runner.get_model())

    def llmdistill_student_architecture(self) -> dict:
        """The served model's shape (the trainer checks it is its student's; answering at all proves the
        server can take the trainer's weights)."""
        return model_shape(self.vllm_config.model_config.hf_config)


def write_weights(weights: Iterator[tuple[str, torch.Tensor]], directory: Path) -> None:
    """(name, tensor) pairs as safetensors shards in `directory`, replacing the shards there."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.safetensors"):
        old.unlink()
    shard: dict[str, torch.Tensor] = {}
    size = index = 0
    for name, tensor in weights:
        # A copy: the gathered ZeRO-3 parameter is released once the iterator moves on.
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            save_file(shard, str(directory / f"weights-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1
    if shard:
        save_file(shard, str(directory / f"weights-{index:05d}.safetensors"))


def read_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def server_port(cfg: Config) -> int:
    url = cfg.teacher.on_policy.server.urls[0]
    port = urlsplit(url).port
    if port is None:
        raise LLMDistillError(f"teacher.on_policy.server.urls[0]={url!r} names no port to serve on")
    return port


def student_serve_command(cfg: Config, model_dir: Path, python: str, gpu: bool, host: str = "127.0.0.1"):
    """(argv, extra environment) of the student's rollout server on `model_dir` (config and tokenizer)."""
    from llmdistill.teachers.vllm_serve import vllm_command

    args = [
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        host,
        "--port",
        str(server_port(cfg)),
        "--dtype",
        cfg.train.dtype,
        "--max-model-len",
        str(cfg.data.seq_len + 2),  # as the colocated engine: a prompt and its rollout fill one window + 1
        "--load-format",
        "dummy",  # the trainer pushes its weights before the first rollout
        "--no-enable-prefix-caching",
        "--worker-extension-cls",
        EXTENSION,
    ]
    if cfg.student.trust_remote_code:
        args.append("--trust-remote-code")
    if gpu:
        args += ["--gpu-memory-utilization", str(cfg.teacher.on_policy.gpu_memory_utilization)]
    argv, env = vllm_command(args, python, gpu)
    if "--enforce-eager" not in argv:  # a weight reload allocates new tensors, unseen by captured CUDA graphs
        argv.append("--enforce-eager")
    return argv, {**env, "VLLM_SERVER_DEV_MODE": "1"}


def check_servers(cfg: Config, student_config) -> None:
    """Before any weights load: every rollout server answers (waited for with the run's retries), serves the
    student at the run's length, was started by `llmdistill serve-student` (it can take the trainer's
    weights) and holds a model of the shape of `student_config`."""
    s, field = cfg.teacher.on_policy.server, "teacher.on_policy.server.urls"
    client = ServerClient(s.urls, SERVED_NAME, s.timeout, s.retries, s.backoff, role="student")
    client.wait_healthy(field, SERVE)
    ours = model_shape(student_config)
    for url in client.urls:
        client.served_model(url, cfg.data.seq_len, field, f"restart it with {SERVE}")
        try:
            body = {"method": "llmdistill_student_architecture"}
            served_shape = client.call("/collective_rpc", body, url=url)["results"][0]
        except TeacherUnavailable:
            raise
        except LLMDistillError:  # a 4xx: the route exists only in vLLM's dev mode
            raise LLMDistillError(
                f"{field}: {url} cannot take the trainer's weights (not started in "
                f"vLLM dev mode with --worker-extension-cls {EXTENSION}); restart it with {SERVE}"
            ) from None
        differ = [
            f"{key} {served_shape.get(key)} (this run: {ours[key]})"
            for key in ours
            if served_shape.get(key) != ours[key]
        ]
        if differ:
            raise LLMDistillError(
                f"{field}: {url} serves another student: {', '.join(differ)}; restart it with {SERVE}"
            )


class RolloutServer:
    """The rollout servers, with the colocated engine's interface: `load` pushes weights (every rank calls
    it, in step), `generate` samples (any rank, any time between pushes)."""

    def __init__(self, cfg: Config, eos_id: int | None, rank: int, weights_dir: Path):
        """The servers were checked (`check_servers`) before the trainer loaded any weights."""
        s = cfg.teacher.on_policy.server
        self.client = ServerClient(
            s.urls, SERVED_NAME, s.timeout, s.retries, s.backoff, first=rank, role="student"
        )
        self.eos_id, self.rank = eos_id, rank
        self.weights_dir = weights_dir.resolve()
        self.pool = ThreadPoolExecutor(max_workers=cfg.train.micro_batch_size, thread_name_prefix="rollout")

    def load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Rank 0 writes `weights` and has every server load them; the others read the iterator to its end
        (a collective under ZeRO-3). Raises TeacherUnavailable on every rank when the push failed."""
        barrier()
        failure = ""
        if self.rank == 0:
            write_weights(weights, self.weights_dir)
            for url in self.client.urls:
                try:
                    self.client.call(
                        "/collective_rpc",
                        {"method": "load_student_weights", "args": [str(self.weights_dir)]},
                        url=url,
                    )
                except TeacherUnavailable as err:
                    failure = str(err)
                    break
        else:
            for _ in weights:
                pass
        if all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
            raise TeacherUnavailable(first_reason(failure))

    def generate(self, prompts, new_tokens, settings, seed: int, pad_id: int | None):
        """As VLLMGenerator.generate: prompts [B, P] or a list of 1-D prompts (with a budget each when
        `new_tokens` is a list); row i seeded seed + i."""
        budgets = row_budgets(prompts, new_tokens)

        def rollout(row: int) -> list[int]:
            body = {
                "model": SERVED_NAME,
                "prompt": prompts[row].tolist(),
                **sampling_settings(settings, budgets[row], self.eos_id, seed + row),
                "return_token_ids": True,
            }
            return self.client.call("/v1/completions", body)["choices"][0]["token_ids"]

        written = list(self.pool.map(rollout, range(len(prompts))))
        return rollout_rows(prompts, written, new_tokens, pad_id)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.rank == 0:  # a full copy of the student, of no use once the run stops
            shutil.rmtree(self.weights_dir, ignore_errors=True)
