"""Derive a student from the teacher by pruning (Minitron depth + width, MAGNET gradient saliency).

`derive_student(cfg)` is the one entry point: it scores the teacher on a calibration set (split across
ranks, scores summed), picks a shape (explicit `derive.target`, or a `derive.search` under a parameter
budget), prunes, optionally masks in-block weights, and writes a plain HF checkpoint with `derivation.json`,
plots and `masks.safetensors`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

from llmdistill.config import Config, DatasetSpec, DeriveConfig, LLMDistillError
from llmdistill.data import load_texts, tokenize_and_pack
from llmdistill.derive.importance import (
    activation_scores,
    combine_depth_scores,
    depth_scores,
    gradient_magnitudes,
    held_out_loss,
)
from llmdistill.derive.masks import (
    MASK_FILE,
    apply_masks,
    load_masks,
    mask_gradients,
    mask_sparsity,
    maskable_parameters,
    saliency_masks,
    save_masks,
)
from llmdistill.derive.plots import plot_scores
from llmdistill.derive.prune import (
    axes_of,
    build_student,
    check_supported,
    importance_plan,
    parameter_shapes,
    random_plan,
    resolve_shape,
    shape_parameters,
    teacher_shape,
)
from llmdistill.derive.search import feasible_shapes, pick_candidates, rank_candidates
from llmdistill.distributed import init_distributed
from llmdistill.models import (
    check_attn_implementation,
    check_attn_softcapping,
    check_sequence_length,
    honour_umask,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

__all__ = [
    "derive_student",
    "derive_output",
    "apply_masks",
    "mask_gradients",
    "load_masks",
    "MASK_FILE",
    "build_student",
    "importance_plan",
    "random_plan",
    "activation_scores",
    "held_out_loss",
    "calibration_batches",
]


def _setup(cfg: Config) -> tuple[int, int, str]:
    """Join the process group only under a multi-rank launcher: one plain process needs no DeepSpeed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(cfg.train.device)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 0, 1, device


def packed_subset(spec: DatasetSpec, tokenizer, seq_len: int, n: int, name: str):
    """n packed sequences spread evenly over the dataset (not just its first documents)."""
    packed = tokenize_and_pack(load_texts(spec), tokenizer, seq_len, name)
    idx = torch.linspace(0, len(packed) - 1, min(n, len(packed))).round().long().unique().tolist()
    return packed.select(idx)


def calibration_batches(
    dataset, batch_size: int, rank: int, world: int, device
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of a small dataset: whole batches dealt round-robin, on `device`.

    Batches are cut the same way whatever the world size, so per-batch statistics (MAGNET's |gradient| is
    taken per batch) sum to the same totals on one rank or many.
    """
    batches = []
    for b, start in enumerate(range(0, len(dataset), batch_size)):
        if b % world != rank:
            continue
        part = dataset[start : start + batch_size]
        batches.append({k: part[k].long().to(device) for k in ("input_ids", "position_ids", "targets")})
    return batches


def _tolist(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _tolist(v) for k, v in x.items()}
    return x


def derive_output(cfg: Config) -> Path:
    """Where `derive_student` writes the student: derive.output, else <run.dir>/derived."""
    output = cfg.derive.output if cfg.derive else None
    return Path(output) if output else cfg.run.dir / "derived"


def derive_student(cfg: Config, candidate_score: Callable | None = None) -> Path:
    """Prune the teacher into the student described by `cfg.derive`; returns the output HF directory.

    `candidate_score(student_model, held_out_batches) -> float` (lower is better) replaces the search's
    score, the held-out loss right after pruning: the trainer can pass one that distils K steps first.
    """
    dcfg = cfg.derive or DeriveConfig()
    started = time.time()
    rank, world, device = _setup(cfg)
    if cfg.teacher.path is None:
        raise LLMDistillError("derive needs a teacher: set teacher.path")
    teacher_path = resolve_model_path(cfg.teacher.path, "teacher.path")
    # What fails on the config alone fails before any weights are read: the architecture, the attention
    # kernel (the scores and the candidates' held-out loss run under it), a bad target.
    tconf = AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.teacher.trust_remote_code)
    check_supported(tconf)
    attn = cfg.teacher.attn_implementation
    check_attn_implementation(attn, "teacher.attn_implementation")
    check_attn_softcapping(attn, "teacher.attn_implementation", tconf)
    if dcfg.search is None:
        resolve_shape(tconf, dcfg.target.model_dump() if dcfg.target else None)
    # Scores are accumulated in float64 whatever the teacher's dtype; the student keeps the teacher's dtype
    # and its attention kernel.
    teacher = load_model(teacher_path, cfg.teacher.dtype, cfg.teacher.trust_remote_code, attn).to(device)
    teacher.eval()
    tconf = teacher.config
    named_shapes = parameter_shapes(teacher)
    for name in named_shapes:
        axes_of(name)  # any parameter outside the known layout is an error before any work is done
    check_sequence_length(cfg.data.seq_len, tconf, "teacher")
    teacher_params = sum(p.numel() for p in teacher.parameters())

    # Fail on an impossible target or budget before spending time on scores.
    feasible = None
    if dcfg.search is not None:
        feasible = feasible_shapes(tconf, named_shapes, dcfg.search, teacher_params)
        shape = None
    else:
        shape = resolve_shape(tconf, dcfg.target.model_dump() if dcfg.target else None)

    tokenizer = load_tokenizer(teacher_path, cfg.teacher.trust_remote_code)
    calib_spec = dcfg.calibration or cfg.data.train
    calib = calibration_batches(
        packed_subset(
            calib_spec, tokenizer, cfg.data.seq_len, dcfg.calibration_samples, "derive.calibration"
        ),
        dcfg.batch_size,
        rank,
        world,
        device,
    )
    eval_spec = cfg.data.validation or calib_spec
    held_out = calibration_batches(
        packed_subset(eval_spec, tokenizer, cfg.data.seq_len, dcfg.eval_samples, "derive.eval"),
        dcfg.batch_size,
        rank,
        world,
        device,
    )

    scores = activation_scores(teacher, calib, dcfg.aggregation)
    depth = depth_scores(teacher, calib, dcfg.depth_methods, scores)
    layer_score = combine_depth_scores(depth)

    def plan_for(s):
        return importance_plan(scores, layer_score, tconf, s, dcfg.layer_selection, dcfg.rescale_norms)

    ranking = None
    if feasible is not None:
        candidates = pick_candidates(feasible, dcfg.search.max_candidates)
        score = candidate_score or held_out_loss
        ranking = rank_candidates(
            candidates, plan_for, lambda plan: score(build_student(teacher, plan), held_out)
        )
        plan = ranking[0]["plan"]
        shape = plan["shape"]
    else:
        plan = plan_for(shape)

    student = build_student(teacher, plan)
    masks = None
    if dcfg.masking is not None:
        names = maskable_parameters(student)
        grads = gradient_magnitudes(student, calib, names)
        weights = dict(student.named_parameters())
        masks = saliency_masks(
            grads, {n: weights[n].detach().cpu() for n in names}, dcfg.masking.sparsity, dcfg.masking.saliency
        )
        apply_masks(student, masks)

    teacher_loss = held_out_loss(teacher, held_out)
    student_loss = held_out_loss(student, held_out)  # right after pruning; the search's score may differ
    student_params = sum(p.numel() for p in student.parameters())
    assert student_params == shape_parameters(named_shapes, tconf, shape), "parameter arithmetic out of sync"

    out = derive_output(cfg)
    if rank == 0:
        _write(
            out,
            student,
            tokenizer,
            masks,
            {
                "teacher": teacher_path,
                "teacher_shape": teacher_shape(tconf),
                "student_shape": shape,
                "parameters": {
                    "teacher": teacher_params,
                    "student": student_params,
                    "ratio": student_params / teacher_params,
                },
                "held_out_loss": {"teacher": teacher_loss, "student": student_loss},
                "config": dcfg.model_dump(mode="json"),
                "calibration": {
                    "dataset": calib_spec.path,
                    "sequences": dcfg.calibration_samples,
                    "seq_len": cfg.data.seq_len,
                    "ranks": world,
                },
                "kept": {k: plan[k] for k in ("layers", "hidden", "heads", "kv_heads", "neurons")},
                "norm_scale": plan.get("norm_scale"),
                "scores": {
                    "depth": _tolist(depth),
                    "depth_combined": layer_score.tolist(),
                    "heads": scores["heads"].tolist(),
                    "neurons": scores["neurons"].tolist(),
                    "channels": scores["channels"].tolist(),
                },
                "search": None
                if ranking is None
                else {
                    "budget": dcfg.search.param_budget,
                    "memory_budget_gb": dcfg.search.memory_budget_gb,
                    "feasible_shapes": len(feasible),
                    "ranking": [
                        {k: c[k] for k in ("rank", "shape", "params", "memory_gb", "loss")} for c in ranking
                    ],
                },
                "masking": None
                if masks is None
                else {
                    "file": MASK_FILE,
                    "sparsity": mask_sparsity(masks),
                    "saliency": dcfg.masking.saliency,
                    "parameters": sorted(masks),
                },
                "seconds": round(time.time() - started, 2),
            },
            (scores, depth, plan) if dcfg.plots else None,
        )
    if world > 1:
        torch.distributed.barrier()
    return out


def _write(out: Path, student, tokenizer, masks, record: dict, plot_inputs) -> None:
    """Everything goes to a temporary directory renamed at the end: no half-written student is ever left."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.to("cpu").save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if masks is not None:
        save_masks(masks, tmp / MASK_FILE)
    if plot_inputs is not None:
        record["plots"] = plot_scores(*plot_inputs, tmp / "plots")
    (tmp / "derivation.json").write_text(json.dumps(record, indent=1))
    honour_umask(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
