"""Sources of teacher signal. Each turns the trainer's batches into (batch, TeacherSignal) pairs.

A source's `stream(batches, device)` yields the batch moved to `device` with its signal, in the batches'
order: a
remote source may fetch ahead (prefetch) as long as it yields in order. A source that can fail (a server)
raises
`TeacherUnavailable` after its own retries; the trainer then checkpoints the last whole step and stops.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmdistill.config import Config, LLMDistillError
from llmdistill.data import to_device


class TeacherUnavailable(LLMDistillError):
    """The teacher did not answer after retries."""


class NoTeacher:
    """For objectives that need no teacher (CE only, pretraining)."""

    can_fail = False

    def stream(self, batches: Iterator[dict], device: str):
        for batch in batches:
            yield to_device(batch, device), None

    def close(self) -> None:
        pass


def build_teacher_source(cfg: Config, model, needs: frozenset[str], student=None):
    """The source `teacher.source` names. `model` is the in-process teacher (or None when it is not loaded);
    `student` is the student module, for sources that score the student's own samples."""
    if not needs & {"teacher", "teacher_hidden"}:
        return NoTeacher()
    if cfg.teacher.source == "hf":
        from llmdistill.teachers.hf import HFTeacher

        return HFTeacher(model, hidden_states="teacher_hidden" in needs)
    if cfg.teacher.source in ("vllm_server", "vllm_cache", "on_policy"):
        return _build_vllm_source(cfg, needs, student)
    raise LLMDistillError(f"teacher.source: {cfg.teacher.source!r} is not a known teacher source")


def _build_vllm_source(cfg: Config, needs: frozenset[str], student):
    """The vLLM-backed sources: top-k log-probabilities only, tokenizer and config from teacher.path."""
    import torch

    from llmdistill import models

    if "teacher_hidden" in needs:
        raise LLMDistillError(
            f"teacher.source={cfg.teacher.source}: vLLM gives top-k log-probabilities, not hidden states; "
            "the hidden_* / curriculum losses need teacher.source=hf"
        )
    path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
    tokenizer = models.load_tokenizer(path, cfg.teacher.trust_remote_code)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if cfg.teacher.source == "vllm_server":
        from llmdistill.teachers.vllm_server import VLLMServerTeacher

        return VLLMServerTeacher(cfg, tokenizer, rank)
    if cfg.teacher.source == "vllm_cache":
        from transformers import AutoConfig

        from llmdistill.teachers.vllm_cache import VLLMCacheTeacher

        vocab = AutoConfig.from_pretrained(path, trust_remote_code=cfg.teacher.trust_remote_code).vocab_size
        return VLLMCacheTeacher(cfg, tokenizer, vocab, path)
    from llmdistill.teachers.on_policy import OnPolicyTeacher

    return OnPolicyTeacher(cfg, tokenizer, student, rank, run_dir=cfg.run.dir)
