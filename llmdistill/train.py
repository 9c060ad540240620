"""The DeepSpeed training loop: teacher and student setup, the step, held-out evaluation, checkpoints, export.

One run directory holds everything a run makes: config.yaml (the resolved config), logs.jsonl, tb/,
checkpoints/step_XXXXXXXX/ (complete only once its COMPLETE marker exists), student/, summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal as signals
import time
from pathlib import Path

import torch

from llmdistill import data, models
from llmdistill.config import Config, LLMDistillError, deepspeed_config, save_config
from llmdistill.distributed import all_reduce_sum, barrier, init_distributed
from llmdistill.losses import Objective
from llmdistill.session import Plan, build_datasets, build_models, derivation_defaults, preflight
from llmdistill.signal import IGNORE_INDEX, StudentOutput
from llmdistill.teachers import TeacherUnavailable, build_teacher_source

log = logging.getLogger("llmdistill.train")
COMPLETE = "COMPLETE"


class DistillationModule(torch.nn.Module):
    """The student and the objective's learnable state, as one module for the DeepSpeed engine.

    The whole loss runs inside the engine's forward, so ZeRO-3 gathers the head's weight whenever a loss calls
    it.
    """

    def __init__(self, student, objective: Objective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch: dict, signal=None, evaluate: bool = False):
        decoder = self.student.get_decoder()
        out = decoder(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            output_hidden_states="student_hidden" in self.objective.needs and not evaluate,
            use_cache=False,
        )
        student = StudentOutput(
            out.last_hidden_state, self.student.get_output_embeddings(), out.hidden_states
        )
        if evaluate:
            return held_out_nll(student, batch)
        return self.objective(student, signal, batch)


def held_out_nll(student: StudentOutput, batch: dict) -> torch.Tensor:
    """Summed next-token NLL and token count, for loss / perplexity / bits-per-byte."""
    targets = batch["targets"].reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, index.numel(), 4096):
        c = index[start : start + 4096]
        logits = student.head(hidden[c]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[c], reduction="sum").double()
    return torch.stack([total, torch.tensor(float(index.numel()), dtype=torch.float64, device=total.device)])


# ---------------------------------------------------------------------------------------------- checkpoints


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose COMPLETE marker exists, oldest first; half-written ones are never listed."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _failpoint(name: str, step: int) -> None:
    # Fault injection for the crash-safety test: LLMDISTILL_FAILPOINT=<name>@<step> kills this process there.
    if os.environ.get("LLMDISTILL_FAILPOINT") == f"{name}@{step}":
        os.kill(os.getpid(), signals.SIGKILL)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, consumed: int, rank: int, keep: int) -> Path:
    tag = f"step_{step:08d}"
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a half-written leftover of a crashed run at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    barrier()
    _failpoint("checkpoint_before_complete", step)
    if rank == 0:
        marker = path / (COMPLETE + ".tmp")
        marker.write_text(json.dumps({"step": step, "consumed_micro_batches": consumed, "time": time.time()}))
        marker.replace(path / COMPLETE)  # atomic: a checkpoint is complete or it is not
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    barrier()
    _failpoint("checkpoint_complete", step)
    return path


def load_checkpoint(engine, path: Path, rank: int) -> tuple[int, int]:
    meta = json.loads((path / COMPLETE).read_text())
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise LLMDistillError(f"could not load checkpoint {path}")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta["step"], meta["consumed_micro_batches"]


def find_resume_point(cfg: Config, root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(cfg.train.resume)
    if not (path / COMPLETE).is_file():
        raise LLMDistillError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def lr_schedule(optimizer, cfg: Config):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.train.warmup_steps, cfg.train.max_steps, min_lr_rate=cfg.train.min_lr_ratio
    )


class RunLog:
    """logs.jsonl and TensorBoard on rank 0; every other rank writes nothing."""

    def __init__(self, run_dir: Path, rank: int):
        self.rank = rank
        self.file = self.tb = None
        if rank == 0:
            self.file = (run_dir / "logs.jsonl").open("a")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for k, v in record.items():
            if isinstance(v, int | float) and k != "time":
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            self.tb.close()


# ---------------------------------------------------------------------------------------------- the loop


def evaluate(model_fn, batches, tokenizer, device: str) -> dict:
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


def _teacher_eval_fn(teacher):
    @torch.no_grad()
    def run(batch):
        logits = teacher(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        targets = batch["targets"].reshape(-1)
        keep = targets != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1])[keep].float(), targets[keep], reduction="sum"
        )
        return torch.stack([nll.double(), keep.sum().double()])

    return run


def held_out_batches(dataset, cfg: Config, rank: int, world: int) -> list[dict]:
    """The first `eval_batches` global batches of the validation set, in order: the same tokens at every
    eval."""
    mb = cfg.train.micro_batch_size
    out = []
    for i in range(cfg.train.eval_batches):
        first = (i * world + rank) * mb
        if first + mb > len(dataset):
            break
        out.append(data.collate([dataset[j] for j in range(first, first + mb)]))
    return out


def train(cfg: Config) -> dict:
    import deepspeed

    # Preemption signals are honoured from the start: one that arrives while models load stops after step one.
    stop = _StopRequest()
    plan = preflight(cfg)
    rank, world, device = init_distributed(cfg.train.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    run_dir = cfg.run.dir
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    ds_config = deepspeed_config(cfg, world)
    teacher, student, hf_ds_config = build_models(cfg, plan, ds_config)
    student_tok = plan.student_tok
    objective = Objective(
        cfg.loss, student.config, plan.teacher_config, cfg.balance, derivation_defaults(plan.student_path)
    )

    # Rank 0 tokenizes first so the others read `datasets`' cache instead of repeating the work.
    if rank != 0:
        barrier()
    train_set, val_set = build_datasets(cfg, plan)
    if rank == 0:
        barrier()

    masks = None
    if plan.student_path is not None:
        from llmdistill.derive import MASK_FILE, mask_gradients

        if (Path(plan.student_path) / MASK_FILE).exists():
            # MAGNET in-block masks from derivation: masked weights get no gradient, so they stay zero.
            masks = Path(plan.student_path) / MASK_FILE
            if (
                cfg.student.peft is None
            ):  # with PEFT the masked base weights are frozen; export re-masks the merge
                mask_gradients(student, masks)
            log.info(f"keeping derivation masks from {masks} during training")
    module = DistillationModule(student, objective)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg), config=ds_config
    )
    if teacher is not None:
        teacher = _teacher_engine(teacher, cfg, ds_config, device)
    teacher_source = build_teacher_source(cfg, teacher, objective.needs, student=engine.module.student)

    step, consumed = 0, 0
    resume = find_resume_point(cfg, ckpt_root)
    if resume is not None:
        step, consumed = load_checkpoint(engine, resume, rank)
        log.info(f"resumed from {resume} (step {step})")

    runlog = RunLog(run_dir, rank)
    n_student = models.count_parameters(student)
    summary = {
        "run_dir": str(run_dir),
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        "student_parameters": n_student,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }
    if cfg.deepspeed.zero_stage == 3:
        # Under ZeRO-3 each rank holds only its shard; record how much, so partitioning can be checked.
        local = sum(p.ds_tensor.numel() for p in student.parameters() if hasattr(p, "ds_tensor"))
        summary["zero3_local_fraction"] = local / n_student
    held_out = held_out_batches(val_set, cfg, rank, world) if val_set is not None else []
    if teacher is not None:
        summary["teacher_parameters"] = models.count_parameters(
            teacher.module if hasattr(teacher, "module") else teacher
        )
        # Cross-tokenizer batches: the teacher reads other token ids than the student's targets, so its
        # per-token figures here would be meaningless; it is only evaluated on a shared tokenizer.
        if held_out and "teacher_input_ids" not in held_out[0]:
            summary["teacher_eval"] = evaluate(_teacher_eval_fn(teacher), held_out, student_tok, device)
    student_eval_fn = _student_eval_fn(engine)
    if held_out and step == 0:
        first = evaluate(student_eval_fn, held_out, student_tok, device)
        summary["student_eval_start"] = first
        runlog.write(0, {f"eval/{k}": v for k, v in first.items()})

    batches = iter(
        data.micro_batches(
            train_set,
            cfg.train.micro_batch_size,
            world,
            rank,
            cfg.run.seed,
            start=consumed,
            workers=cfg.data.num_workers,
        )
    )
    pairs = teacher_source.stream(batches, device)
    lm_eval_reference = None
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum * world
    progress = _progress_bar(cfg, rank, step)
    t_start, tokens_seen = time.time(), 0
    engine.train()
    while step < cfg.train.max_steps:
        t0 = time.time()
        step_metrics: dict[str, float] = {}
        consumed_at_step = consumed
        for _ in range(cfg.train.grad_accum):
            batch, signal = _next_pair(pairs, teacher_source)
            if batch is None:  # the teacher failed on some rank: keep the last whole step and stop
                if not (ckpt_root / f"step_{step:08d}" / COMPLETE).exists():
                    save_checkpoint(
                        engine, ckpt_root, step, consumed_at_step, rank, cfg.train.keep_checkpoints
                    )
                raise TeacherUnavailable(
                    f"{signal or 'the teacher failed on another rank'}; checkpoint saved at step {step}, "
                    "resume with the same command once the teacher is back"
                )
            batch["step"], batch["batch_index"] = step, consumed
            loss, metrics = engine(batch, signal)
            engine.backward(loss)
            engine.step()
            consumed += 1
            for k, v in {"loss": loss.item(), **metrics}.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / cfg.train.grad_accum
        step += 1
        tokens_seen += tokens_per_step
        keys = sorted(step_metrics)
        reduced = all_reduce_sum([step_metrics[k] for k in keys])
        record = {k: v / world for k, v in zip(keys, reduced, strict=True)}
        record |= {
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_step / (time.time() - t0),
            "consumed_micro_batches": consumed,
            "time": time.time(),
        }
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            runlog.write(step, record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}"
            )
        if (
            cfg.eval is not None
            and cfg.eval.every
            and step % cfg.eval.every == 0
            and step < cfg.train.max_steps
        ):
            lm_eval_reference = lm_eval_student(cfg, student, plan, rank, step, runlog, lm_eval_reference)
        if (
            held_out
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.max_steps
        ):
            runlog.write(
                step,
                {f"eval/{k}": v for k, v in evaluate(student_eval_fn, held_out, student_tok, device).items()},
            )
            engine.train()
        stopping = stop()
        if (
            (cfg.train.save_every and step % cfg.train.save_every == 0)
            or step == cfg.train.max_steps
            or stopping
        ):
            save_checkpoint(engine, ckpt_root, step, consumed, rank, cfg.train.keep_checkpoints)
        if stopping and step < cfg.train.max_steps:
            log.warning(
                f"stopping at step {step} on {stop.signal_name}; "
                "checkpoint saved, resume with the same command"
            )
            summary["stopped_early"] = step
            break
    if progress is not None:
        progress.close()
    elapsed = time.time() - t_start
    summary |= {"steps": step, "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "train_seconds": elapsed}
    if held_out:
        summary["student_eval"] = evaluate(student_eval_fn, held_out, student_tok, device)
        runlog.write(step, {f"eval/{k}": v for k, v in summary["student_eval"].items()})
    if cfg.train.export and "stopped_early" not in summary:
        summary["student_dir"] = str(
            export(engine, cfg, student, student_tok, run_dir, rank, held_out, device, summary, masks)
        )
    teacher_source.close()
    if cfg.eval is not None and cfg.eval.at_end and "student_dir" in summary:
        if rank == 0:
            from llmdistill.evaluate import run_eval, tensorboard_scalars

            report = run_eval(cfg)
            summary["lm_eval"] = report["output_dir"]
            runlog.write(step, tensorboard_scalars(report, prefix="lm_eval"))
        barrier()
    runlog.close()
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    del hf_ds_config
    return summary


def lm_eval_student(cfg: Config, student, plan: Plan, rank: int, step: int, runlog: RunLog, reference):
    """Score the training student on a subset of the lm-eval tasks (rank 0) and log it; returns the teacher's
    reference scores, computed once. Under ZeRO-3 every rank gathers the weights; rank 0 evaluates
    meanwhile."""
    import deepspeed

    from llmdistill.evaluate import evaluate_models, tensorboard_scalars

    e = cfg.eval
    params = [p for p in student.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank == 0:
            subset = dict(
                limit=e.every_limit, max_length=e.max_length, batch_size=e.batch_size, device=e.device
            )
            if reference is None and e.teacher and plan.teacher_path is not None:
                teacher = plan.teacher_path if e.teacher is True else e.teacher
                reference = evaluate_models({"teacher": teacher}, e.tasks, **subset)
            report = evaluate_models(
                {"student": student}, e.tasks, tokenizer=plan.student_tok, reference=reference, **subset
            )
            runlog.write(step, tensorboard_scalars(report, prefix="lm_eval"))
    barrier()
    return reference


def _next_pair(pairs, source) -> tuple[dict | None, object]:
    """The next (batch, signal); (None, reason) when the teacher failed here or on another rank."""
    failure = ""
    try:
        batch, signal = next(pairs)
    except TeacherUnavailable as err:
        batch, signal, failure = None, None, str(err)
    # Ranks must agree before the forward, or one would wait in a collective the others never enter.
    if source.can_fail and all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
        return None, failure
    return batch, signal


def _teacher_engine(teacher, cfg: Config, ds_config: dict, device: str):
    """Under ZeRO-3 the teacher is a partitioned inference-only engine; otherwise a replicated module."""
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=teacher, config=inference)
        engine.eval()
        return engine
    return teacher.to(device)


def _student_eval_fn(engine):
    @torch.no_grad()
    def run(batch):
        engine.eval()
        return engine(batch, evaluate=True)

    return run


class _StopRequest:
    """SIGTERM / SIGUSR1 (preemption) ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.signal_name = None
        for sig in (signals.SIGTERM, signals.SIGUSR1):
            signals.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signals.Signals(signum).name

    def __call__(self) -> bool:
        # Every rank must agree, or one would wait in a collective the others never enter.
        return all_reduce_sum([1.0 if self.signal_name else 0.0])[0] > 0


def _progress_bar(cfg: Config, rank: int, step: int):
    if rank != 0 or not cfg.train.progress:
        return None
    import sys

    from tqdm import tqdm

    # Redraw often on a terminal, rarely into a log file.
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(
        total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=interval
    )


def gather_state_dict(engine, module, rank: int) -> dict | None:
    """The full state dict of `module` on rank 0, gathered one parameter at a time under ZeRO-3."""
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            if rank == 0:
                state[name] = param.detach().to("cpu", torch.float32).clone()
    return state if rank == 0 else None


def export(
    engine, cfg: Config, student, tokenizer, run_dir: Path, rank: int, held_out, device, summary, masks=None
) -> Path:
    """Write the student as a plain HF checkpoint, and verify it reproduces the engine's logits."""
    out_dir = run_dir / "student"
    state = gather_state_dict(engine, student, rank)
    probe = held_out[0] if held_out else None
    probe_logits = None
    if probe is not None:
        engine.eval()
        with torch.no_grad():
            decoder_batch = data.to_device(probe, device)
            probe_logits = _engine_logits(engine, decoder_batch)
    if rank == 0:
        card = {
            "teacher": cfg.teacher.path,
            "loss": [t.model_dump() for t in cfg.loss],
            "steps": summary["steps"],
            "student_eval": summary.get("student_eval"),
            "teacher_eval": summary.get("teacher_eval"),
        }
        config = student.get_base_model().config if cfg.student.peft is not None else student.config
        models.save_student(
            state, config, tokenizer, out_dir, cfg.student.dtype, cfg.student.peft, card, masks
        )
        if probe is not None:
            from safetensors.torch import save_file

            save_file(
                {
                    "input_ids": probe["input_ids"],
                    "position_ids": probe["position_ids"],
                    "logits": probe_logits.float().cpu().contiguous(),
                },
                str(run_dir / "export_probe.safetensors"),
            )
            summary["export_max_abs_diff"] = _check_export(out_dir, probe, probe_logits)
    barrier()
    return out_dir


def _engine_logits(engine, batch) -> torch.Tensor:
    module = engine.module
    return module.student(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits


def _check_export(out_dir: Path, probe: dict, expected: torch.Tensor) -> float:
    exported = models.load_model(str(out_dir), "float32")
    with torch.no_grad():
        got = exported(
            input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False
        ).logits
    diff = (got - expected.float().cpu()).abs().max().item()
    log.info(f"exported student reproduces the engine's logits: max |diff| = {diff:.2e}")
    return diff
