"""On-policy distillation (GKD, DistillSpec): a fraction λ of the micro-batches are the student's own samples,
continued from dataset prompts and scored by the teacher (a vLLM server).

Which batches: a batch is on-policy when a hash of its tokens (and run.seed) falls below λ, so the choice and
the sampling seed are functions of the batch alone: the same after a resume, on any rank, with no counter to
checkpoint. Sampling runs under a forked RNG, so the trainer's own random state is untouched.

A student batch keeps the first `prompt_tokens` of each row and the student writes the remaining
T - prompt_tokens + 1 tokens (the extra one is the last position's target). Targets on the prompt are masked
(the objective covers only what the student wrote, as in GKD); after the student's end-of-text token the
targets are masked too and those positions start a new "document", so the teacher never scores padding.

Generation is HF `generate` on the training student in the trainer's own process, between optimizer steps, so
it sees the current weights. Under ZeRO-3 the student's weights are partitioned and generate is a collective
(every rank would have to step through the same number of tokens): refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from llmdistill import models
from llmdistill.config import Config, LLMDistillError
from llmdistill.signal import IGNORE_INDEX, TeacherSignal
from llmdistill.teachers.base import Capabilities, TeacherSource, process_rank, register_source
from llmdistill.teachers.vllm_server import VLLMServerTeacher

CROSS_TOKENIZER_REFUSAL = (
    "teacher.source=on_policy cannot serve a cross-tokenizer loss (alm, uld): the student's samples have no "
    "teacher tokenization or chunk alignment; use teacher.source hf, vllm_server or vllm_cache"
)


def batch_draw(input_ids: torch.Tensor, seed: int) -> tuple[float, int]:
    """A uniform number in [0, 1) (is this batch on-policy?) and a sampling seed, both from its tokens."""
    digest = hashlib.blake2b(
        input_ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16, key=str(seed).encode()
    )
    raw = digest.digest()
    return int.from_bytes(raw[:8], "little") / 2**64, int.from_bytes(raw[8:12], "little")


def student_batch(sampled: torch.Tensor, prompt_tokens: int, seq_len: int, eos_id: int | None) -> dict:
    """The training batch for prompt + continuation `sampled` [B, seq_len + 1]."""
    input_ids = sampled[:, :seq_len].clone()
    targets = sampled[:, 1 : seq_len + 1].clone()
    targets[:, : prompt_tokens - 1] = IGNORE_INDEX
    position_ids = torch.arange(seq_len).expand_as(input_ids).clone()
    if eos_id is not None:
        for row in range(sampled.shape[0]):
            written = (sampled[row, prompt_tokens:] == eos_id).nonzero()
            if written.numel():
                end = prompt_tokens + int(written[0])  # index of the EOS in `sampled`: the last valid target
                if end < seq_len:
                    targets[row, end:] = IGNORE_INDEX
                    position_ids[row, end + 1 :] = torch.arange(seq_len - end - 1)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}


@torch.no_grad()
def generate(
    student, prompts: torch.Tensor, new_tokens: int, settings, seed: int, pad_id: int | None
) -> torch.Tensor:
    """prompts [B, P] continued by exactly `new_tokens` (padded after EOS), sampled under a forked RNG."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = student.generate(
                input_ids=prompts.to(device),
                attention_mask=torch.ones_like(prompts, device=device),
                max_new_tokens=new_tokens,
                do_sample=settings.temperature > 0,
                temperature=settings.temperature if settings.temperature > 0 else None,
                top_p=settings.top_p if settings.temperature > 0 else None,
                top_k=settings.top_k if settings.temperature > 0 else None,
                pad_token_id=pad_id,
                use_cache=True,
            )
    finally:
        student.train(was_training)
    out = out.cpu()
    if out.shape[1] < prompts.shape[1] + new_tokens:  # every row ended early
        fill = torch.full(
            (out.shape[0], prompts.shape[1] + new_tokens - out.shape[1]), pad_id or 0, dtype=out.dtype
        )
        out = torch.cat([out, fill], dim=1)
    return out


@register_source("on_policy")
class OnPolicyTeacher(TeacherSource):
    """λ of the batches are the student's samples; every batch is scored by the vLLM server teacher."""

    # The student's samples exist only in its own tokenization: scoring them for a cross-tokenizer objective
    # would need the teacher's tokenization of the sampled text and a new chunk alignment per batch.
    capabilities = Capabilities(top_k=True, can_fail=True)
    # Scoring is synchronous (prefetch 0, the default): a student batch must be generated with the current
    # weights, in this thread, between optimizer steps; a fetch-ahead thread would sample from weights
    # mid-update.

    def __init__(
        self, cfg: Config, tokenizer, student, rank: int = 0, run_dir: Path | None = None, check: bool = True
    ):
        if student is None:
            raise LLMDistillError("teacher.source=on_policy needs the student module to generate from")
        if cfg.deepspeed.zero_stage == 3:
            raise LLMDistillError(
                "teacher.source=on_policy: under deepspeed.zero_stage=3 generation is a collective over all "
                "ranks (partitioned weights); use zero_stage 0-2"
            )
        p = cfg.teacher.on_policy
        if p.prompt_tokens >= cfg.data.seq_len:
            raise LLMDistillError(
                f"teacher.on_policy.prompt_tokens={p.prompt_tokens} must be below "
                f"data.seq_len={cfg.data.seq_len}"
            )
        self.cfg, self.settings, self.student, self.rank = cfg, p, student, rank
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.scorer = VLLMServerTeacher(cfg, tokenizer, rank, check=check)
        self.samples_log = (run_dir / f"on_policy_rank{rank}.jsonl") if run_dir is not None else None
        self.seen = 0

    @classmethod
    def build(cls, cfg, model, needs, student):
        path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        tokenizer = models.load_tokenizer(path, cfg.teacher.trust_remote_code)
        return cls(cfg, tokenizer, student, process_rank(), run_dir=cfg.run.dir)

    def transform(self, batch: dict) -> dict:
        """The batch to train on: the dataset's, or (for a fraction λ of them) the student's continuation."""
        if "teacher_input_ids" in batch:
            raise LLMDistillError(CROSS_TOKENIZER_REFUSAL)
        draw, seed = batch_draw(batch["input_ids"], self.cfg.run.seed)
        on_policy = draw < self.settings.fraction
        if on_policy:
            p, t = self.settings.prompt_tokens, self.cfg.data.seq_len
            sampled = generate(
                self.student, batch["input_ids"][:, :p], t - p + 1, self.settings, seed, self.pad_id
            )
            batch = student_batch(sampled, p, t, self.eos_id)
        self._log(batch, on_policy)
        return batch

    def signal(self, batch: dict) -> TeacherSignal:
        return self.scorer.signal(batch)

    def _log(self, batch: dict, on_policy: bool) -> None:
        # One line per micro-batch: lets a user (and the tests) see what the student wrote and was scored on.
        self.seen += 1
        if self.samples_log is None:
            return
        record = {
            "micro_batch": self.seen,
            "on_policy": on_policy,
            "prompt_tokens": self.settings.prompt_tokens if on_policy else 0,
            "valid_targets": int((batch["targets"] != IGNORE_INDEX).sum()),
            "input_ids": batch["input_ids"][0].tolist(),
        }
        with self.samples_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
