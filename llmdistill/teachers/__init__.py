"""Sources of teacher signal. Each turns the trainer's batches into (batch, TeacherSignal) pairs.

A source's `stream(batches, device)` yields the batch moved to `device` with its signal, in the batches' order: a
remote source may fetch ahead (prefetch) as long as it yields in order. A source that can fail (a server) raises
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
    raise LLMDistillError(f"teacher.source: {cfg.teacher.source!r} is not a known teacher source")
