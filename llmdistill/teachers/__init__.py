"""Sources of teacher signal, one file per source, all behind one protocol (teachers/base.py): each turns the
trainer's batches into (batch, TeacherSignal) pairs with `stream(batches, device)`, has `close()`, and
declares its capabilities (full logits, top-k, hidden states, cross-tokenizer, may fail).

  hf           the teacher in-process (teachers/hf.py)
  vllm_server  top-k from vLLM servers over HTTP (teachers/vllm_server.py)
  vllm_cache   top-k computed once by vLLM's offline engine, read from disk (teachers/vllm_cache.py)
  on_policy    the student's own samples (HF generate, or a vLLM engine holding a copy of the student:
               teachers/vllm_generator.py), scored by a vLLM server or the teacher in-process
               (teachers/on_policy.py)
  none         no teacher (CE-only objectives)

A new source is a TeacherSource subclass registered with `@register_source(name)` in its own file, imported
below, and its name in config.TeacherConfig.source.
"""

from __future__ import annotations

import os

from llmdistill.config import Config, LLMDistillError
from llmdistill.teachers import hf, on_policy, vllm_cache, vllm_server  # noqa: F401  (registers the sources)
from llmdistill.teachers.base import (
    Capabilities,
    TeacherSource,
    TeacherUnavailable,
    process_rank,
    register_source,
    source_class,
)
from llmdistill.teachers.streaming import consumed_trace

__all__ = [
    "Capabilities",
    "NoTeacher",
    "TeacherSource",
    "TeacherUnavailable",
    "build_teacher_source",
    "check_teacher_source",
    "register_source",
]


@register_source("none")
class NoTeacher(TeacherSource):
    """For objectives that need no teacher (CE only, pretraining)."""

    @classmethod
    def build(cls, cfg, model, needs, student):
        return cls()

    def signal(self, batch: dict) -> None:
        return None


def check_teacher_source(cfg: Config, needs: frozenset[str], cross_tokenizer: bool = False) -> None:
    """Refuse an objective that teacher.source cannot serve; needs no weights (for preflight)."""
    if not needs & {"teacher", "teacher_hidden"}:
        return
    name = cfg.teacher.source
    source_class(name).preflight(cfg)
    can = source_class(name).capabilities
    if "teacher_hidden" in needs and not can.hidden_states:
        raise LLMDistillError(
            f"teacher.source={name} gives top-k log-probabilities, not hidden states; "
            "the hidden_* / curriculum losses need teacher.source=hf"
        )
    if cross_tokenizer and not can.cross_tokenizer:
        if name == "on_policy":
            raise LLMDistillError(on_policy.CROSS_TOKENIZER_REFUSAL)
        raise LLMDistillError(f"teacher.source={name} cannot serve a cross-tokenizer loss (alm, uld)")


def check_teacher_ready(cfg: Config, plan) -> None:
    """What a training run's teacher source reads must exist and fit the run before any weights load (a
    built cache; a server of the teacher's tokenizer, of this student). `plan`: preflight's."""
    if plan.needs & {"teacher", "teacher_hidden"}:
        source_class(cfg.teacher.source).check_ready(cfg, plan)


def build_teacher_source(
    cfg: Config, model, needs: frozenset[str], student=None, cross_tokenizer: bool = False
) -> TeacherSource:
    """The source `teacher.source` names. `model` is the in-process teacher (or None when it is not loaded);
    `student` is the student module, for sources that score the student's own samples. `cross_tokenizer`:
    whether the objective has a cross-tokenizer term (sources also see it from the batches' keys)."""
    if not needs & {"teacher", "teacher_hidden"}:
        source = NoTeacher()
    else:
        check_teacher_source(cfg, needs, cross_tokenizer)
        source = source_class(cfg.teacher.source).build(cfg, model, needs, student)
    # Test hook: LLMDISTILL_TEACHER_TRACE=<file> records every batch the trainer trained on (see
    # streaming.consumed_trace); the resume tests read it from a multi-rank run in subprocesses.
    trace = os.environ.get("LLMDISTILL_TEACHER_TRACE")
    if trace:
        source.on_consumed = consumed_trace(trace, process_rank())
    return source
