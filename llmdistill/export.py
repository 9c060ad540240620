"""Export: the trained student as a plain HF checkpoint, and the check that it reproduces the engine.

Every rank takes part in gathering the weights (ZeRO-3 holds them in shards); rank 0 writes `student/` and
reloads it with plain transformers to compare its logits with the engine's on a probe: one held-out sequence,
kept in memory. Nothing but the student is written.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from llmdistill import models
from llmdistill.config import Config, LLMDistillError
from llmdistill.derive.masks import apply_masks
from llmdistill.distributed import all_reduce_sum

log = logging.getLogger("llmdistill.export")

# How far the exported student's logits may stray from the engine's, as max |diff| / max |engine logit|. The
# export is reloaded in float32, so what differs is only the arithmetic of the run's dtypes:
# - float32: the same weights through other kernels and summation orders (a merged LoRA computes (W + BA)x,
#   the engine Wx + B(Ax)): ~1e-6 of the logit scale. 1e-3 leaves a wide margin.
# - float16 (unit roundoff 2^-11 = 4.9e-4) and bfloat16 (2^-8 = 3.9e-3): the engine rounds every activation
#   (and a half-precision export rounds the weights); through a deep stack that drifts by tens of roundoffs.
#   2e-2 and 1e-1 allow ~40 and ~25 of them.
# A wrong export (stale, unmasked, untied or mis-merged weights) moves logits by the order of their own scale,
# and flips the top-1 token where the engine is confident, which is checked too.
EXPORT_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}


def export_tolerance(cfg: Config) -> float:
    """The looser of the training dtype's and the exported weights' tolerance."""
    return max(EXPORT_TOLERANCE[cfg.train.dtype], EXPORT_TOLERANCE[cfg.student.dtype])


def gather_state_dict(module, rank: int) -> dict | None:
    """The full state dict of `module` on rank 0, gathered one parameter at a time under ZeRO-3."""
    import deepspeed  # lazy: importing deepspeed is slow, and only a running trainer calls this

    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            if rank == 0:
                state[name] = param.detach().to("cpu", torch.float32).clone()
    return state if rank == 0 else None


def probe_of(batch: dict) -> dict:
    """The export check's probe: the first sequence of a held-out batch."""
    return {"input_ids": batch["input_ids"][:1], "position_ids": batch["position_ids"][:1]}


@torch.no_grad()
def probe_logits(model, probe: dict, device) -> torch.Tensor:
    """fp32 logits [1, T, V] of `model` on the probe, on the CPU."""
    logits = model(
        input_ids=probe["input_ids"].to(device),
        position_ids=probe["position_ids"].to(device),
        use_cache=False,
    ).logits
    return logits.float().cpu()


def write_student(
    cfg: Config, state: dict, config, tokenizer, out_dir: Path, card: dict, masks, generation_config=None
) -> Path:
    """The student from its gathered state: LoRA merged, derivation's masks re-imposed, saved as HF files
    with `generation_config` (the training student's: its path's, or the teacher's for from_teacher)."""
    model = models.state_to_model(state, config, cfg.student.peft)
    if masks is not None:
        apply_masks(model, masks)  # a LoRA update is dense: the merge would undo derivation's masks
    if generation_config is not None:
        # The model rebuilt from its config has a generation config made from the config alone: no extra
        # EOS ids, no sampling defaults.
        model.generation_config = copy.deepcopy(generation_config)
    extra = (masks,) if masks is not None else ()
    return models.save_student(model, tokenizer, out_dir, cfg.student.dtype, card, extra)


def check_export(out_dir: Path, probe: dict, expected: torch.Tensor, tolerance: float) -> dict:
    """Reload the export with plain transformers and compare its probe logits with the engine's.

    Raises LLMDistillError past `tolerance` (relative to the logit scale), or when the top-1 token differs at
    a position where the engine's top-1 leads its runner-up by more than twice the tolerated difference.
    """
    # The reload runs on the CPU: under eager for a model that soft-caps its attention logits (Gemma-2),
    # since sdpa drops the cap.
    softcapped = getattr(AutoConfig.from_pretrained(out_dir), "attn_logit_softcapping", None) is not None
    exported = models.load_model(
        str(out_dir), "float32", attn_implementation="eager" if softcapped else "sdpa"
    )
    got = probe_logits(exported, probe, "cpu")
    diff = (got - expected).abs()
    max_abs = diff.max().item()
    scale = max(expected.abs().max().item(), 1e-12)
    relative = max_abs / scale
    top2 = expected.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) > 2 * tolerance * scale
    flipped = int((got.argmax(-1) != expected.argmax(-1))[confident].sum())
    log.info(f"exported student vs engine logits: max |diff| = {max_abs:.2e} ({relative:.2e} of the scale)")
    if relative > tolerance or flipped:
        raise LLMDistillError(
            f"export check failed: {out_dir} does not reproduce the engine's logits "
            f"(max |diff| {max_abs:.3g} = {relative:.3g} of the logit scale, tolerance {tolerance:g}; "
            f"top-1 differs at {flipped} confident positions)"
        )
    return {"export_max_abs_diff": max_abs, "export_max_rel_diff": relative}


def export(engine, cfg: Config, tokenizer, run_dir: Path, rank: int, probe_batch, device, card, masks=None):
    """Write run_dir/student as a plain HF checkpoint and check it; returns (out_dir, check figures)."""
    student = engine.module.student
    out_dir = run_dir / "student"
    state = gather_state_dict(student, rank)
    expected = probe = None
    if probe_batch is not None:
        # Every rank runs the probe forward: under ZeRO-3 it is a collective.
        engine.eval()
        probe = probe_of(probe_batch)
        expected = probe_logits(student, probe, device)
    figures, failure = {}, ""
    if rank == 0:
        base = student.get_base_model() if cfg.student.peft is not None else student
        write_student(cfg, state, base.config, tokenizer, out_dir, card, masks, base.generation_config)
        if probe is not None:
            try:
                figures = check_export(out_dir, probe, expected, export_tolerance(cfg))
            except LLMDistillError as err:
                failure = str(err)
    # Every rank learns the verdict, so none is left waiting in a collective when the check fails.
    if all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
        raise LLMDistillError(failure or "export check failed on rank 0")
    return out_dir, figures
