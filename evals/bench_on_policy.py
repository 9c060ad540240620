"""On-policy rollouts: HF `generate` on the training student vs the vLLM generators (same student, prompts).

    python evals/bench_on_policy.py                     # 8 prompts of 32 tokens, 128 new tokens, 3 steps
    python evals/bench_on_policy.py --batch 16 --steps 5 --new-tokens 128
    python evals/bench_on_policy.py --server            # also the student served by llmdistill serve-student

Every arm builds the same `Trainer` from configs/tiny/on_policy_vllm.yaml (every micro-batch on-policy,
temperature 1, scored by the teacher in-process, one process) and differs only in
teacher.on_policy.generator: `hf`, `vllm` (an engine in the trainer's process) and, with `--server`,
`vllm_server` (a vLLM server started here from the same config and stopped by its PID; the trainer writes
the weights to disk and the server loads them at every push; it shares the CPU with the trainer).
After one warm-up step (the vLLM arms' first weight push included):
- rollout: the generator alone (HF `generate` on the training student, or the vLLM engine) on the prompts of
  the same `--steps` dataset batches; tokens = what the student wrote up to EOS (its training targets);
- whole step: `--steps` optimizer steps (rollout, teacher scoring, forward, backward, and for vLLM the weight
  push after the step); tokens = what the student wrote during them.
Figures are written tokens per second; the last columns are each vLLM arm / HF. The vLLM engine runs the
student compiled on the CPU (teacher.on_policy.compile; `--vllm-eager` turns it off); its first start for a
student compiles it (~13 s, cached for the next run), outside the timings. On a shared CPU they are noisy:
run it on an idle machine before quoting them. With one process on 2 cores each arm uses 2 threads, and
every op waits for both: another job on the cores stalls either arm by 10x or more at times;
OMP_NUM_THREADS=1 keeps both steady (up to ~10% slower on an idle machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(generator: str, args, out: Path) -> list[str]:
    return [
        f"teacher.on_policy.generator={generator}",
        "teacher.on_policy.fraction=1.0",
        f"teacher.on_policy.prompt_tokens={args.prompt_tokens}",
        f"data.seq_len={args.prompt_tokens + args.new_tokens - 1}",  # the window holds every new token
        f"train.micro_batch_size={args.batch}",
        f"train.max_steps={args.steps + 100}",
        "train.eval_batches=1",
        "train.progress=false",
        "train.export=false",
        f"run.output_dir={out}",
        f"run.name={generator}",
        f"teacher.on_policy.compile={not args.vllm_eager}",
        *([f"teacher.on_policy.server.urls=[{args.server_url}]"] if generator == "vllm_server" else []),
    ]


@contextlib.contextmanager
def student_server(args, out: Path):
    """A student server for the `vllm_server` arm on a free port, stopped by its PID on the way out."""
    from llmdistill.distributed import free_port

    args.server_url = f"http://127.0.0.1:{free_port()}"
    where = out / "student_server"
    command = [sys.executable, "-m", "llmdistill.cli", "serve-student", "--dir", str(where)]
    command += [
        "--config",
        str(REPO / "configs/tiny/on_policy_vllm.yaml"),
        *overrides("vllm_server", args, out),
    ]
    started = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    pid_file = where / "student_server.pid"
    try:
        if started.returncode != 0:
            sys.exit(f"the student server did not start:\n{started.stderr[-3000:]}")
        yield
    finally:
        if pid_file.is_file():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def measure(generator: str, args, out: Path) -> dict:
    from llmdistill.config import load_config
    from llmdistill.data import collate
    from llmdistill.signal import IGNORE_INDEX
    from llmdistill.teachers.on_policy import generate, student_batch
    from llmdistill.train import Trainer

    cfg = load_config(str(REPO / "configs/tiny/on_policy_vllm.yaml"), overrides(generator, args, out))
    trainer = Trainer(cfg)
    try:
        trainer.train_step()  # warm-up: opens the stream (and pushes the first weights)
        source, p = trainer.teacher_source, trainer.teacher_source.settings
        prompts = [
            collate([trainer.train_set[j] for j in range(i * args.batch, (i + 1) * args.batch)])["input_ids"]
            for i in range(args.steps)
        ]
        written, t0 = 0, time.perf_counter()
        for seed, batch in enumerate(prompts):
            prompt = batch[:, : p.prompt_tokens]
            if source.engine is not None:
                sampled = source.engine.generate(prompt, source.new_tokens, p, seed, source.pad_id)
            else:
                sampled = generate(trainer.student, prompt, source.new_tokens, p, seed, source.pad_id)
            targets = student_batch(sampled, p.prompt_tokens, cfg.data.seq_len, source.eos_id)["targets"]
            written += int((targets != IGNORE_INDEX).sum())
        rollout = written / (time.perf_counter() - t0)
        samples = out / generator / "on_policy_rank0.jsonl"
        before = len(samples.read_text().splitlines())
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        elapsed = time.perf_counter() - t0
        records = [json.loads(x) for x in samples.read_text().splitlines()[before:]]
        step = sum(r["valid_targets"] for r in records) / elapsed
    finally:
        trainer.close()
    return {"rollout": rollout, "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="prompts per micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed batches / optimizer steps per arm")
    parser.add_argument("--vllm-eager", action="store_true", help="the vLLM engine uncompiled")
    parser.add_argument("--server", action="store_true", help="also the vllm_server arm (a student server)")
    parser.add_argument("--out", default=None, help="run directory root (a temporary one by default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-on-policy-"))
    results = {"hf": measure("hf", args, out)}
    if args.server:
        with student_server(args, out):
            results["vllm_server"] = measure("vllm_server", args, out)
    # The colocated engine last: closing it leaves a process group DeepSpeed cannot use again in this process.
    results["vllm"] = measure("vllm", args, out)
    names = {"hf": "HF generate", "vllm": "vLLM", "vllm_server": "vLLM server"}
    print(
        f"\non-policy rollouts: {args.batch} prompts x {args.prompt_tokens} tokens, up to {args.new_tokens} "
        f"new tokens, {args.steps} batches/steps per arm (written tokens per second)"
    )
    arms = list(results)
    header = "".join(f"{names[a]:>14}" for a in arms) + "".join(f"{names[a] + ' / HF':>19}" for a in arms[1:])
    print(f"{'':24}{header}")
    for key, label in (("rollout", "rollout tokens/s"), ("step", "whole-step tokens/s")):
        values = [results[a][key] for a in arms]
        ratios = "".join(f"{v / values[0]:18.2f}x" for v in values[1:])
        print(f"{label:24}" + "".join(f"{v:14.1f}" for v in values) + ratios)


if __name__ == "__main__":
    main()
