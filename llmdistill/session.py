"""From a config to what a job runs on: every check that needs no weights (preflight → Plan), then the
models and the datasets. Training, the vLLM cache builder, derivation and the benches all start here."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from llmdistill import data, models
from llmdistill.align import aligned_chat_dataset, aligned_dataset
from llmdistill.config import Config, LLMDistillError
from llmdistill.losses import get_loss

log = logging.getLogger("llmdistill.session")


@dataclass
class Plan:
    """What preflight resolved: paths, tokenizers and configs, all checked before any weights load."""

    teacher_path: str | None
    student_path: str | None
    teacher_tok: object
    student_tok: object
    teacher_config: object
    student_config: object
    needs: frozenset[str]  # what the objective needs: "teacher", "teacher_hidden", "student_hidden"


def preflight(cfg: Config) -> Plan:
    """Every check that needs no weights and no process group: bad input fails in a second with one line."""
    terms = [get_loss(t.name) for t in cfg.loss]
    needs = frozenset().union(*(t.needs for t in terms))
    cross_tokenizer = any(t.cross_tokenizer for t in terms)
    teacher_path = teacher_tok = teacher_config = None
    if cfg.teacher.source != "none":
        teacher_path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        teacher_tok = models.load_tokenizer(teacher_path, cfg.teacher.trust_remote_code)
        teacher_config = AutoConfig.from_pretrained(
            teacher_path, trust_remote_code=cfg.teacher.trust_remote_code
        )
    elif needs & {"teacher", "teacher_hidden"}:
        raise LLMDistillError(
            f"loss: {[t.name for t in cfg.loss]} needs a teacher, but teacher.source is 'none'"
        )
    student_path = None
    if cfg.student.path is not None:
        student_path = models.resolve_model_path(cfg.student.path, "student.path")
        student_config = AutoConfig.from_pretrained(
            student_path, trust_remote_code=cfg.student.trust_remote_code
        )
    elif cfg.student.from_teacher is not None:
        student_config = models.config_with_overrides(teacher_config, cfg.student.from_teacher)
    else:
        student_config = models.config_from_dict(cfg.student.config)
    tokenizer_path = cfg.student.tokenizer or student_path or teacher_path
    if tokenizer_path is None:
        raise LLMDistillError("student.tokenizer: needed when there is no teacher to take it from")
    if cfg.student.tokenizer is not None:
        tokenizer_path = models.resolve_model_path(
            cfg.student.tokenizer, "student.tokenizer", tokenizer_only=True
        )
    student_tok = models.load_tokenizer(tokenizer_path, cfg.student.trust_remote_code)
    if teacher_config is not None:
        note = models.check_vocabularies(
            teacher_tok, student_tok, teacher_config, student_config, cross_tokenizer
        )
        if note:
            log.info(note)
        models.check_sequence_length(cfg.data.seq_len, teacher_config, "teacher")
    models.check_sequence_length(cfg.data.seq_len, student_config, "student")
    return Plan(teacher_path, student_path, teacher_tok, student_tok, teacher_config, student_config, needs)


def build_models(cfg: Config, plan: Plan, ds_config: dict):
    """Teacher (or None) and student; checkpoints load under ZeRO-3 partitioned from the start.

    Returns the HfDeepSpeedConfig too: it must stay alive while models load, since transformers reads it to
    partition weights at load time.
    """
    student = None
    if plan.student_path is None:
        # A random init is built before ZeRO-3's context exists, so it is the same under every stage
        # (zero.Init draws random numbers in another order); the engine partitions it at deepspeed.initialize.
        torch.manual_seed(cfg.run.seed)
        student = models.model_from_config(plan.student_config, cfg.student.dtype)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 else None
    teacher = None
    # Only an in-process teacher that the objective uses is loaded; the other sources need only its
    # tokenizer and config.
    if (
        plan.teacher_path is not None
        and cfg.teacher.source == "hf"
        and plan.needs & {"teacher", "teacher_hidden"}
    ):
        teacher = models.load_model(plan.teacher_path, cfg.teacher.dtype, cfg.teacher.trust_remote_code)
        teacher.eval().requires_grad_(False)
    if student is None:
        student = models.load_model(plan.student_path, cfg.student.dtype, cfg.student.trust_remote_code)
    if cfg.student.peft is not None:
        student = models.wrap_peft(student, cfg.student.peft)
    return teacher, student, hf_ds_config


def build_datasets(cfg: Config, plan: Plan):
    """Packed training and validation sets (validation may be None), tokenized with the student's tokenizer.

    Every batch has `input_ids`, `position_ids` and shifted `targets`; a cross-tokenizer objective's batches
    also carry the teacher's tokenization of the same text (`teacher_input_ids`, `teacher_position_ids`).
    """
    cross_tokenizer = any(get_loss(t.name).cross_tokenizer for t in cfg.loss) and plan.teacher_tok is not None

    def aligned(rows, name):
        # Both tokenizations of each window's text, and the chunk alignment, computed here once (cached by
        # `datasets`), never in the training step. Chats: each side renders them with its own template.
        max_teacher = models.max_positions(plan.teacher_config)
        if "messages" in rows.column_names:
            templates = (data.chat_template(cfg.data, plan.student_tok), teacher_chat_template(plan))
            return aligned_chat_dataset(
                rows, plan.student_tok, plan.teacher_tok, templates, cfg.data, name, max_teacher
            )
        return aligned_dataset(rows, plan.student_tok, plan.teacher_tok, cfg.data.seq_len, name, max_teacher)

    def build(specs):
        pack_text = aligned if cross_tokenizer else None
        return data.build_dataset(specs, cfg.data, plan.student_tok, cfg.run.seed, pack_text)

    train = build(cfg.data.train)
    validation = build(cfg.data.validation) if cfg.data.validation is not None else None
    if isinstance(validation, data.PackedStream):  # a streamed validation set: its first batches, in memory
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validation = validation.head(cfg.train.eval_batches * cfg.train.micro_batch_size * world)
    return train, validation


def teacher_chat_template(plan: Plan) -> str:
    """The teacher renders chats with its own tokenizer's template (data.chat_template is the student's)."""
    if not getattr(plan.teacher_tok, "chat_template", None):
        raise LLMDistillError(
            f"chat data with a cross-tokenizer objective: the teacher's tokenizer ({plan.teacher_path}) has "
            "no chat template to render the conversations with"
        )
    return plan.teacher_tok.chat_template


def derivation_defaults(student_path: str | None) -> dict:
    """What a derived student tells its losses: which teacher layer each of its layers came from, the default
    layer map of the hidden-state losses (a config's own `layer_map` still wins)."""
    record = Path(student_path) / "derivation.json" if student_path else None
    if record is None or not record.exists():
        return {}
    kept = json.loads(record.read_text()).get("kept", {}).get("layers")
    return {"layer_map": kept} if kept else {}
