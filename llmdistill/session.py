"""From a config to what a job runs on: every check that needs no weights (preflight → Plan), then the
models and the datasets. Training, the vLLM cache builder, derivation and the benches all start here."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from llmdistill import data, models
from llmdistill.align import aligned_chat_dataset, aligned_dataset, space_token_mask
from llmdistill.config import Config, LLMDistillError, check_train_device, deepspeed_config
from llmdistill.losses import get_loss
from llmdistill.losses.registry import check_terms
from llmdistill.teachers import check_teacher_source

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
    """Every check that needs no weights and no process group: bad input fails in a second with one line.

    Checked here: the config's loss terms (names, parameters and their values, no cross-tokenizer term beside
    per-position ones), the DeepSpeed settings, the device and dtype, the teacher's and student's paths,
    configs, weight files' headers and tokenizers, vocabularies, a top-k signal's k against the teacher's
    vocabulary, sequence length, attention kernels that would skip a model's soft-capping, PEFT target
    modules, and every data source (found, UTF-8, loadable, not empty, its fields present).
    """
    check_terms(cfg.loss)
    deepspeed_config(cfg, 1)  # refuses inconsistent ZeRO settings and a missing config_file
    check_train_device(cfg)
    terms = [get_loss(t.name) for t in cfg.loss]
    needs = frozenset().union(*(t.needs for t in terms))
    cross_tokenizer = any(t.cross_tokenizer for t in terms)
    teacher_path = teacher_tok = teacher_config = None
    if cfg.teacher.source != "none":
        teacher_path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        teacher_config = _model_config(teacher_path, cfg.teacher.trust_remote_code, "teacher.path")
        teacher_tok = _tokenizer(teacher_path, cfg.teacher.trust_remote_code, "teacher.path")
        if cfg.teacher.source == "hf" and needs & {"teacher", "teacher_hidden"}:
            _check_weight_files(teacher_path, "teacher.path")
        check_top_k(cfg, teacher_config)
        if loads_teacher(cfg, needs):
            models.check_attn_softcapping(
                cfg.teacher.attn_implementation, "teacher.attn_implementation", teacher_config
            )
    elif needs & {"teacher", "teacher_hidden"}:
        raise LLMDistillError(
            f"loss: {[t.name for t in cfg.loss]} needs a teacher, but teacher.source is 'none'"
        )
    check_teacher_source(cfg, needs, cross_tokenizer)
    student_path = None
    if cfg.student.path is not None:
        student_path = models.resolve_model_path(cfg.student.path, "student.path")
        student_config = _model_config(student_path, cfg.student.trust_remote_code, "student.path")
        _check_weight_files(student_path, "student.path")
    elif cfg.student.from_teacher is not None:
        student_config = models.config_with_overrides(teacher_config, cfg.student.from_teacher)
    else:
        student_config = models.config_from_dict(cfg.student.config)
    models.check_attn_softcapping(
        cfg.student.attn_implementation, "student.attn_implementation", student_config
    )
    tokenizer_path = cfg.student.tokenizer or student_path or teacher_path
    if tokenizer_path is None:
        raise LLMDistillError("student.tokenizer: needed when there is no teacher to take it from")
    if cfg.student.tokenizer is not None:
        tokenizer_path = models.resolve_model_path(
            cfg.student.tokenizer, "student.tokenizer", tokenizer_only=True
        )
    tokenizer_field = "student.tokenizer" if cfg.student.tokenizer is not None else "student.path"
    student_tok = _tokenizer(tokenizer_path, cfg.student.trust_remote_code, tokenizer_field)
    if teacher_config is not None:
        note = models.check_vocabularies(
            teacher_tok, student_tok, teacher_config, student_config, cross_tokenizer
        )
        if note:
            log.info(note)
        models.check_sequence_length(cfg.data.seq_len, teacher_config, "teacher")
    models.check_sequence_length(cfg.data.seq_len, student_config, "student")
    if cfg.student.peft is not None:
        _check_peft_targets(cfg, student_config)
    check_data_sources(cfg, student_tok)
    return Plan(teacher_path, student_path, teacher_tok, student_tok, teacher_config, student_config, needs)


def loads_teacher(cfg: Config, needs: frozenset[str]) -> bool:
    """Whether the run loads the teacher's weights in its own process: an in-process source that the
    objective uses (the other sources need only its tokenizer and config)."""
    return cfg.teacher.scores_in_process and bool(needs & {"teacher", "teacher_hidden"})


def check_top_k(cfg: Config, teacher_config) -> None:
    """A top-k signal asks for at most the teacher's vocabulary: the entries past it would be fillers (id 0,
    log-prob -1e4) that the losses score as real tokens."""
    fields = []
    if cfg.teacher.reads_teacher_server:
        fields.append(("teacher.server.top_k", cfg.teacher.server.top_k))
    if cfg.teacher.source == "vllm_cache" or cfg.teacher.cache.dir is not None:  # the reader, or the builder
        fields.append(("teacher.cache.top_k", cfg.teacher.cache.top_k))
    for field, k in fields:
        if k > teacher_config.vocab_size:
            raise LLMDistillError(
                f"{field}={k} is larger than the teacher's vocabulary ({teacher_config.vocab_size} tokens, "
                "its config's vocab_size)"
            )


def _model_config(path: str, trust_remote_code: bool, field: str):
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise LLMDistillError(f"{field}: {path}/config.json cannot be read: {_first_line(err)}") from None


def _tokenizer(path: str, trust_remote_code: bool, field: str):
    try:
        return models.load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise LLMDistillError(f"{field}: no usable tokenizer in {path}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_weight_files(path: str, field: str) -> None:
    """Each safetensors file's header against its size: a truncated download fails here, not at load."""
    for weights in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise LLMDistillError(f"{field}: {weights} is damaged: {_first_line(err)}") from None


def _check_peft_targets(cfg: Config, student_config) -> None:
    """LoRA's target modules on a weightless (meta) copy of the student: a pattern matching nothing fails
    here."""
    with torch.device("meta"):
        skeleton = models.model_from_config(student_config, cfg.student.dtype)
    try:
        models.wrap_peft(skeleton, cfg.student.peft)
    except ValueError as err:
        raise LLMDistillError(f"student.peft.target_modules: {_first_line(err)}") from None


def check_data_sources(cfg: Config, tokenizer) -> None:
    """Open every training and validation source (a stream: read its first sequence): a missing, empty,
    undecodable or mis-fielded dataset fails before any weights load. Local files are prepared once by
    `datasets` and cached, so the build after preflight reuses the work."""
    for field in ("train", "validation"):
        specs = getattr(cfg.data, field)
        for spec in specs if isinstance(specs, list) else [specs] if specs is not None else []:
            if spec.streaming:
                next(iter(data.streamed_dataset(spec, cfg.data, tokenizer)))
            else:
                data.load_rows(spec)


def check_kernels(cfg: Config, plan: Plan) -> None:
    """The attention kernels and liger-kernel patches a training run loads its models with exist on this
    machine (not in preflight: the cache builder on a vLLM node never runs them)."""
    models.check_attn_implementation(cfg.student.attn_implementation, "student.attn_implementation")
    if loads_teacher(cfg, plan.needs):
        models.check_attn_implementation(cfg.teacher.attn_implementation, "teacher.attn_implementation")
    if cfg.train.liger:
        models.liger_patches(plan.student_config.model_type)


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
        student = models.model_from_config(
            plan.student_config, cfg.student.dtype, cfg.student.attn_implementation
        )
        if cfg.student.from_teacher is not None and plan.teacher_path is not None:
            # A student made from the teacher's config takes its stop tokens and sampling defaults too (the
            # export writes them): a model built from a config rebuilds them from the config alone.
            generation_config = models.generation_config_of(plan.teacher_path)
            if generation_config is not None:
                student.generation_config = generation_config
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 else None
    teacher = None
    # Only an in-process teacher that the objective uses is loaded; the other sources need only its
    # tokenizer and config.
    if plan.teacher_path is not None and loads_teacher(cfg, plan.needs):
        teacher = models.load_model(
            plan.teacher_path,
            cfg.teacher.dtype,
            cfg.teacher.trust_remote_code,
            cfg.teacher.attn_implementation,
        )
        teacher.eval().requires_grad_(False)
    if student is None:
        student = models.load_model(
            plan.student_path,
            cfg.student.dtype,
            cfg.student.trust_remote_code,
            cfg.student.attn_implementation,
        )
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


def loss_defaults(cfg: Config, plan: Plan) -> dict:
    """What the run tells its losses (a config's own value still wins): the derivation's layer map, and for
    ALM which tokens of each vocabulary start with whitespace or are special (its debiasing)."""
    defaults = derivation_defaults(plan.student_path)
    if plan.teacher_tok is not None and any(t.name == "alm" for t in cfg.loss):
        defaults["student_space_tokens"] = space_token_mask(plan.student_tok)
        defaults["teacher_space_tokens"] = space_token_mask(plan.teacher_tok)
    return defaults
