"""On-policy distillation (GKD, DistillSpec): a fraction λ of the micro-batches are the student's own
samples, continued from dataset prompts and scored by the teacher (the vLLM teacher servers, or the teacher
in-process).

Which batches: a batch is on-policy when a hash of its tokens (and run.seed) falls below λ, so the choice and
the sampling seed are functions of the batch alone: the same after a resume, on any rank, with no counter to
checkpoint.

A student batch keeps the first `prompt_tokens` of each row and the student writes up to
T - prompt_tokens + 1 tokens (the extra one is the last position's target). With chat data (`format:
messages` or `prompt_completion`) the prompt of a row is instead its conversation up to the first trained
position: everything before the answer, the assistant header included (with `data.train_on: last`, everything
before the last answer), and the student writes the answer; `prompt_tokens` is then unused. Each row must hold
one conversation, so chat data needs `data.pack: false` (refused otherwise). Targets on the prompt are masked
(the objective covers only what the student wrote, as in GKD); after the student's end-of-text token (or its
last written token) the targets are masked too and those positions start a new "document", so the teacher
never scores padding.

Who writes (teacher.on_policy.generator):
- `hf`: HF `generate` on the training student in the trainer's own process, between optimizer steps, under a
  forked RNG (the trainer's random state is untouched). Under ZeRO-3 the weights are partitioned and generate
  would be a collective: refused.
- `vllm`: a vLLM engine in each trainer process holding a copy of the student (teachers/vllm_generator.py),
  its weights pushed every `sync_every` optimizer steps (gathered under ZeRO-3, LoRA merged). The samples for
  step k come from the weights of step v(k) = max(the step sampling started at, ((k - lag) // sync_every) *
  sync_every), and each request is seeded, so they are a function of the batch and the step. With lag 1 the
  samples of step k + 1 are written in a thread while step k trains. The lag of each micro-batch (k - v(k)) is
  logged in on_policy_rank<r>.jsonl. On chat data all rows of a micro-batch go to vLLM in one call (prompts
  of different lengths, row i seeded seed + i as alone); HF generate writes them one row at a time.
- `vllm_server`: the same, from separate vLLM servers holding a copy of the student
  (teachers/vllm_rollout_server.py; start one with `llmdistill serve-student`, teacher.on_policy.server):
  rank 0 writes the weights under the run directory and the servers load them; same versions and lag. A
  server that stops answering stops the run after a checkpoint of the last whole step, as a teacher server
  does, and the same command resumes once it is back.

Exact resume with the vllm and vllm_server generators: a checkpoint of step s records v(s), the weights its
next samples come from. When v(s) is not s (s is not a push step; or, with lag 1, s's samples came from the
push before), those weights are saved beside the checkpoint (rollout_weights_rank<r>.safetensors,
fingerprinted by its COMPLETE marker, recorded in it) and the resumed engine starts from them; with lag 1 at a
push step the checkpoint's own weights are pushed once step s's samples are written, where the uninterrupted
run pushed them. They come from a copy kept at each push, not from the engine (on the CPU vLLM repacks its
linear weights and drops the originals): every rank keeps only its 1/world slice of each flattened weight, and
writes that slice; a resume reads them all back one weight at a time. With lag 1 the previous push's slices
are kept too, for one step; with sync_every 1 and lag 0 nothing is kept (a checkpoint's own weights are the
next ones). So a resumed run reproduces the uninterrupted one at any step, for lag 0 and 1.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from llmdistill import models
from llmdistill.config import Config, LLMDistillError
from llmdistill.data import to_device
from llmdistill.signal import IGNORE_INDEX, TeacherSignal
from llmdistill.teachers.base import (
    Capabilities,
    TeacherSource,
    TeacherUnavailable,
    process_rank,
    register_source,
)
from llmdistill.teachers.hf import HFTeacher
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


def student_batch(
    sampled: torch.Tensor | list[torch.Tensor],
    prompt_tokens: int | list[int],
    seq_len: int,
    eos_id: int | None,
) -> dict:
    """The training batch for prompt + continuation `sampled` ([B, P + n], or one 1-D row per sample with its
    own prompt length P in `prompt_tokens`), n <= seq_len - P + 1 written tokens (padded after EOS)."""
    rows = list(sampled)
    lengths = [prompt_tokens] * len(rows) if isinstance(prompt_tokens, int) else list(prompt_tokens)
    input_ids = torch.zeros(len(rows), seq_len, dtype=rows[0].dtype)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.arange(seq_len).repeat(len(rows), 1)
    for row, (tokens, prompt) in enumerate(zip(rows, lengths, strict=True)):
        written = len(tokens) - prompt
        # Fewer new tokens than the window holds: pad (masked below).
        tokens = torch.cat([tokens, tokens.new_zeros(max(0, seq_len + 1 - len(tokens)))])
        input_ids[row] = tokens[:seq_len]
        targets[row, prompt - 1 :] = tokens[prompt : seq_len + 1]
        # Index in `tokens` of the last valid target: the EOS, or the last written token.
        end = prompt + written - 1
        if eos_id is not None:
            eos = (tokens[prompt : prompt + written] == eos_id).nonzero()
            if eos.numel():
                end = prompt + int(eos[0])
        if end < seq_len:
            targets[row, end:] = IGNORE_INDEX
            position_ids[row, end + 1 :] = torch.arange(seq_len - end - 1)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}


def chat_prompt_lengths(targets: torch.Tensor) -> list[int]:
    """Per row of a chat batch: the tokens before its answer (the first trained position's next token)."""
    trained = targets != IGNORE_INDEX
    if not trained.any(1).all():
        raise LLMDistillError("on-policy with chat data: a batch row has no answer to write")
    return [int(t) + 1 for t in trained.int().argmax(1)]


def is_chat_data(cfg: Config) -> bool:
    specs = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    return any(spec.format != "text" for spec in specs)


def weights_step(step: int, opened_at: int, lag: int, sync_every: int) -> int:
    """The optimizer step whose weights write the samples of step `step`: `lag` steps back, rounded down to a
    push (every `sync_every` steps), and never before the stream opened (the weights it started from)."""
    return max(opened_at, max(step - lag, 0) // sync_every * sync_every)


ROLLOUT_WEIGHTS = "rollout_weights_rank{rank}.safetensors"


def kept_slices(weights, rank: int, world: int, into: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, weight) pairs through, keeping this rank's 1/world of each flattened weight in `into`
    ({name: (slice, shape)}), in host memory (a GPU's is the training's): together the ranks hold one copy,
    and none holds the whole model twice."""
    for name, weight in weights:
        part = weight.reshape(-1).tensor_split(world)[rank]
        into[name] = (part.to("cpu", copy=True), list(weight.shape))
        yield name, weight


def write_slices(slices: dict, path: Path) -> None:
    from safetensors.torch import save_file  # lazy: only a checkpoint of an on-policy vLLM run writes them

    shapes = {name: shape for name, (_, shape) in slices.items()}
    save_file({name: t for name, (t, _) in slices.items()}, path, metadata={"shapes": json.dumps(shapes)})


def read_slices(paths: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full weight) from every rank's slice file (in rank order), one weight at a time."""
    from safetensors import safe_open  # lazy: see write_slices

    for path in paths:
        if not path.is_file():
            raise LLMDistillError(f"checkpoint: the rollout weights {path} are missing")
    files = [safe_open(str(path), framework="pt") for path in paths]
    for name, shape in json.loads(files[0].metadata()["shapes"]).items():
        yield name, torch.cat([f.get_tensor(name) for f in files]).view(shape)


def check_on_policy(cfg: Config) -> None:
    """Refuse an on-policy setting that cannot run, before anything loads."""
    p = cfg.teacher.on_policy
    if is_chat_data(cfg) and cfg.data.pack:
        raise LLMDistillError(
            "teacher.source=on_policy with chat data (data.train format messages/prompt_completion) needs "
            "data.pack: false: each row's prompt is its conversation up to the answer"
        )
    if p.prompt_tokens >= cfg.data.seq_len:
        raise LLMDistillError(
            f"teacher.on_policy.prompt_tokens={p.prompt_tokens} must be below data.seq_len={cfg.data.seq_len}"
        )
    if p.max_new_tokens is not None and p.max_new_tokens > cfg.data.seq_len - p.prompt_tokens + 1:
        raise LLMDistillError(
            f"teacher.on_policy.max_new_tokens={p.max_new_tokens} is above data.seq_len - prompt_tokens + 1"
            f" = {cfg.data.seq_len - p.prompt_tokens + 1} (what a training window holds)"
        )
    if p.generator == "hf" and cfg.deepspeed.zero_stage == 3:
        raise LLMDistillError(
            "teacher.on_policy.generator=hf: under deepspeed.zero_stage=3 generation is a collective over "
            "all ranks (partitioned weights); use teacher.on_policy.generator=vllm, or zero_stage 0-2"
        )
    if p.generator == "hf" and p.lag:
        raise LLMDistillError(
            "teacher.on_policy.lag=1 needs teacher.on_policy.generator=vllm (HF generate samples from the "
            "live weights)"
        )
    if p.lag and p.scorer == "hf" and cfg.deepspeed.zero_stage == 3:
        raise LLMDistillError(
            "teacher.on_policy.lag=1 scores in a thread, and the in-process teacher under ZeRO-3 is a "
            "collective: use lag 0 or teacher.on_policy.scorer=vllm_server"
        )


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
    """λ of the batches are the student's samples; every batch is scored by the teacher."""

    # The student's samples exist only in its own tokenization: scoring them for a cross-tokenizer objective
    # would need the teacher's tokenization of the sampled text and a new chunk alignment per batch.
    capabilities = Capabilities(top_k=True, can_fail=True)

    @classmethod
    def preflight(cls, cfg) -> None:
        check_on_policy(cfg)

    @classmethod
    def check_ready(cls, cfg, plan) -> None:
        if cfg.teacher.reads_teacher_server:
            VLLMServerTeacher.check_ready(cfg, plan)
        if cfg.teacher.reads_student_server:
            from llmdistill.teachers.vllm_rollout_server import check_servers

            check_servers(cfg, plan.student_config)

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        student,
        rank: int = 0,
        run_dir: Path | None = None,
        teacher=None,
    ):
        if student is None:
            raise LLMDistillError("teacher.source=on_policy needs the student module to generate from")
        check_on_policy(cfg)
        p = cfg.teacher.on_policy
        self.cfg, self.settings, self.student, self.rank = cfg, p, student, rank
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.new_tokens = p.max_new_tokens or cfg.data.seq_len - p.prompt_tokens + 1
        self.chat = is_chat_data(cfg)
        if p.scorer == "hf":
            if teacher is None:
                raise LLMDistillError("teacher.on_policy.scorer=hf needs the in-process teacher")
            self.scorer = HFTeacher(teacher)
        else:
            self.scorer = VLLMServerTeacher(cfg, rank)
        self.samples_log = (run_dir / f"on_policy_rank{rank}.jsonl") if run_dir is not None else None
        self.engine = None
        # Version bookkeeping of the vLLM engine's weights (see the module docstring); `position` is the
        # index of the next micro-batch to transform, `version` the step whose weights the engine holds.
        self.grad_accum = cfg.train.grad_accum
        self.position = self.opened_at = self.version = 0
        self.failed = self.closed = False
        # Exact resume (module docstring): this rank's slices of the pushed weights a checkpoint may need,
        # {step: slices}; the state of the checkpoint resumed from (load_state); a push still owed.
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.kept: dict[int, dict] = {}
        self.resumed: dict | None = None
        self.owed_push: int | None = None
        self.turn = threading.Condition()
        self.push_failure: TeacherUnavailable | None = None
        if p.generator in ("vllm", "vllm_server"):
            if p.generator == "vllm":
                from llmdistill.teachers.vllm_generator import VLLMGenerator  # lazy: vllm is slow to import

                base = student.get_base_model() if hasattr(student, "get_base_model") else student
                self.engine = VLLMGenerator(cfg, base.config, self.eos_id)
            else:
                from llmdistill.teachers.vllm_rollout_server import RolloutServer

                weights_dir = Path(run_dir or cfg.run.dir) / "rollout_weights"
                self.engine = RolloutServer(cfg, self.eos_id, rank, weights_dir)
            # With lag 1, one step's micro-batches are written (and scored) ahead, in a thread.
            self.prefetch = self.grad_accum if p.lag else 0

    @classmethod
    def build(cls, cfg, model, needs, student):
        path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        tokenizer = models.load_tokenizer(path, cfg.teacher.trust_remote_code)
        return cls(cfg, tokenizer, student, process_rank(), run_dir=cfg.run.dir, teacher=model)

    @property
    def can_fail(self) -> bool:
        return self.cfg.teacher.reads_teacher_server or self.cfg.teacher.reads_student_server

    # ------------------------------------------------------------------------------------------ weights

    def push_weights(self, step: int) -> None:
        from llmdistill.teachers.vllm_generator import student_weights  # lazy: see __init__

        weights = student_weights(self.student)
        # With a push every step and lag 0 a checkpoint's own weights are always the next samples' weights.
        if self.settings.sync_every > 1 or self.settings.lag:
            self.kept[step] = {}
            weights = kept_slices(weights, self.rank, self.world, self.kept[step])
        try:
            self.engine.load(weights)
        except TeacherUnavailable as err:
            # A rollout server failed (on every rank alike): the next micro-batch raises it, so that the
            # trainer keeps this whole step and stops.
            self.push_failure = err
        self.version = step

    def stream(self, batches, device: str, start: int = 0):
        if self.engine is not None:
            self.position, self.failed = start, False
            resumed, self.resumed = self.resumed, None
            self.opened_at = resumed["opened_at"] if resumed else start // self.grad_accum
            if not resumed or "rollout_weights_files" not in resumed:
                # Every rank opens the stream at its first step (a collective under ZeRO-3): the engine gets
                # the weights the trainer starts from. (Otherwise load_state gave it the checkpoint's
                # rollout weights.)
                self.push_weights(start // self.grad_accum)
        for index, pair in enumerate(super().stream(batches, device, start), start):
            if self.owed_push is not None and index + 1 == (self.owed_push + 1) * self.grad_accum:
                # Resumed with lag 1 at a push step: the uninterrupted run pushed the trainer's weights once
                # this step's samples were written; they are, up to its last micro-batch.
                with self.turn:
                    self.push_weights(self.owed_push)
                    self.owed_push = None
                    self.turn.notify_all()
            yield pair

    def after_optimizer_step(self, step: int) -> None:
        if self.engine is None:
            return
        if step % self.settings.sync_every == 0:
            with self.turn:
                # Every sample that needs older weights is written first (with lag 1, the thread is finishing
                # step `step`'s samples); a failed thread writes nothing more, and the trainer stops at its
                # next batch.
                written = (step + self.settings.lag) * self.grad_accum
                self.turn.wait_for(lambda: self.failed or self.position >= written)
                self.push_weights(step)  # every rank, in step: a collective under ZeRO-3
                self.turn.notify_all()
        needed = weights_step(step, self.opened_at, self.settings.lag, self.settings.sync_every)
        for version in [v for v in self.kept if v < needed]:
            del self.kept[version]

    # ------------------------------------------------------------------------------------------ resume

    def save_state(self, path: Path, step: int) -> dict | None:
        """The weights step `step`'s samples come from, written beside its checkpoint unless they are its
        own."""
        if self.engine is None:
            return None
        needed = weights_step(step, self.opened_at, self.settings.lag, self.settings.sync_every)
        state = {"step": step, "opened_at": self.opened_at, "rollout_weights_step": needed}
        if needed != step:
            write_slices(self.kept[needed], path / ROLLOUT_WEIGHTS.format(rank=self.rank))
            state["rollout_weights_files"] = self.world
        return state

    def load_state(self, path: Path, state: dict | None) -> None:
        if self.engine is None or not state:
            return  # an older checkpoint: the engine starts from its weights (at the stream's opening)
        self.resumed = state
        if "rollout_weights_files" not in state:
            return  # the checkpoint's own weights, pushed at the stream's opening
        paths = [path / ROLLOUT_WEIGHTS.format(rank=r) for r in range(state["rollout_weights_files"])]
        version = state["rollout_weights_step"]
        self.kept = {version: {}}
        self.engine.load(kept_slices(read_slices(paths), self.rank, self.world, self.kept[version]))
        self.version = version
        if state["step"] % self.settings.sync_every == 0:  # lag 1: see stream
            self.owed_push = state["step"]

    # ------------------------------------------------------------------------------------------ batches

    def transform(self, batch: dict) -> dict:
        """The batch to train on: the dataset's, or (for a fraction λ of them) the student's continuation."""
        if "teacher_input_ids" in batch:
            raise LLMDistillError(CROSS_TOKENIZER_REFUSAL)
        try:
            return self._transform(batch)
        except BaseException:
            with self.turn:
                self.failed = True
                self.turn.notify_all()
            raise

    def _transform(self, batch: dict) -> dict:
        if self.push_failure is not None:
            raise self.push_failure
        draw, seed = batch_draw(batch["input_ids"], self.cfg.run.seed)
        on_policy = draw < self.settings.fraction
        index = self.position
        step = index // self.grad_accum
        p = self.settings
        prompts = batch["input_ids"][:, : p.prompt_tokens]
        if on_policy and self.chat:
            lengths = chat_prompt_lengths(batch["targets"])
        weights = step
        if on_policy and self.engine is not None:
            weights = weights_step(step, self.opened_at, self.settings.lag, self.settings.sync_every)
            with self.turn:
                if self.prefetch:  # the thread waits for the trainer to push the weights it needs
                    self.turn.wait_for(lambda: self.version == weights or self.closed)
                    if self.closed:
                        raise RuntimeError("on-policy source closed while waiting for weights")
                elif self.version != weights:
                    raise RuntimeError(f"on-policy engine holds step {self.version}'s weights, not {weights}")
                if self.chat:  # every row in one call, each with its own prompt length
                    ids = batch["input_ids"].cpu()
                    rows = [ids[row, :prompt] for row, prompt in enumerate(lengths)]
                    sampled = self.engine.generate(rows, self._chat_budgets(lengths), p, seed, self.pad_id)
                else:
                    sampled = self.engine.generate(prompts.cpu(), self.new_tokens, p, seed, self.pad_id)
        elif on_policy and self.chat:

            def hf_generate(prompt, new_tokens, settings, row_seed, pad_id):
                return generate(self.student, prompt, new_tokens, settings, row_seed, pad_id)

            sampled = self._chat_rollouts(hf_generate, batch["input_ids"], lengths, seed)
        elif on_policy:
            sampled = generate(self.student, prompts, self.new_tokens, p, seed, self.pad_id)
        if on_policy:
            batch = student_batch(
                sampled, lengths if self.chat else p.prompt_tokens, self.cfg.data.seq_len, self.eos_id
            )
        with self.turn:
            self.position += 1
            self.turn.notify_all()
        self._log(batch, on_policy, index, step, weights)
        return batch

    def _chat_budgets(self, lengths: list[int]) -> list[int]:
        """New tokens per chat row: up to the rest of the window (or max_new_tokens)."""
        seq_len, limit = self.cfg.data.seq_len, self.settings.max_new_tokens
        return [min(limit or seq_len, seq_len - prompt + 1) for prompt in lengths]

    def _chat_rollouts(self, write, input_ids: torch.Tensor, lengths: list[int], seed: int) -> list:
        """One rollout per row from its own chat prompt (HF generate pads prompts of different lengths), row i
        seeded seed + i as in a batched call."""
        rows = []
        for row, (prompt, new_tokens) in enumerate(zip(lengths, self._chat_budgets(lengths), strict=True)):
            out = write(input_ids[row : row + 1, :prompt], new_tokens, self.settings, seed + row, self.pad_id)
            rows.append(out[0].cpu())
        return rows

    def signal(self, batch: dict) -> TeacherSignal:
        try:
            if isinstance(self.scorer, HFTeacher):
                return self.scorer.signal(to_device(batch, _device_of(self.student)))
            return self.scorer.signal(batch)
        except BaseException:
            with self.turn:
                self.failed = True
                self.turn.notify_all()
            raise

    def _log(self, batch: dict, on_policy: bool, index: int, step: int, weights: int) -> None:
        # One line per micro-batch (`index`: this rank's micro-batches before it in the run, so a resumed
        # run's lines line up with the uninterrupted run's): lets a user (and the tests) see what the student
        # wrote and was scored on, and from which weights.
        if self.samples_log is None:
            return
        record = {
            "micro_batch": index,
            "step": step,
            "on_policy": on_policy,
            "prompt_tokens": chat_prompt_lengths(batch["targets"][:1])[0] if on_policy else 0,
            "valid_targets": int((batch["targets"] != IGNORE_INDEX).sum()),
            "input_ids": batch["input_ids"][0].tolist(),
        }
        if on_policy:
            record |= {"weights_step": weights, "lag": step - weights}
        with self.samples_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        with self.turn:  # a thread waiting for weights that will never come gives up
            self.closed = True
            self.turn.notify_all()
        super().close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _device_of(module) -> torch.device:
    return next(module.parameters()).device
