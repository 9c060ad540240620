"""The DeepSpeed training loop: a `Trainer` holds one run's state (engine, teacher source, data position,
log), and `train(cfg)` runs it from setup to export.

One run directory holds everything a run makes: config.yaml (the resolved config), logs.jsonl, tb/,
checkpoints/step_XXXXXXXX/ (complete only once its COMPLETE marker exists), student/, summary.json.
Checkpoints live in llmdistill.checkpoint, the export and its check in llmdistill.export, the log in
llmdistill.runlog.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal as signals
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from llmdistill import data, models
from llmdistill.card import write_model_card
from llmdistill.checkpoint import (
    check_run_config,
    checkpoint_dir,
    find_resume_point,
    is_complete,
    load_checkpoint,
    read_marker,
    save_checkpoint,
    set_aside_checkpoints,
    write_config,
)
from llmdistill.config import Config, LLMDistillError, deepspeed_config
from llmdistill.derive.masks import MASK_FILE, mask_gradients
from llmdistill.distributed import all_reduce_sum, barrier, first_reason, init_distributed
from llmdistill.evaluate import (
    eval_settings,
    evaluate_models,
    run_eval,
    set_up_training_eval,
    tensorboard_scalars,
)
from llmdistill.export import export
from llmdistill.hub import check_can_push, push_student
from llmdistill.losses import Objective
from llmdistill.losses.divergences import summed_nll
from llmdistill.runlog import RunLog, truncate_log
from llmdistill.session import build_datasets, build_models, check_kernels, loss_defaults, preflight
from llmdistill.signal import StudentOutput, forward_to_head
from llmdistill.teachers import TeacherUnavailable, build_teacher_source, check_teacher_ready
from llmdistill.trackers import run_params

log = logging.getLogger("llmdistill.train")


class TrainingStopped(LLMDistillError):
    """The run cannot go on (every step is being skipped); its checkpoints are kept."""


class DistillationModule(torch.nn.Module):
    """The student and the objective's learnable state, as one module for the DeepSpeed engine.

    The whole loss runs inside the engine's forward, so ZeRO-3 gathers the head's weight whenever a loss
    calls it. Training returns (loss, metrics as device tensors, explain: why the loss is not finite).
    """

    def __init__(self, student, objective: Objective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch: dict, signal=None, evaluate: bool = False):
        hidden_states = "student_hidden" in self.objective.needs and not evaluate
        student = forward_to_head(self.student, batch, hidden_states)
        if evaluate:
            return _nll_and_count(student, batch)
        total, metrics = self.objective(student, signal, batch, check=False)

        def explain() -> str:
            # Called only for a micro-batch found non-finite; a plain function, which ZeRO-3's hooks on the
            # module's outputs pass over.
            return self.objective.explain(total, metrics, student, signal, batch)

        return total, metrics, explain


def _nll_and_count(output: StudentOutput, batch: dict) -> torch.Tensor:
    """[summed NLL, target tokens] in float64, for loss / perplexity / bits-per-byte."""
    nll, count = summed_nll(output, batch)
    return torch.stack([nll.double(), torch.tensor(float(count), dtype=torch.float64, device=nll.device)])


def _stacked(values: list, device: str) -> torch.Tensor:
    """Float64 [len(values)] on `device` from tensors and Python numbers, without a wait for the device
    (torch.full passes a number as a kernel argument, where torch.tensor would copy it)."""
    return torch.stack(
        [
            v.to(device=device, dtype=torch.float64)
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), dtype=torch.float64, device=device)
            for v in values
        ]
    )


def held_out_metrics(model_fn, batches, tokenizer, device: str) -> dict:
    """Held-out loss, perplexity and bits-per-byte, summed over ranks."""
    nll = tokens = nbytes = 0.0
    for batch in batches:
        out = model_fn(data.to_device(batch, device))
        nll += out[0].item()
        tokens += out[1].item()
        nbytes += data.bytes_of_targets(tokenizer, batch["targets"])
    nll, tokens, nbytes = all_reduce_sum([nll, tokens, nbytes])
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "bpb": nll / math.log(2) / max(nbytes, 1),
        "tokens": int(tokens),
    }


def held_out_batches(dataset, cfg: Config, rank: int, world: int) -> list[dict]:
    """The first `eval_batches` global batches of the validation set, in order: the same tokens each eval."""
    mb = cfg.train.micro_batch_size
    out = []
    for i in range(cfg.train.eval_batches):
        first = (i * world + rank) * mb
        if first + mb > len(dataset):
            break
        out.append(data.collate([dataset[j] for j in range(first, first + mb)]))
    return out


def adamw(params, cfg: Config, device: str) -> torch.optim.AdamW:
    """torch's AdamW, one fused kernel per step on CUDA and multi-tensor (foreach) ops on CPU; DeepSpeed steps
    it on its own flat fp32 partitions (which live on the GPU unless the optimizer is offloaded)."""
    t = cfg.train
    on_gpu = device.startswith("cuda") and not cfg.deepspeed.offload_optimizer
    return torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=t.betas,
        weight_decay=t.weight_decay,
        fused=True if on_gpu else None,
        foreach=None if on_gpu else True,
    )


def apply_speed_options(student, teacher, cfg: Config) -> None:
    """train.liger, train.gradient_checkpointing and train.compile on the student (liger on the teacher
    too)."""
    t = cfg.train
    if t.liger:
        models.apply_liger(student)
        if teacher is not None:
            models.apply_liger(teacher)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes each decoder layer in the backward through the module's
        # hooks, so ZeRO-3 gathers the layer's weights again there.
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        # Layer by layer: the mask built from packed position_ids stays eager (it has data-dependent
        # branches), the layers (all the compute) compile once and share one graph.
        for layer in student.get_decoder().layers:
            layer.compile()


def lr_schedule(optimizer, cfg: Config):
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.train.warmup_steps, cfg.train.max_steps, min_lr_rate=cfg.train.min_lr_ratio
    )


class Trainer:
    """One training run. Building it does the setup (preflight, process group, models, data, engine, teacher
    source); then `resume()`, `train_step()`, `evaluate()`, `save()`, `export()`, `close()`, which `run()`
    strings together as `train(cfg)` does.

    State: `step` (optimizer steps done), `consumed` (micro-batches this rank has drawn from the training
    set), `summary` (what summary.json will hold), `engine`, `teacher_source`, `runlog`.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Preemption signals are honoured from the start: one that arrives while the models load stops the
        # run after its first step.
        self.stop = StopRequest()
        self.runlog, self._source_open = None, False
        with self._closed_on_failure():
            self._set_up(cfg)

    def _set_up(self, cfg: Config) -> None:
        self.phases = {"config": since_process_start()}  # where a run's time goes outside its steps
        rank = int(os.environ.get("RANK", "0"))
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
        # Everything that needs no weights comes first, so that bad input costs seconds and writes nothing:
        # the config, its files and data sources, the run directory, the checkpoint to resume from, the data.
        self.plan = preflight(cfg)
        check_teacher_ready(cfg, self.plan)
        check_kernels(cfg, self.plan)
        # lm-eval's tasks and teacher, found now: an eval section that cannot run fails here, not after hours.
        self.lm_eval_tasks = self.lm_eval_teacher = None
        if cfg.eval is not None and (cfg.eval.every or cfg.eval.at_end):
            self.lm_eval_tasks, self.lm_eval_teacher = set_up_training_eval(cfg)
        if cfg.train.push_to_hub is not None:  # hours of training should not end in "no token"
            check_can_push(cfg.train.push_to_hub.repo_id)
        self.mark("preflight")
        self.run_dir = cfg.run.dir
        self.ckpt_root = self.run_dir / "checkpoints"
        check_run_config(cfg, self.run_dir)
        shape = models.model_shape(self.plan.student_config)
        self.resume_point = find_resume_point(cfg, self.ckpt_root, shape)
        self.rank, self.world, self.device = init_distributed(cfg.train.device)
        self.mark("process_group")
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.train_set, self.val_set = self._build_datasets()
        self.mark("data")
        self.held_out = (
            held_out_batches(self.val_set, cfg, self.rank, self.world) if self.val_set is not None else []
        )
        if self.val_set is not None and not self.held_out:
            raise LLMDistillError(
                f"data.validation: {len(self.val_set)} sequences, fewer than one batch of "
                f"train.micro_batch_size={cfg.train.micro_batch_size} on each of {self.world} ranks"
            )
        if not isinstance(self.train_set, data.PackedStream):  # a stream's length is found as it is read
            data.micro_batches_per_epoch(len(self.train_set), cfg.train.micro_batch_size, self.world)
        self.mark("held_out")
        # The log keeps what was written up to the step the run continues from (none when it starts over).
        start = read_marker(self.resume_point)["step"] if self.resume_point is not None else -1
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(self.run_dir / "logs.jsonl", start)
            if cfg.train.resume == "never" and (aside := set_aside_checkpoints(self.ckpt_root)) is not None:
                log.warning(f"train.resume=never: the earlier run's checkpoints moved to {aside}")
        # The trackers start before any weights load, so one that cannot start fails in seconds.
        self.runlog = RunLog(
            self.run_dir,
            self.rank,
            cfg.train.report_to,
            run_params(cfg.model_dump(mode="json"), self.plan.student_path),
            cfg.run.name,
            resuming=self.resume_point is not None,
            purge_step=start + 1,
        )
        if self.rank == 0:
            write_config(cfg, self.run_dir)
        self._build_engine()
        self.step = self.consumed = 0
        # Steps and micro-batches skipped (non-finite loss, fp16 overflow) since the last applied step.
        self.skipped_in_a_row = 0
        # Training time and tokens over every segment of the run (a resume restores them from its checkpoint).
        self.train_seconds, self.tokens_trained, self._clock = 0.0, 0, None
        self._pairs = None  # the (batch, signal) stream, opened at the first step from `consumed`
        self.summary = self._start_summary()

    def _build_datasets(self):
        """Training and validation sets; rank 0 tokenizes first so the others read `datasets`' cache instead
        of repeating the work."""
        if self.rank != 0:
            barrier()
        try:
            return build_datasets(self.cfg, self.plan)
        finally:
            if self.rank == 0:
                barrier()  # also when it failed: the others then fail the same way instead of waiting

    def _build_engine(self) -> None:
        import deepspeed  # lazy: importing deepspeed is slow, so `import llmdistill.train` stays cheap

        cfg, plan = self.cfg, self.plan
        ds_config = deepspeed_config(cfg, self.world)
        teacher, student, self._hf_ds_config = build_models(cfg, plan, ds_config)
        self.mark("models")
        objective = Objective(
            cfg.loss, student.config, plan.teacher_config, cfg.balance, loss_defaults(cfg, plan)
        )
        self.masks = self._keep_masks(student)
        apply_speed_options(student, teacher, cfg)
        module = DistillationModule(student, objective)
        self.params = [p for p in module.parameters() if p.requires_grad]
        optimizer = adamw(self.params, cfg, self.device)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg), config=ds_config
        )
        self.mark("engine")
        self.student = student
        self.teacher = _teacher_engine(teacher, cfg, ds_config, self.device) if teacher is not None else None
        self.teacher_source = build_teacher_source(
            cfg, self.teacher, objective.needs, student=student, cross_tokenizer=objective.cross_tokenizer
        )
        self._source_open = True
        self.mark("teacher")

    def mark(self, phase: str) -> None:
        """Record when `phase` ended, in seconds since the process started (the first time only)."""
        self.phases.setdefault(phase, since_process_start())

    def _keep_masks(self, student) -> Path | None:
        """MAGNET in-block masks from derivation: masked weights get no gradient, so they stay zero."""
        if self.plan.student_path is None or not (Path(self.plan.student_path) / MASK_FILE).exists():
            return None
        masks = Path(self.plan.student_path) / MASK_FILE
        # With PEFT the masked base weights are frozen anyway; export re-masks the merged weights.
        if self.cfg.student.peft is None:
            mask_gradients(student, masks)
        log.info(f"keeping derivation masks from {masks} during training")
        return masks

    def _start_summary(self) -> dict:
        n_student = models.count_parameters(self.student)
        summary = {
            "run_dir": str(self.run_dir),
            "world_size": self.world,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "student_parameters": n_student,
            "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.params),
        }
        if self.cfg.deepspeed.zero_stage == 3:
            # Under ZeRO-3 each rank holds only its shard; record how much, so partitioning can be checked.
            local = sum(p.ds_tensor.numel() for p in self.student.parameters() if hasattr(p, "ds_tensor"))
            summary["zero3_local_fraction"] = local / n_student
        if self.teacher is not None:
            teacher = self.teacher.module if hasattr(self.teacher, "module") else self.teacher
            summary["teacher_parameters"] = models.count_parameters(teacher)
        return summary

    # ------------------------------------------------------------------------------------------ the pieces

    def resume(self) -> Path | None:
        """Continue from the checkpoint found at setup: the one `train.resume` names (under `auto` the newest
        intact one)."""
        path = self.resume_point
        if path is not None:
            meta = load_checkpoint(self.engine, path, self.rank)
            self.step, self.consumed = meta["step"], meta["consumed_micro_batches"]
            self.teacher_source.load_state(path, meta.get("teacher_source"))
            self.train_seconds, self.tokens_trained = meta.get("train_seconds", 0.0), meta.get("tokens", 0)
            self._pairs = None
            log.info(f"resumed from {path} (step {self.step})")
        return path

    def evaluate(self) -> dict:
        """The student's held-out loss, perplexity and bits-per-byte (every rank takes part)."""

        @torch.no_grad()
        def run(batch):
            self.engine.eval()
            return self.engine(batch, evaluate=True)

        metrics = held_out_metrics(run, self.held_out, self.plan.student_tok, self.device)
        self.engine.train()
        return metrics

    def evaluate_teacher(self) -> dict:
        """The in-process teacher's held-out figures, on the student's batches."""

        @torch.no_grad()
        def run(batch):
            logits = self.teacher(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            # The teacher's forward (an engine's under ZeRO-3) yields full logits; an identity head lets the
            # one NLL function read them.
            return _nll_and_count(StudentOutput(logits, torch.nn.Identity()), batch)

        return held_out_metrics(run, self.held_out, self.plan.student_tok, self.device)

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its record, averaged over ranks.

        A micro-batch whose loss is not finite on some rank is dropped on every rank before its backward
        (the next one takes its place); a step DeepSpeed skips (fp16 overflow) counts the same. After
        `train.max_skipped_steps` of them in a row the run stops with TrainingStopped, keeping its
        checkpoints.
        """
        cfg = self.cfg
        if self._pairs is None:
            self._pairs = self._open_stream()
        t0 = time.time()
        # Device tensors (and the floats some terms report) until the step's one reduction.
        metrics: dict[str, torch.Tensor | float] = {}
        consumed_at_step = self.consumed
        used = dropped = 0
        while used < cfg.train.grad_accum:
            batch, signal = self._next_pair()
            if batch is None:  # the teacher failed on some rank: keep the last whole step and stop
                if not is_complete(checkpoint_dir(self.ckpt_root, self.step)):
                    self.save(consumed_at_step)
                reason = signal or "the teacher failed on another rank"
                raise TeacherUnavailable(
                    f"{reason}; checkpoint saved at step {self.step}, "
                    "resume with the same command once the server is back",
                    every_rank=True,
                )
            batch["step"], batch["batch_index"] = self.step, self.consumed
            loss, extra, problem = self._forward(batch, signal)
            self.consumed += 1
            if problem is not None:
                dropped += 1
                self._skipped(f"micro-batch {self.consumed - 1} dropped: {problem}")
                continue
            self.engine.backward(loss)
            self.engine.step()
            used += 1
            for k, v in {"loss": loss.detach(), **extra}.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else v
                metrics[k] = metrics.get(k, 0.0) + v / cfg.train.grad_accum
        if self.engine.was_step_applied():
            self.skipped_in_a_row = 0
        else:
            self._skipped("DeepSpeed skipped the optimizer step (gradient overflow)")
        self.step += 1
        self.teacher_source.after_optimizer_step(self.step)  # on-policy: push the new weights to the sampler
        self.tokens_trained += self.tokens_per_step
        self.mark("first_step")
        keys = sorted(metrics)
        reduced = all_reduce_sum(_stacked([metrics[k] for k in keys], self.device)) if keys else []
        record = {k: v / self.world for k, v in zip(keys, reduced, strict=True)}
        if dropped:
            record["dropped_micro_batches"] = dropped
        return record | {
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": self.tokens_per_step / (time.time() - t0),
            "consumed_micro_batches": self.consumed,
            "time": time.time(),
        }

    def _forward(self, batch, signal):
        """(loss, metrics, None), or (None, None, why) when the loss is not finite here or on another rank:
        every rank must agree before the backward, whose collectives all of them enter. That agreement (one
        flag summed over the ranks) is the micro-batch's one wait for the device; the objective explains the
        problem (which term, which input) only once the flag is set."""
        loss, extra, explain = self.engine(batch, signal)
        # The objective's total is non-finite whenever one of its terms is.
        not_finite = (~torch.isfinite(loss.detach())).reshape(1)
        if all_reduce_sum(not_finite)[0] > 0:
            # Every rank explains the drop by the term and input that caused it, wherever that was.
            return None, None, first_reason(explain() if bool(not_finite) else "")
        return loss, extra, None

    def _skipped(self, why: str) -> None:
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        log.warning(f"step {self.step + 1}: {why} ({self.skipped_in_a_row} skipped in a row, limit {limit})")
        if self.skipped_in_a_row >= limit:
            kept = f"checkpoints in {self.ckpt_root} kept" if self.ckpt_root.is_dir() else "no checkpoint"
            raise TrainingStopped(
                f"stopped at step {self.step}: {limit} steps or micro-batches in a row skipped, the last: "
                f"{why}; {kept} (train.max_skipped_steps; check train.lr, the loss weights, train.dtype)",
                every_rank=True,  # a drop and a skipped step are decided by every rank together
            )

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * self.cfg.data.seq_len * t.grad_accum * self.world

    def _open_stream(self):
        batches = data.micro_batches(
            self.train_set,
            self.cfg.train.micro_batch_size,
            self.world,
            self.rank,
            self.cfg.run.seed,
            start=self.consumed,
            workers=self.cfg.data.num_workers,
        )
        return self.teacher_source.stream(iter(batches), self.device, start=self.consumed)

    def _next_pair(self) -> tuple[dict | None, object]:
        """The next (batch, signal); (None, reason) when the teacher failed here or on another rank."""
        failure = ""
        try:
            batch, signal = next(self._pairs)
        except TeacherUnavailable as err:
            batch, signal, failure = None, None, str(err)
        # Ranks must agree before the forward, or one would wait in a collective the others never enter.
        if self.teacher_source.can_fail and all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
            self.teacher_source.discard_pending()  # this rank's batch, if it got one, is not trained
            # Every rank's last line names what failed: the launcher may stop the rank that saw it first.
            return None, first_reason(failure)
        return batch, signal

    def save(self, consumed: int | None = None) -> Path:
        """A complete checkpoint of this step (every rank takes part)."""
        consumed = self.consumed if consumed is None else consumed
        self._tick()
        meta = {
            "train_seconds": self.train_seconds,
            "tokens": self.tokens_trained,
            "model_shape": models.model_shape(self.plan.student_config),
        }
        return save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.step,
            consumed,
            self.rank,
            self.cfg.train.keep_checkpoints,
            meta,
            save_state=lambda path: self.teacher_source.save_state(path, self.step),
        )

    def _tick(self) -> None:
        """Add the wall-clock time since the last tick to the run's training time (while the loop runs)."""
        if self._clock is not None:
            now = time.time()
            self.train_seconds += now - self._clock
            self._clock = now

    def export(self) -> Path:
        """Write and check run_dir/student; the check's figures go into the summary."""
        card = {
            "teacher": self.cfg.teacher.path,
            "loss": [t.model_dump() for t in self.cfg.loss],
            "steps": self.summary.get("steps", self.step),
            "student_eval": self.summary.get("student_eval"),
            "teacher_eval": self.summary.get("teacher_eval"),
        }
        probe = self.held_out[0] if self.held_out else None
        out_dir, figures = export(
            self.engine,
            self.cfg,
            self.plan.student_tok,
            self.run_dir,
            self.rank,
            probe,
            self.device,
            card,
            self.masks,
        )
        self.summary |= figures
        self.summary["student_dir"] = str(out_dir)
        return out_dir

    def lm_eval(self, reference):
        """Score the training student on a subset of the lm-eval tasks (rank 0) and log it; returns the
        teacher's reference scores, computed once. Under ZeRO-3 every rank gathers the weights; rank 0
        evaluates meanwhile."""
        import deepspeed  # lazy: importing deepspeed is slow, and it is loaded by now anyway

        e = self.cfg.eval
        params = [p for p in self.student.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if self.rank == 0:
                # The end-of-run eval's settings on a subset; the student is scored in memory, as it trains.
                subset = dict(eval_settings(self.cfg), limit=e.every_limit, manager=self.lm_eval_tasks)
                if reference is None and self.lm_eval_teacher is not None:
                    reference = evaluate_models({"teacher": self.lm_eval_teacher}, e.tasks, **subset)
                report = evaluate_models(
                    {"student": self.student},
                    e.tasks,
                    tokenizer=self.plan.student_tok,
                    reference=reference,
                    **subset,
                )
                self.runlog.write(self.step, tensorboard_scalars(report, prefix="lm_eval"))
        barrier()
        return reference

    def close_teacher(self) -> None:
        if self._source_open:
            self.teacher_source.close()
            self._source_open = False

    def close(self, failed: bool = False) -> None:
        """Release the log and the teacher source, and give the preemption signals back; the trackers'
        runs end as failed when `failed`. Closing again, or a trainer only partly built, is fine."""
        if self.runlog is not None:
            self.runlog.close(failed)
        self.close_teacher()
        self.stop.restore()
        self._hf_ds_config = None

    @contextlib.contextmanager
    def _closed_on_failure(self):
        """A setup or run that raises closes the trainer first, so that the process (a notebook, a test
        session) gets its signal handlers back and the trackers mark the run failed instead of running."""
        try:
            yield
        except BaseException:
            try:
                self.close(failed=True)
            except Exception as err:  # the failure being raised is the one to report
                log.warning(f"closing after a failure also failed: {err}")
            raise

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        """Resume, evaluate, train to `max_steps` (or a preemption), evaluate, export, report; the summary."""
        cfg = self.cfg
        with self._closed_on_failure():
            self.resume()
            # Cross-tokenizer batches: the teacher reads other token ids than the student's targets, so its
            # per-token figures here would be meaningless; it is only evaluated on a shared tokenizer.
            if self.teacher is not None and self.held_out and "teacher_input_ids" not in self.held_out[0]:
                self.summary["teacher_eval"] = self.evaluate_teacher()
            if self.held_out and self.step == 0:
                self.summary["student_eval_start"] = self._log_eval()
            self.mark("eval_start")
            self._train_loop()
            self.mark("train")
            if self.held_out:
                self.summary["student_eval"] = self._log_eval()
            self.mark("eval_end")
            if cfg.train.export and "stopped_early" not in self.summary:
                self.export()
            self.mark("export")
            self.close_teacher()  # before the final lm-eval, which may need the memory a teacher holds
            if cfg.eval is not None and cfg.eval.at_end and "student_dir" in self.summary:
                if self.rank == 0:
                    report = run_eval(cfg, self.lm_eval_tasks)
                    self.summary["lm_eval"] = report["output_dir"]
                    self.runlog.write(self.step, tensorboard_scalars(report, prefix="lm_eval"))
                barrier()
            self.close()
        self.mark("end")
        self.summary["phases"] = self.phases
        log.info(f"time since start: {phase_breakdown(self.phases)}")
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            if "student_dir" in self.summary:
                # The card reads summary.json and the lm-eval report from disk, so it comes after both.
                write_model_card(self.run_dir)
                if cfg.train.push_to_hub is not None:
                    push_student(self.run_dir, cfg.train.push_to_hub.repo_id, cfg.train.push_to_hub.private)
        return self.summary

    def _log_eval(self) -> dict:
        metrics = self.evaluate()
        self.runlog.write(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def _train_loop(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        progress = _progress_bar(cfg, self.rank, self.step)
        lm_eval_reference = None
        t_start, tokens_seen = time.time(), 0
        self._clock = t_start
        self.engine.train()
        while self.step < t.max_steps:
            record = self.train_step()
            tokens_seen += self.tokens_per_step
            last = self.step == t.max_steps
            if self.step % t.log_every == 0 or last:
                self.runlog.write(self.step, record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}"
                )
            if cfg.eval is not None and cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                lm_eval_reference = self.lm_eval(lm_eval_reference)
            if self.held_out and t.eval_every and self.step % t.eval_every == 0 and not last:
                self._log_eval()
            stopping = self.stop()
            if (t.save_every and self.step % t.save_every == 0) or last or stopping:
                self.save()
            if stopping and not last:
                log.warning(
                    f"stopping at step {self.step} on {self.stop.signal_name}; "
                    "checkpoint saved, resume with the same command"
                )
                self.summary["stopped_early"] = self.step
                break
        if progress is not None:
            progress.close()
        self._tick()
        self._clock = None
        # Over every segment of the run: a resumed run's summary covers the time before the interruption too.
        self.summary |= {
            "steps": self.step,
            "tokens_per_s": self.tokens_trained / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds,
        }


def since_process_start() -> float:
    import psutil  # a dependency of deepspeed; imported here to keep `import llmdistill.train` cheap

    return time.time() - psutil.Process().create_time()


def phase_breakdown(phases: dict[str, float]) -> str:
    """'config 4.1 s, preflight 0.3 s, ...': how long each phase took (imports count towards config)."""
    parts, previous = [], 0.0
    for name, at in phases.items():
        parts.append(f"{name} {at - previous:.1f} s")
        previous = at
    return ", ".join(parts)


def train(cfg: Config) -> dict:
    """Run one training job from its config (every rank calls this); returns the summary."""
    return Trainer(cfg).run()


def _teacher_engine(teacher, cfg: Config, ds_config: dict, device: str):
    """Under ZeRO-3 the teacher is a partitioned inference-only engine; otherwise a replicated module."""
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed  # lazy: importing deepspeed is slow, and it is loaded by now anyway

        inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=teacher, config=inference)
        engine.eval()
        return engine
    return teacher.to(device)


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption) ask the loop to checkpoint and stop at the next step boundary."""

    SIGNALS = (signals.SIGTERM, signals.SIGUSR1)

    def __init__(self):
        self.signal_name = None
        self._previous = {sig: signals.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.signal_name = signals.Signals(signum).name

    def __call__(self) -> bool:
        # Every rank must agree, or one would wait in a collective the others never enter.
        return all_reduce_sum([1.0 if self.signal_name else 0.0])[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signals.signal(sig, handler)


def _progress_bar(cfg: Config, rank: int, step: int):
    if rank != 0 or not cfg.train.progress:
        return None
    # Redraw often on a terminal, rarely into a log file.
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(
        total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=interval
    )
