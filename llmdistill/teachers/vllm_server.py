"""Teacher signal from vLLM's OpenAI-compatible servers: top-k prompt log-probabilities of the batch's tokens
(or of the teacher's own tokenization, for a cross-tokenizer objective), one request per micro-batch.

Prompt format: teachers/prompts.py; HTTP, retries and round robin: teachers/vllm_client.py; starting a
server: teachers/vllm_serve.py.
"""

from __future__ import annotations

from llmdistill import models
from llmdistill.config import Config, LLMDistillError
from llmdistill.signal import TeacherSignal
from llmdistill.teachers.base import (
    Capabilities,
    TeacherSource,
    process_rank,
    register_source,
)
from llmdistill.teachers.prompts import Prompt, score_batch
from llmdistill.teachers.vllm_client import ServerClient


@register_source("vllm_server")
class VLLMServerTeacher(TeacherSource):
    """Top-k teacher signal from vLLM servers, fetched `teacher.server.prefetch` micro-batches ahead."""

    # A server can go away: the trainer all-reduces a failure flag per micro-batch and stops cleanly.
    capabilities = Capabilities(top_k=True, cross_tokenizer=True, can_fail=True)

    def __init__(self, cfg: Config, tokenizer, rank: int = 0, check: bool = True):
        s = cfg.teacher.server
        self.k, self.prefetch = s.top_k, s.prefetch
        self.client = ServerClient(s.urls, s.served_model_name, s.timeout, s.retries, s.backoff, first=rank)
        self.max_model_len = self.client.check(tokenizer, s.top_k, cfg.data.seq_len) if check else None

    @classmethod
    def check_ready(cls, cfg, student_config) -> None:
        """A server that never started is found in seconds, before the models load, not after."""
        s = cfg.teacher.server
        client = ServerClient(s.urls, s.served_model_name, s.timeout, s.retries, s.backoff)
        client.wait_healthy("teacher.server.urls", "llmdistill serve-teacher --config <this config>")

    @classmethod
    def build(cls, cfg, model, needs, student):
        path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        return cls(cfg, models.load_tokenizer(path, cfg.teacher.trust_remote_code), process_rank())

    def score(self, prompts: list[Prompt], k: int):
        longest = max((len(p.token_ids) for p in prompts), default=0)
        if self.max_model_len is not None and longest + 1 > self.max_model_len:
            # The teacher's tokenization of a window can be longer than data.seq_len (cross-tokenizer).
            raise LLMDistillError(
                f"a {longest}-token teacher prompt is above the server's max_model_len {self.max_model_len} "
                f"(restart it with teacher.serve.max_model_len >= {longest + 1})"
            )
        return self.client.score(prompts, k)

    def signal(self, batch: dict) -> TeacherSignal:
        return score_batch(self.score, batch, self.k)
