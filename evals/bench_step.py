"""The trainer's real training step against a plain PyTorch loop on the same models and batch, for CE and KD.

    python evals/bench_step.py            # CPU default: embedded teacher, 3-layer student, 4 x 256
    python evals/bench_step.py --shape llama-1b --device cuda --dtype bfloat16 --batch 8 --seq-len 2048
    python evals/bench_step.py --modes kd --rounds 8 --zero-stage 2
    python evals/bench_step.py --modes ce,kd,kd+ce   # kd+ce: fkl + 0.1 ce, the two terms in one head pass
    python evals/bench_step.py --modes kd --profile /tmp/prof   # each variant's top operators, one file each
    python evals/bench_step.py --set train.compile=true          # ours with a speed option, same reference

"ours" is `Trainer(cfg).train_step()`: the code path of `llmdistill train` / `launch/train.py` (preflight, the
DeepSpeed engine, the teacher source, the objective, the data loader), in one process (a world of one).
"reference" is what a plain loop does on the same student and teacher: HF forward of the student (and of the
teacher under no_grad for KD), the loss written plainly (CE: `F.cross_entropy` on the logits; KD: forward KL
on full fp32 logits; KD+CE: both on the same logits) or liger-kernel's fused linear CE / JSD(beta=0) on
hidden states (for KD+CE both, each its own pass) where it imports on CUDA, gradient clipping at
train.grad_clip, `torch.optim.AdamW` (fused on CUDA, foreach on CPU) and the LR schedule, one `.item()` per
step, on one batch already on the device. Both use the same dtype (the trainer's bf16 keeps fp32 master
weights in DeepSpeed; the reference keeps plain bf16 weights, as a plain loop does).

Timing: after `--warmup` steps of each, `--rounds` rounds alternate the two (the order flips every round) with
`--steps` steps each, so a load spike on a shared machine hits both alike. Reported: median and min step time,
tokens/s from the median, the ratio ours/reference of medians (the goal is <= 1.10) and of mins, and the
spread of the per-round ratios (their 10th-90th percentile range) as the noise.

Memory (peak = held + step):
- held: what a variant keeps between steps (weights, gradients it keeps, optimizer state), measured as the
  growth of allocated memory over building it and its warm-up steps. The reference shares the trainer's
  teacher, so the teacher's weight bytes are added to its figure.
- step: the transient peak of a step above what is held at its start.
CUDA: torch.cuda.memory_allocated / max_memory_allocated (exact, torch's allocator). CPU: the resident set
(/proc/self/status VmRSS; the step peak from VmHWM after resetting it through /proc/self/clear_refs), with
glibc's mmap threshold fixed so freed blocks leave the resident set. On CPU "held" of ours also holds the
trainer's non-tensor state (dataset index, tokenizer, DeepSpeed bookkeeping), so it is an upper bound.
Each mode runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("ce", "kd", "kd+ce")
DEFAULT_MODES = ("ce", "kd")
# The objective of each mode; kd+ce is the common recipe whose two terms share one pass of the LM head.
CE_WEIGHT = 0.1
OBJECTIVES = {
    "ce": "[{name: ce}]",
    "kd": "[{name: fkl}]",
    "kd+ce": f"[{{name: fkl}}, {{name: ce, weight: {CE_WEIGHT}}}]",
}
SHAPES = {
    # The embedded teacher (6 layers, hidden 128, vocab 2048); the student keeps half its layers.
    "tiny": None,
    # Llama-3.2-1B's shape, random init; the student keeps 8 of its 16 layers.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}
STUDENT_LAYERS = {"tiny": 3, "llama-1b": 8}


# ------------------------------------------------------------------------------------------ memory probes


class Memory:
    """Allocated bytes now, and the peak since the last `reset`, on the bench's device."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> int:
        self.sync()
        return self.torch.cuda.memory_allocated() if self.cuda else _proc_status("VmRSS")

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            # "5" resets the peak resident set size (VmHWM) to the current one (proc(5), clear_refs).
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        self.sync()
        return self.torch.cuda.max_memory_allocated() if self.cuda else _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ------------------------------------------------------------------------------------------ the two steps


def teacher_dir(shape: str, dtype: str) -> str:
    """The teacher's HF directory: the embedded one, or a random-init model of `shape` saved once (cached)."""
    if SHAPES[shape] is None:
        return "embedded"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmdistill import cache_dir
    from llmdistill.models import DTYPES, EMBEDDED_TEACHER, load_tokenizer

    out = cache_dir() / f"bench-teacher-{shape}-{dtype}"
    if not (out / "config.json").exists():
        tokenizer = load_tokenizer(str(EMBEDDED_TEACHER))
        config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=0, pad_token_id=1)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(DTYPES[dtype])
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.replace(out)
        del model
    return str(out)


def trainer_config(args, mode: str, run_dir: str):
    from llmdistill.config import load_config

    layers = STUDENT_LAYERS[args.shape]
    return load_config(
        None,
        [
            f"run.output_dir={run_dir}",
            f"run.name=bench-{mode.replace('+', '-')}",
            f"teacher.path={teacher_dir(args.shape, args.dtype)}",
            f"teacher.dtype={args.dtype}",
            f"student.from_teacher={{num_hidden_layers: {layers}}}",
            f"student.dtype={args.dtype}",
            f"student.attn_implementation={args.attn}",
            f"teacher.attn_implementation={args.attn}",
            f"data.train.path={args.data}",
            "data.validation=null",
            f"data.seq_len={args.seq_len}",
            f"loss={OBJECTIVES[mode]}",
            f"train.micro_batch_size={args.batch}",
            f"train.dtype={args.dtype}",
            f"train.device={args.device}",
            "train.max_steps=1000000",
            "train.warmup_steps=0",
            "train.export=false",
            "train.progress=false",
            f"deepspeed.zero_stage={args.zero_stage}",
            *args.set,
        ],
    )


class Reference:
    """A plain PyTorch training step on a fresh copy of the trainer's student and on its teacher."""

    def __init__(self, trainer, mode: str, batch: dict, liger: bool):
        import torch

        from llmdistill.models import DTYPES, model_from_config

        cfg = trainer.cfg
        self.torch, self.mode, self.batch = torch, mode, batch
        torch.manual_seed(cfg.run.seed)
        self.model = model_from_config(trainer.plan.student_config, cfg.train.dtype).to(trainer.device)
        self.model.to(DTYPES[cfg.train.dtype]).train()
        self.teacher = trainer.teacher  # under ZeRO 0-2 a plain module: shared, not copied
        cuda = trainer.device.startswith("cuda")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.lr,
            betas=t.betas,
            weight_decay=t.weight_decay,
            fused=True if cuda else None,
            foreach=None if cuda else True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.grad_clip = t.grad_clip
        self.loss_impl = "plain"
        if liger and cuda:
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

                self.liger_ce = LigerFusedLinearCrossEntropyLoss()
                self.liger_kd = LigerFusedLinearJSD(jsd_beta=0.0)
                self.loss_impl = "liger-kernel"
            except (ImportError, AssertionError):  # not installed, or an old version without beta=0
                pass

    def held_extra_bytes(self) -> int:
        """The shared teacher's weights, which the reference would hold too."""
        if self.mode == "ce" or self.teacher is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.teacher.parameters())

    def step(self) -> float:
        import torch.nn.functional as F

        torch, b = self.torch, self.batch
        self.optimizer.zero_grad(set_to_none=True)
        inputs = dict(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        targets = b["targets"]
        if self.loss_impl == "liger-kernel":
            hidden = self.model.model(**inputs).last_hidden_state.flatten(0, 1)
            weight = self.model.get_output_embeddings().weight
            loss = 0.0
            if self.mode != "kd":
                ce = self.liger_ce(weight, hidden, targets.flatten())
                loss = ce if self.mode == "ce" else CE_WEIGHT * ce
            if self.mode != "ce":
                with torch.no_grad():
                    teacher_hidden = self.teacher.model(**inputs).last_hidden_state.flatten(0, 1)
                teacher_weight = self.teacher.get_output_embeddings().weight
                loss = loss + self.liger_kd(hidden, weight, teacher_hidden, teacher_weight, targets.flatten())
        else:
            logits = self.model(**inputs).logits
            loss = 0.0
            if self.mode != "kd":
                ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
                loss = ce if self.mode == "ce" else CE_WEIGHT * ce
            if self.mode != "ce":
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs).logits
                valid = targets != -100
                log_q = F.log_softmax(logits[valid].float(), dim=-1)
                log_p = F.log_softmax(teacher_logits[valid].float(), dim=-1)
                loss = loss + (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


# ------------------------------------------------------------------------------------------ one mode


def measure_mode(args, mode: str) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from llmdistill.distributed import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed  # noqa: F401  (imported before the baseline so its import is not counted as held memory)

    from llmdistill import data
    from llmdistill.train import Trainer, phase_breakdown

    memory = Memory("cuda" if args.device == "cuda" else "cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = trainer_config(args, mode, run_dir)
        t0 = time.perf_counter()
        base = memory.now()
        trainer = Trainer(cfg)
        setup_seconds = time.perf_counter() - t0
        # Where the setup went (seconds per phase; "config" is the process's imports and the bench's own
        # preparation), and the warm-up steps: the first one compiles kernels (Triton, cuBLAS plans).
        setup_phases = phase_breakdown(trainer.phases)
        warmup_seconds = []
        try:
            for _ in range(args.warmup):
                memory.sync()
                t = time.perf_counter()
                trainer.train_step()
                memory.sync()
                warmup_seconds.append(time.perf_counter() - t)
            held_ours = memory.now() - base
            batch = data.to_device(
                data.collate([trainer.train_set[i] for i in range(args.batch)]), trainer.device
            )
            base = memory.now()
            reference = Reference(trainer, mode, batch, liger=not args.no_liger)
            for _ in range(args.warmup):
                reference.step()
            held_ref = memory.now() - base + reference.held_extra_bytes()
            steps = {"ours": trainer.train_step, "reference": reference.step}
            times = {"ours": [], "reference": []}
            transient = {"ours": 0, "reference": 0}
            round_ratios = []
            for r in range(args.rounds):
                order = ["ours", "reference"] if r % 2 == 0 else ["reference", "ours"]
                round_median = {}
                for name in order:
                    start_bytes = memory.now()
                    memory.reset()
                    this_round = []
                    for _ in range(args.steps):
                        memory.sync()
                        t = time.perf_counter()
                        steps[name]()
                        memory.sync()
                        this_round.append(time.perf_counter() - t)
                    transient[name] = max(transient[name], memory.peak() - start_bytes)
                    times[name] += this_round
                    round_median[name] = statistics.median(this_round)
                round_ratios.append(round_median["ours"] / round_median["reference"])
            loss_impl = reference.loss_impl
            if args.profile:
                profile_steps(args, mode, steps)
        finally:
            trainer.close()
    tokens = args.batch * args.seq_len
    out = {
        "mode": mode,
        "reference_loss": loss_impl,
        "setup_seconds": setup_seconds,
        "setup_phases": setup_phases,
        "warmup_seconds": warmup_seconds,
        "device": trainer.device,
    }
    for name in ("ours", "reference"):
        med, low = statistics.median(times[name]), min(times[name])
        held = held_ours if name == "ours" else held_ref
        out[name] = {
            "median_s": med,
            "min_s": low,
            "tokens_per_s": tokens / med,
            "held_bytes": held,
            "step_bytes": transient[name],
            "peak_bytes": held + transient[name],
        }
    out["ratio_median"] = out["ours"]["median_s"] / out["reference"]["median_s"]
    out["ratio_min"] = out["ours"]["min_s"] / out["reference"]["min_s"]
    deciles = statistics.quantiles(round_ratios, n=10) if len(round_ratios) > 1 else round_ratios * 9
    out["round_ratio_p10_p90"] = [deciles[0], deciles[-1]]
    return out


def profile_steps(args, mode: str, steps: dict) -> None:
    """torch.profiler over `--steps` steps of each variant: the operators by their own device time, one
    table per variant in `--profile`/<mode>-<variant>.txt, to see where the time between the two goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
        (out / f"{mode.replace('+', '-')}-{name}.txt").write_text(table)


# ------------------------------------------------------------------------------------------ the table


def _device_name(device: str, threads: int) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {threads} torch threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"some of {', '.join(MODES)}")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of student and teacher")
    parser.add_argument("--data", default="embedded:validation", help="data.train.path")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each variant before timing")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU: torch threads (1: a loaded machine stalls OpenMP teams)"
    )
    parser.add_argument("--no-liger", action="store_true", help="plain losses in the reference even on CUDA")
    parser.add_argument("--profile", help="a folder: each variant's operator table goes there")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the trainer's config (repeatable), e.g. a speed option; not the reference's",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.one:
        print(json.dumps(measure_mode(args, args.one)))
        return
    # glibc keeps freed heap memory resident; a fixed mmap threshold returns every block over 128 KiB on free,
    # so the resident set follows what torch holds (the same for both variants).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        # The trainer sizes its thread pool from OMP_NUM_THREADS when it is set; the reference shares it.
        env["OMP_NUM_THREADS"] = str(args.threads)
    # A child runs the mode its --one names (its --modes, passed through like the rest, is not read).
    passthrough = argv if argv is not None else sys.argv[1:]
    passthrough = [*passthrough, f"--device={args.device}", f"--dtype={args.dtype}"]
    print(
        f"shape {args.shape}, batch {args.batch} x {args.seq_len}, {args.dtype}, ZeRO-{args.zero_stage}, "
        f"attn {args.attn}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up"
        + "".join(f"; {override}" for override in args.set),
        flush=True,
    )
    rows, failed = [], []
    for mode in args.modes.split(","):
        done = subprocess.run(
            [sys.executable, __file__, *passthrough, f"--one={mode}"], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            # The other modes still run and print: one failure on a borrowed GPU should not cost them.
            print(f"bench_step: mode {mode} failed:\n{done.stderr[-4000:]}", file=sys.stderr, flush=True)
            failed.append(mode)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        # On stderr, as it comes: kept if a later mode is cut short; the table below is the summary.
        print(f"{mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    if not rows:
        sys.exit(f"bench_step: every mode failed ({', '.join(failed)})")
    mib = 2**20
    print(f"device: {_device_name(rows[0]['device'], args.threads)}")
    header = (
        f"{'mode':<7}{'variant':<11}{'loss':<14}{'median s':>10}{'min s':>9}{'tokens/s':>10}"
        f"{'held MiB':>10}{'step MiB':>10}{'peak MiB':>10}"
    )
    print(header)
    for row in rows:
        for name in ("ours", "reference"):
            v = row[name]
            loss = "objective" if name == "ours" else row["reference_loss"]
            print(
                f"{row['mode']:<7}{name:<11}{loss:<14}{v['median_s']:>10.4f}{v['min_s']:>9.4f}"
                f"{v['tokens_per_s']:>10.0f}{v['held_bytes'] / mib:>10.1f}{v['step_bytes'] / mib:>10.1f}"
                f"{v['peak_bytes'] / mib:>10.1f}"
            )
    for row in rows:
        low, high = row["round_ratio_p10_p90"]
        mem = row["ours"]["peak_bytes"] / max(row["reference"]["peak_bytes"], 1)
        print(
            f"{row['mode']}: step time ours/reference {row['ratio_median']:.3f} (median), "
            f"{row['ratio_min']:.3f} (min); per-round ratios p10-p90 {low:.3f}-{high:.3f}; "
            f"peak memory ours/reference {mem:.2f}; trainer setup {row['setup_seconds']:.1f} s"
        )
        warmup = ", ".join(f"{s:.2f}" for s in row["warmup_seconds"])
        print(f"{row['mode']}: setup phases {row['setup_phases']}; warm-up steps of ours {warmup} s")
    if failed:
        sys.exit(f"bench_step: failed modes: {', '.join(failed)}")


if __name__ == "__main__":
    main()
