"""Peak memory and time of forward+backward: our fused, chunked losses vs a naive full-logit implementation.

    python evals/bench_losses.py            # CPU-friendly: 1024 tokens, hidden 256, vocab 32768
    python evals/bench_losses.py --large    # the target size: 4096 tokens, hidden 2048, vocab 128256
    python evals/bench_losses.py --tokens 2048 --vocab 65536 --hidden 1024 --losses fkl,jsd --repeats 3

Both variants get the same inputs: student hidden states [N, H] (requires grad), the LM head (nn.Linear, whose
weight gets a gradient) and full teacher logits [N, V]. "naive" computes all N x V student logits at once and
the divergence with plain torch ops (what a first implementation does); "ours" is the registered loss (fused
head, gradients computed chunk by chunk). Sinkhorn's naive variant also materialises all logits, then solves
the same batch-wise OT problems.

What is measured:
- peak memory: the extra memory of one forward+backward above what the inputs already use.
  CUDA: torch.cuda.max_memory_allocated() minus the allocated bytes after the inputs were built (the caching
  allocator's own view, so exactly what torch allocated). CPU: every (loss, variant) runs in a fresh
  subprocess, and the number is the process's peak resident set size (getrusage ru_maxrss, which sees torch's
  allocations as the kernel sees them) minus its RSS right after the inputs were built (built in place so
  their construction leaves no higher transient peak), with glibc's mmap threshold fixed at 128 KiB so freed
  blocks leave the resident set. It includes allocator and page granularity, so small sizes are noisy.
- time: median wall time of `--repeats` forward+backward runs after one warm-up, in the same process.
Ratios: mem = ours / naive (goal <= 0.15), speed = naive time / ours time (goal >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOSSES = ["fkl", "rkl", "jsd", "sinkhorn"]


def naive_loss(name: str, logits: torch.Tensor, teacher: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """The straightforward full-logit formulas (no chunking, no fusion)."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    if name == "fkl":
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if name == "rkl":
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    if name == "jsd":
        p, q = log_p.exp(), log_q.exp()
        log_m = torch.log(0.5 * p + 0.5 * q)
        return (0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)).mean()
    if name == "sinkhorn":
        from llmdistill.losses.sinkhorn import l1_cost_dense, sinkhorn_cost

        q, p = log_q.exp(), log_p.exp()
        total = 0.0
        for start in range(0, q.shape[0], group_size):
            cost = l1_cost_dense(q[start : start + group_size], p[start : start + group_size])
            total = total + sinkhorn_cost(cost, 0.1, 20) * cost.shape[0]
        return total / q.shape[0]
    raise ValueError(name)


def build_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    torch.manual_seed(seed)
    # Built in place: no temporary larger than the inputs themselves.
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, hidden**-0.5)
    h = torch.empty(tokens, hidden, device=device, dtype=dtype).normal_().requires_grad_(True)
    teacher = torch.empty(tokens, vocab, device=device, dtype=dtype).normal_(0.0, 2.0)
    targets = torch.zeros(1, tokens, dtype=torch.long, device=device)
    return h, head, teacher, targets


def step(name: str, impl: str, h, head, teacher, targets) -> None:
    from llmdistill.losses import get_loss
    from llmdistill.signal import StudentOutput, TeacherSignal

    h.grad = None
    head.weight.grad = None
    if impl == "naive":
        loss = naive_loss(name, head(h), teacher)
    else:
        student = StudentOutput(hidden=h.unsqueeze(0), head=head)
        signal = TeacherSignal(logits=teacher.unsqueeze(0))
        params = {"beta": 0.5} if name == "jsd" else {}
        loss, _ = get_loss(name)(student, signal, {"targets": targets}, **params)
    loss.backward()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args, name: str, impl: str) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype)
    h, head, teacher, targets = build_inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(name, impl, h, head, teacher, targets)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        step(name, impl, h, head, teacher, targets)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(name, impl, h, head, teacher, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "loss": name,
        "impl": impl,
        "peak_bytes": max(peak, 0),
        "seconds": statistics.median(times),
        "device": device,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--large", action="store_true", help="4096 tokens, hidden 2048, vocab 128256")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "loss:impl", run in this process only
    args = parser.parse_args(argv)
    if args.large:
        args.tokens, args.hidden, args.vocab = 4096, 2048, 128256
    if args.one:
        name, impl = args.one.split(":")
        print(json.dumps(measure(args, name, impl)))
        return
    passthrough = [
        f"--tokens={args.tokens}",
        f"--hidden={args.hidden}",
        f"--vocab={args.vocab}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
    ] + (["--cpu"] if args.cpu else [])
    print(
        f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}; "
        "peak = extra memory of one fwd+bwd; time = median of repeats"
    )
    columns = [
        ("loss", 9),
        ("naive MiB", 11),
        ("ours MiB", 10),
        ("mem ratio", 11),
        ("naive s", 10),
        ("ours s", 9),
        ("speed", 8),
    ]
    print(f"{columns[0][0]:<{columns[0][1]}}" + "".join(f"{n:>{w}}" for n, w in columns[1:]))
    # glibc serves large blocks from its heap once its adaptive mmap threshold has grown, and keeps freed heap
    # memory resident; a fixed threshold makes every block over 128 KiB its own mapping, returned on free, so
    # the resident set follows what torch actually holds (same setting for both variants).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for name in args.losses.split(","):
        row = {}
        for impl in ("naive", "ours"):
            # A fresh process per variant: peak RSS is per process, and nothing one variant cached helps
            # another.
            out = subprocess.run(
                [sys.executable, __file__, f"--one={name}:{impl}", *passthrough],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            row[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        naive, ours = row["naive"], row["ours"]
        mem_ratio = ours["peak_bytes"] / max(naive["peak_bytes"], 1)
        speed = naive["seconds"] / ours["seconds"]
        print(
            f"{name:<9}{naive['peak_bytes'] / 2**20:>11.1f}{ours['peak_bytes'] / 2**20:>10.1f}"
            f"{mem_ratio:>11.3f}"
            f"{naive['seconds']:>10.3f}{ours['seconds']:>9.3f}{speed:>7.2f}x",
            flush=True,
        )
    print(
        f"device: {row['ours']['device']}; liger-kernel column: only where it runs (CUDA); not measured here"
    )


if __name__ == "__main__":
    main()
