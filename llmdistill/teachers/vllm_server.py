"""Teacher signal from vLLM's OpenAI-compatible servers: top-k prompt log-probabilities of the batch's tokens
(or of the teacher's own tokenization, for a cross-tokenizer objective), one request per micro-batch.

Prompt format: teachers/prompts.py; HTTP, retries and round robin: teachers/vllm_client.py; starting a
server: teachers/vllm_serve.py.
"""

from __future__ import annotations

from llmdistill.config import Config, LLMDistillError
from llmdistill.signal import TeacherSignal
from llmdistill.teachers.base import (
    Capabilities,
    TeacherSource,
    process_rank,
    register_source,
)
from llmdistill.teachers.prompts import Prompt, score_batch
from llmdistill.teachers.vllm_client import ServerClient, completions_request

SERVE = "`llmdistill serve-teacher --config <this config>` (launch/serve_teacher.sh)"
# Text for the tokenizer check: code, unicode and whitespace runs, where tokenizers most often differ.
TOKENIZER_PROBE = "def héllo(x, y=3):\n    return {'naïve': x ** y}  # ✓ 東京\n\t\tpass\n"


def teacher_client(cfg: Config, rank: int = 0) -> ServerClient:
    s = cfg.teacher.server
    return ServerClient(s.urls, s.served_model_name, s.timeout, s.retries, s.backoff, first=rank)


def smallest_max_model_len(client: ServerClient, seq_len: int) -> int | None:
    """The smallest max_model_len the servers report (None: none reports one)."""
    fix = f"restart it with {SERVE} (it serves teacher.server.served_model_name at data.seq_len + 2)"
    lengths = [client.served_model(url, seq_len, "teacher.server.urls", fix) for url in client.urls]
    return min((n for n in lengths if n is not None), default=None)


def check_servers(cfg: Config, tokenizer) -> None:
    """Before any weights load: every teacher server answers (waited for with the run's retries), serves
    teacher.server.served_model_name with room for data.seq_len, tokenizes as teacher.path's `tokenizer`
    does, and gives teacher.server.top_k log-probabilities (at most its --max-logprobs)."""
    client = teacher_client(cfg)
    client.wait_healthy("teacher.server.urls", SERVE)
    smallest_max_model_len(client, cfg.data.seq_len)
    ours = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    for url in client.urls:
        body = {"model": client.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        theirs = client.call("/tokenize", body, url=url).get("tokens")
        if theirs != ours:
            raise LLMDistillError(
                f"teacher.server.urls: {url} tokenizes differently from teacher.path's tokenizer "
                f"({(theirs or [])[:8]}... vs {ours[:8]}...): serve the model teacher.path names"
            )
        # A 2-token prompt at the run's K: a K above the server's --max-logprobs fails here, not mid-run.
        probe = completions_request(client.model, [Prompt(0, 0, ours[:2])], cfg.teacher.server.top_k)
        client.call("/v1/completions", probe, url=url)


@register_source("vllm_server")
class VLLMServerTeacher(TeacherSource):
    """Top-k teacher signal from vLLM servers, fetched `teacher.server.prefetch` micro-batches ahead."""

    # A server can go away: the trainer all-reduces a failure flag per micro-batch and stops cleanly.
    capabilities = Capabilities(top_k=True, cross_tokenizer=True, can_fail=True)

    def __init__(self, cfg: Config, rank: int = 0):
        """The servers were checked (`check_servers`) before the trainer loaded any weights."""
        s = cfg.teacher.server
        self.k, self.prefetch = s.top_k, s.prefetch
        self.client = teacher_client(cfg, rank)
        self.max_model_len = smallest_max_model_len(self.client, cfg.data.seq_len)

    @classmethod
    def check_ready(cls, cfg, plan) -> None:
        check_servers(cfg, plan.teacher_tok)

    @classmethod
    def build(cls, cfg, model, needs, student):
        return cls(cfg, process_rank())

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
