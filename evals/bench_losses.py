"""Peak memory and time of forward+backward: our fused, chunked losses vs a naive full-logit implementation
(and liger-kernel's fused linear JSD where it imports and runs).

    python evals/bench_losses.py              # CPU-friendly: 1024 tokens, hidden 256, vocab 32768, float32
    python evals/bench_losses.py --large      # GPU: the sizes below, bfloat16
    python evals/bench_losses.py --tokens 2048 --vocab 65536 --hidden 1024 --losses fkl,jsd --repeats 3

`--large` runs 4096 x 2048 x 128256, 8192 x 4096 x 128256 and 16384 x 4096 x 151936 (tokens x hidden x vocab;
Llama-3 and Qwen-2 vocabularies) in bfloat16.

Every variant gets the student's hidden states [N, H] (requires grad) and LM head (nn.Linear, whose weight
gets a gradient), and the teacher in the form it takes:
- "naive": full teacher logits [N, V]; all N x V student logits at once and the divergence in plain torch ops
  (what a first implementation does). Sinkhorn's naive variant also materialises all logits, then solves the
  same batch-wise OT problems.
- "ours": the registered loss with full teacher logits [N, V] (TeacherSignal(logits=...)).
- "head": the registered loss with the teacher's final hidden states [N, H] and LM head [V, H]
  (TeacherSignal(final_hidden=..., head_weight=...)): the teacher's logits exist a chunk at a time, and their
  matmul is part of this variant's time.
- "head-torch" (CUDA only): "head" with the Triton kernels of llmdistill/losses/kernels.py turned off
  (LLMDISTILL_LOSS_KERNELS=torch), the chunk math then in torch ops.
- "head/N" (`--chunk-sizes N,...`): "head" with N rows per chunk instead of the automatic size.
- "topk": the registered loss against a top-k teacher (TOP_K ids and log-probabilities per position, what a
  vLLM cache or server sends; the default `bucket` tail), "topk-torch" (CUDA) the same without the kernels.
  Its loss is not the full-vocabulary one, so its ratios say what a sparse teacher costs, not a speed-up.
- "liger": liger-kernel's LigerFusedLinearJSD on the same teacher hidden states and head (fkl is its beta=0,
  rkl beta=1, jsd beta=0.5); shown only when `import liger_kernel` works, "-" where it cannot run (CPU).
Inputs are built before measuring, so the teacher logits of "naive" and "ours" are not in their peaks.

What is measured:
- peak memory: the extra memory of one forward+backward above what the inputs already use.
  CUDA: torch.cuda.max_memory_allocated() minus the allocated bytes before the step (the caching
  allocator's own view, so exactly what torch allocated), the largest over the timed runs, all variants of
  a loss in one process. CPU: every (loss, variant) runs in a fresh
  subprocess, and the number is the process's peak resident set size (getrusage ru_maxrss, which sees torch's
  allocations as the kernel sees them) minus its RSS right after the inputs were built and the loss code
  imported (built in place so their construction leaves no higher transient peak), with glibc's mmap
  threshold fixed at 128 KiB so freed blocks leave the resident set. It includes allocator and page
  granularity, so small sizes are noisy.
- time: the fastest of `--repeats` forward+backward runs after one warm-up, all variants of a loss in one
  process taking turns (so load from other processes on a shared machine hits them alike, and the minimum is
  the least disturbed run).
Ratios: mem = variant / naive (CPU goal <= 0.15), speed = naive time / variant time (CPU goal >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOSSES = ["fkl", "rkl", "jsd", "sinkhorn"]
LARGE = [(4096, 2048, 128256), (8192, 4096, 128256), (16384, 4096, 151936)]
LIGER_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}
TOP_K = 64  # the "topk" variant's teacher: its 64 most likely tokens and the rest-of-vocabulary bucket


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


def build_inputs(impl: str, tokens: int, hidden: int, vocab: int, dtype, device: str, seed: int = 0) -> dict:
    """The student's hidden states and head, and the teacher in the form `impl` takes, each built in place
    (no temporary larger than the inputs themselves). The teacher's logits are its head applied to its
    hidden states, so every variant sees the same teacher."""
    impl, _ = split_impl(impl)
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, hidden**-0.5)
    inputs = {
        "h": torch.empty(tokens, hidden, device=device, dtype=dtype).normal_().requires_grad_(True),
        "head": head,
        "teacher_hidden": torch.empty(tokens, hidden, device=device, dtype=dtype).normal_(),
        "teacher_weight": torch.empty(vocab, hidden, device=device, dtype=dtype).normal_(0, 2 * hidden**-0.5),
        "targets": torch.zeros(1, tokens, dtype=torch.long, device=device),
    }
    if impl in ("naive", "ours"):
        with torch.no_grad():
            inputs["teacher_logits"] = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    if impl.startswith("topk"):
        # A few rows at a time, so building them leaves no [N, V] peak behind in the CPU's resident set.
        ids, logprobs = [], []
        with torch.no_grad():
            for rows in inputs["teacher_hidden"].split(64):
                top = (rows @ inputs["teacher_weight"].T).float().log_softmax(-1).topk(TOP_K)
                ids.append(top.indices)
                logprobs.append(top.values)
        inputs["topk_ids"], inputs["topk_logprobs"] = torch.cat(ids), torch.cat(logprobs)
    if impl in ("naive", "ours") or impl.startswith("topk"):
        del inputs["teacher_hidden"], inputs["teacher_weight"]
    return inputs


def clear_grads(inputs: dict) -> None:
    inputs["h"].grad = None
    inputs["head"].weight.grad = None


def split_impl(impl: str) -> tuple[str, int | None]:
    """ "head/256" -> ("head", 256): ours with that chunk size (None: the loss's automatic one)."""
    base, _, chunk = impl.partition("/")
    return base, int(chunk) if chunk else None


def step(name: str, impl: str, inputs: dict) -> None:
    from llmdistill.losses import get_loss
    from llmdistill.signal import StudentOutput, TeacherSignal

    h, head = inputs["h"], inputs["head"]
    clear_grads(inputs)
    impl, chunk_size = split_impl(impl)
    if impl == "naive":
        loss = naive_loss(name, head(h), inputs["teacher_logits"])
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        fused = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[name])
        loss = fused(h, head.weight, inputs["teacher_hidden"], inputs["teacher_weight"], None)
    else:
        student = StudentOutput(hidden=h.unsqueeze(0), head=head)
        if impl == "ours":
            signal = TeacherSignal(logits=inputs["teacher_logits"].unsqueeze(0))
        elif impl.startswith("topk"):
            signal = TeacherSignal(
                topk_ids=inputs["topk_ids"].unsqueeze(0), topk_logprobs=inputs["topk_logprobs"].unsqueeze(0)
            )
        else:
            signal = TeacherSignal(
                final_hidden=inputs["teacher_hidden"].unsqueeze(0), head_weight=inputs["teacher_weight"]
            )
        params = ({"beta": 0.5} if name == "jsd" else {}) | ({"chunk_size": chunk_size} if chunk_size else {})
        # head-torch: the same loss with the Triton kernels turned off (their torch reference path).
        os.environ["LLMDISTILL_LOSS_KERNELS"] = "torch" if impl.endswith("-torch") else "triton"
        loss, _ = get_loss(name)(student, signal, {"targets": inputs["targets"]}, **params)
    loss.backward()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args, name: str, impl: str) -> dict:
    """Peak memory of one forward+backward of one variant, in this (fresh) process."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    from llmdistill.losses import get_loss

    get_loss(name)  # imports every loss module before the baseline
    if impl == "liger":
        import liger_kernel.transformers  # noqa: F401
    inputs = build_inputs(impl, args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype), device)
    result = {"loss": name, "impl": impl, "device": device}
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(name, impl, inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            step(name, impl, inputs)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    except torch.OutOfMemoryError:
        return result | {"error": "OOM"}
    except Exception as e:  # liger-kernel imports on CPU but its Triton kernels need a GPU
        if impl != "liger":
            raise
        return result | {"error": type(e).__name__}
    return result | {"peak_bytes": max(peak, 0)}


def time_variants(args, name: str, impls: list[str]) -> dict[str, dict]:
    """Fastest forward+backward of each variant over `repeats` rounds that take the variants in turn, in one
    process: load from other processes then hits every variant alike. On CUDA also each variant's peak
    (torch's allocator counts per tensor, so one process measures them all exactly). A variant that runs out
    of memory is reported as such; the others go on."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype)
    inputs = {impl: build_inputs(impl, args.tokens, args.hidden, args.vocab, dtype, device) for impl in impls}
    times = {impl: [] for impl in impls}
    peaks = dict.fromkeys(impls, 0)
    failed = {}
    for round_ in range(args.repeats + 1):  # the first round warms up
        for impl in impls:
            if impl in failed:
                continue
            clear_grads(inputs[impl])
            _sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            try:
                step(name, impl, inputs[impl])
            except torch.OutOfMemoryError:
                failed[impl] = "OOM"
                clear_grads(inputs[impl])
                continue
            _sync(device)
            if round_:
                times[impl].append(time.perf_counter() - start)
            if device == "cuda":
                peaks[impl] = max(peaks[impl], torch.cuda.max_memory_allocated() - base)
    out = {impl: {"error": error} for impl, error in failed.items()}
    for impl in impls:
        if impl not in failed:
            out[impl] = {"seconds": min(times[impl])}
            if device == "cuda":
                out[impl]["peak_bytes"] = peaks[impl]
    return out


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def _passthrough(args) -> list[str]:
    flags = [f"--tokens={args.tokens}", f"--hidden={args.hidden}", f"--vocab={args.vocab}"]
    flags += [f"--dtype={args.dtype}", f"--repeats={args.repeats}"]
    flags += [f"--chunk-sizes={','.join(map(str, args.chunk_sizes))}"]
    return flags + (["--cpu"] if args.cpu else [])


def _subprocess(args, mode: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, mode, *_passthrough(args)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        lines = (out.stderr.strip() or "failed").splitlines()
        return {"error": lines[-1][:40]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(args, env: dict) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    impls = ["naive", "ours", "head"] + (["head-torch"] if cuda else [])
    impls += [f"head/{rows}" for rows in args.chunk_sizes] + ["topk"] + (["topk-torch"] if cuda else [])
    impls += ["liger"] if liger_available() else []
    print(
        f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}; peak = extra MiB of "
        f"one fwd+bwd; time = fastest of {args.repeats} interleaved repeats, seconds"
    )
    header = f"{'loss':<9}" + "".join(f"{impl + ' MiB':>16}" for impl in impls)
    header += "".join(f"{impl + ' s':>14}" for impl in impls)
    header += "".join(f"{'mem ' + impl:>16}" for impl in impls[1:])
    header += "".join(f"{'speed ' + impl:>18}" for impl in impls[1:])
    print(header)
    for name in args.losses.split(","):
        row = {}
        for impl in impls:
            if impl == "liger" and name not in LIGER_BETA or impl.startswith("topk") and name == "sinkhorn":
                row[impl] = {"error": "n/a"}
            elif cuda:
                row[impl] = {}  # measured with the times below
            else:
                # A fresh process per variant: peak RSS is per process, and nothing one variant cached helps
                # another.
                row[impl] = _subprocess(args, f"--one={name}:{impl}", env)
        device = "cuda" if cuda else "cpu"
        timed = [impl for impl in impls if "error" not in row[impl]]
        measured = _subprocess(args, f"--time={name}:{','.join(timed)}", env)
        for impl in impls:
            if impl in measured:
                row[impl] |= measured[impl]
            elif "error" not in row[impl]:
                row[impl]["error"] = measured.get("error", "no time")

        def mib(r):
            return f"{r['peak_bytes'] / 2**20:>16.1f}" if "error" not in r else f"{r['error']:>16}"

        def sec(r):
            return f"{r['seconds']:>14.3f}" if "error" not in r else f"{'-':>14}"

        naive = row["naive"]
        line = f"{name:<9}" + "".join(mib(row[i]) for i in impls) + "".join(sec(row[i]) for i in impls)
        for key, fmt, width in (("peak_bytes", "{:.3f}", 16), ("seconds", "{:.2f}x", 18)):
            for impl in impls[1:]:
                r = row[impl]
                if "error" in r or "error" in naive:
                    line += f"{'-':>{width}}"
                elif key == "peak_bytes":
                    line += f"{fmt.format(r[key] / max(naive[key], 1)):>{width}}"
                else:
                    line += f"{fmt.format(naive[key] / r[key]):>{width}}"
        print(line, flush=True)
        liger_row = row.get("liger", {"error": "-"})
        if "error" not in liger_row:
            # The goal on CUDA: at least liger-kernel's speed at no more than its peak memory.
            print(
                " " * 9
                + "vs liger: "
                + "; ".join(
                    f"{impl} speed {liger_row['seconds'] / row[impl]['seconds']:.2f}x, memory "
                    f"{row[impl]['peak_bytes'] / max(liger_row['peak_bytes'], 1):.2f}x"
                    for impl in impls
                    if impl.startswith("head") and "error" not in row[impl]
                ),
                flush=True,
            )
    liger = "liger-kernel column included" if "liger" in impls else "liger-kernel not installed: no column"
    if device == "cuda":
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"device: {device}; {liger}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--large", action="store_true", help="the three GPU sizes of the module docstring")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="float32; --large: bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument(
        "--chunk-sizes", default="", help="comma-separated rows per chunk: a head/N variant of ours for each"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "loss:impl", peak memory here
    parser.add_argument("--time", help=argparse.SUPPRESS)  # internal: "loss:impl,impl", times here
    args = parser.parse_args(argv)
    unknown = set(args.losses.split(",")) - set(LOSSES)
    if unknown:
        parser.error(
            f"--losses: no naive version of {', '.join(sorted(unknown))} (one of {', '.join(LOSSES)})"
        )
    args.dtype = args.dtype or ("bfloat16" if args.large else "float32")
    args.chunk_sizes = [int(rows) for rows in args.chunk_sizes.split(",") if rows]
    if args.one:
        name, impl = args.one.split(":")
        print(json.dumps(measure(args, name, impl)))
        return
    if args.time:
        name, impls = args.time.split(":")
        print(json.dumps(time_variants(args, name, impls.split(","))))
        return
    # glibc serves large blocks from its heap once its adaptive mmap threshold has grown, and keeps freed heap
    # memory resident; a fixed threshold makes every block over 128 KiB its own mapping, returned on free, so
    # the resident set follows what torch actually holds (same setting for every variant).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for tokens, hidden, vocab in LARGE if args.large else [(args.tokens, args.hidden, args.vocab)]:
        args.tokens, args.hidden, args.vocab = tokens, hidden, vocab
        print_table(args, env)


if __name__ == "__main__":
    main()
