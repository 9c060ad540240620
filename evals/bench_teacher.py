"""Teacher scoring throughput and storage: vLLM server vs vLLM offline engine vs in-process HF, same tokens.

    python evals/bench_teacher.py                          # embedded teacher, 32 sequences x 256, K = 20
    python evals/bench_teacher.py --sequences 64 --seq-len 128 --top-k 32 --teacher /path/to/hf/model
    python evals/bench_teacher.py --url http://127.0.0.1:8000   # use a server that is already running

Each backend scores the same packed sequences (the trainer's own batches, micro-batch `--batch`) and yields
the trainer's TeacherSignal: the server and the offline engine top-K log-probs (each document a prompt),
HF the full logits of one forward. tokens/s counts the sequences' tokens over wall time after one warm-up
batch; start-up (server health, engine load, model load) is reported apart. Without --url the server is
started here (launch/serve_teacher.sh) and stopped by its PID at the end. Bytes/token: the cache encoding of
llmdistill/teachers/vllm_cache.py vs full fp16 logits (2 * vocab), as stored per position.
On a 2-core CPU run it alone: the three backends take turns, never overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def batches(dataset, n: int, batch: int):
    from llmdistill.data import collate

    return [collate([dataset[j] for j in range(i, min(i + batch, n))]) for i in range(0, n, batch)]


def timed(score, work: list[dict]) -> tuple[float, float]:
    """(tokens/s, seconds) over `work` after one warm-up batch."""
    score(work[0])
    t0 = time.time()
    for b in work:
        score(b)
    seconds = time.time() - t0
    return sum(b["input_ids"].numel() for b in work) / seconds, seconds


def start_server(overrides: list[str], port: int) -> tuple[str, int, float]:
    tmp = tempfile.mkdtemp(prefix="bench-teacher-")
    t0 = time.time()
    out = subprocess.run(
        ["bash", str(REPO / "launch/serve_teacher.sh"), "configs/tiny/vllm_server.yaml", *overrides],
        cwd=REPO,
        env=dict(os.environ, SERVE_DIR=tmp, PYTHON=sys.executable),
        capture_output=True,
        text=True,
    )
    pid_file = Path(tmp) / "teacher_server.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    if out.returncode != 0:
        stop_server(pid)
        raise SystemExit(f"server did not start: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1], pid, time.time() - t0


def stop_server(pid: int) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.2)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--data", default="embedded:validation")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--url", help="a running vLLM server (default: start one here)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from llmdistill import session
    from llmdistill.config import load_config
    from llmdistill.distributed import free_port
    from llmdistill.teachers import vllm_cache as vc
    from llmdistill.teachers import vllm_cache_build as build
    from llmdistill.teachers.prompts import score_batch
    from llmdistill.teachers.vllm_server import VLLMServerTeacher, check_servers

    port = args.port or free_port()
    overrides = [
        f"teacher.path={args.teacher}",
        f"teacher.dtype={args.dtype}",
        f"teacher.server.top_k={args.top_k}",
        f"teacher.cache.top_k={args.top_k}",
        f"data.train.path={args.data}",
        f"data.seq_len={args.seq_len}",
        f"teacher.serve.port={port}",
        f"teacher.server.urls=[{args.url or f'http://127.0.0.1:{port}'}]",
        "teacher.source=vllm_server",
    ]
    cfg = load_config(None, overrides)
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    n = min(args.sequences, len(dataset))
    work = batches(dataset, n, args.batch)
    results: dict[str, dict] = {}

    # 1. In-process HF: one forward per micro-batch, full logits (what teacher.source=hf computes).
    t0 = time.time()
    from llmdistill.models import load_model

    model = load_model(plan.teacher_path, args.dtype).eval()
    load_s = time.time() - t0

    @torch.no_grad()
    def hf_score(b):
        return model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits

    tps, secs = timed(hf_score, work)
    results["hf in-process"] = {"tokens_per_s": tps, "seconds": secs, "startup_s": load_s}
    model = None  # free it before the next backend loads

    # 2. vLLM offline engine, in this process (what launch/cache_teacher.py runs).
    t0 = time.time()
    engine = build.offline_engine(plan.teacher_path, cfg, args.seq_len + 2)
    load_s = time.time() - t0

    def engine_score(b):
        return score_batch(lambda prompts, k: build.engine_prompt_logprobs(engine, prompts, k), b, args.top_k)

    tps, secs = timed(engine_score, work)
    results["vllm offline"] = {"tokens_per_s": tps, "seconds": secs, "startup_s": load_s}
    engine = None

    # 3. vLLM server over HTTP (what teacher.source=vllm_server does per micro-batch, without prefetch).
    pid, start_s = 0, 0.0
    try:
        if not args.url:
            _, pid, start_s = start_server(overrides, port)
        check_servers(cfg, plan.teacher_tok)  # a --url server of another model fails here, in one line
        source = VLLMServerTeacher(cfg)
        tps, secs = timed(source.signal, work)
        results["vllm server"] = {"tokens_per_s": tps, "seconds": secs, "startup_s": start_s}
    finally:
        stop_server(pid)

    vocab = plan.teacher_config.vocab_size
    storage = {
        f"cache top-{args.top_k}": vc.bytes_per_token(args.top_k, vocab),
        "cache top-32": vc.bytes_per_token(32, vocab),
        "full fp16 logits": 2 * vocab,
    }
    tokens = sum(b["input_ids"].numel() for b in work)
    print(
        f"teacher {args.teacher} (vocab {vocab}), {n} sequences x {args.seq_len} = {tokens} tokens, "
        f"K={args.top_k}"
    )
    print(f"{'backend':<16}{'tokens/s':>12}{'seconds':>10}{'start-up s':>12}")
    for name, r in results.items():
        print(f"{name:<16}{r['tokens_per_s']:>12.0f}{r['seconds']:>10.2f}{r['startup_s']:>12.1f}")
    print(f"{'storage':<16}{'bytes/token':>12}{'vs fp16':>10}")
    for name, b in storage.items():
        print(f"{name:<16}{b:>12}{b / storage['full fp16 logits']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": results, "bytes_per_token": storage}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
