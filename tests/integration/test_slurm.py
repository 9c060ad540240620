"""The Slurm job scripts (launch/slurm/) on a real single-node Slurm started on localhost for this session.

Needs root (to install Slurm's Debian packages when missing, `make slurm`, and to run munged/slurmctld/
slurmd); skipped otherwise. Each trainer job is 2 srun tasks on the tiny embedded default (ZeRO-2, gloo).
A requeued batch job is held by slurmctld for about two minutes (BeginTime) before it may start again; the
preemption test releases it early with `scontrol update StartTime=now+5`, which a real cluster does not need:
not at once, since a batch job started within a second of its previous attempt's end finds that attempt's
credential still revoked on slurmd ("Job credential revoked") and fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import QUICK, REPO

from .slurm_cluster import Cluster, SlurmUnavailable, ensure_packages

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "launch" / "slurm" / "train.sbatch")
SERVER = str(REPO / "launch" / "slurm" / "server.sbatch")
PIPELINE = str(REPO / "launch" / "slurm" / "pipeline.sh")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (package install, munged, slurmctld, slurmd)")
    try:
        ensure_packages()
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm: {err}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        # What every job needs: this venv's interpreter, one thread per rank, no hub, loopback only.
        cluster.env.update(
            LLMDISTILL_PYTHON=sys.executable,
            LLMDISTILL_SERVER_HOST="127.0.0.1",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        yield cluster
    finally:
        cluster.stop()


def _wait_until(predicate, timeout: float, what: str, cluster: Cluster, run_dir: Path):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{_logs(run_dir, cluster)}")
        time.sleep(0.2)
    return result


def _logs(run_dir: Path, cluster: Cluster, tail: int = 6000) -> str:
    parts = [f"--- {f}\n{f.read_text(errors='replace')[-tail:]}" for f in sorted(run_dir.glob("**/slurm/*"))]
    parts += [f"--- {f}\n{f.read_text(errors='replace')[-tail:]}" for f in sorted(run_dir.glob("*.out"))]
    return "\n".join(parts) + "\n" + cluster.logs(1500)


def _finish(cluster: Cluster, job_id: int, run_dir: Path, timeout: float) -> dict[str, str]:
    try:
        info = cluster.wait_state(job_id, set(), timeout)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{_logs(run_dir, cluster)}")
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')}\n{_logs(run_dir, cluster)}"
    return info


def _train_args(out: Path, name: str, *extra: str) -> list[str]:
    return [*QUICK, f"run.output_dir={out}", f"run.name={name}", *extra]


def _steps(run_dir: Path) -> list[dict]:
    """Every training record in logs.jsonl, in file order (duplicates kept: a repeated step must show)."""
    path = run_dir / "logs.jsonl"
    if not path.is_file():
        return []
    return [r for line in path.read_text().splitlines() if "loss" in (r := json.loads(line))]


def _stamp(line: str) -> str:
    """The ISO time our job scripts put at the start of their own log lines ("[2026-...+00:00] ...")."""
    return line[1 : line.index("]")]


def _assert_finished(run_dir: Path, steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    assert "stopped_early" not in summary
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()
    assert (run_dir / "student" / "config.json").is_file()
    assert list((run_dir / "student").glob("*.safetensors"))
    return summary


def test_two_task_training_job(slurm, tmp_path):
    run_dir = tmp_path / "plain"
    job = slurm.sbatch(
        [f"--output={tmp_path}/%j.out", TRAIN, *_train_args(tmp_path, "plain", "train.max_steps=8")], cwd=REPO
    )
    info = _finish(slurm, job, run_dir, timeout=300)
    assert info["NumTasks"] == "2"
    _assert_finished(run_dir, 8)
    # Both ranks took part: world_size 2 (above), and each rank wrote its own ZeRO optimizer shard and RNG
    # state into the final checkpoint. The job's log is in the run directory.
    final = run_dir / "checkpoints" / "step_00000008"
    assert len(list(final.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert (final / "rng_rank0.pt").is_file() and (final / "rng_rank1.pt").is_file()
    log = (run_dir / "slurm" / f"train-{job}.log").read_text()
    assert "2 tasks" in log and "training step exited with 0" in log
    assert [r["step"] for r in _steps(run_dir)] == list(range(1, 9))


def test_preempted_job_requeues_resumes_and_loses_no_step(slurm, tmp_path):
    steps = 80
    run_dir = tmp_path / "preempt"
    args = _train_args(tmp_path, "preempt", f"train.max_steps={steps}", "train.save_every=40")
    job = slurm.sbatch([f"--output={tmp_path}/%j.out", TRAIN, *args], cwd=REPO)
    # Signal once training is under way (the trainer's handler is installed before step 1).
    _wait_until(lambda: len(_steps(run_dir)) >= 3, 300, "3 training steps", slurm, run_dir)
    # Exactly what `#SBATCH --signal=B:USR1@300` delivers near the time limit: USR1 to the batch shell only.
    signalled = slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    assert signalled.returncode == 0, signalled.stderr

    def requeued():
        info = slurm.job(job)
        return info if info.get("Restarts") == "1" or info.get("JobState") != "RUNNING" else None

    info = _wait_until(requeued, 120, "the job to requeue itself", slurm, run_dir)
    assert info["Restarts"] == "1", f"job did not requeue: {info.get('JobState')}\n{_logs(run_dir, slurm)}"
    released = slurm.run(["scontrol", "update", f"jobid={job}", "StartTime=now+5"])
    assert released.returncode == 0, released.stderr
    info = _finish(slurm, job, run_dir, timeout=300)
    assert info["Restarts"] == "1"
    _assert_finished(run_dir, steps)

    log = (run_dir / "slurm" / f"train-{job}.log").read_text()
    assert "got SIGUSR1, forwarding it to the ranks" in log
    assert "stopped early with a checkpoint: requeueing" in log
    stopped = [line for line in log.splitlines() if line.startswith("0: stopping at step ")]
    assert len(stopped) == 1, log[-4000:]
    stop_step = int(stopped[0].split()[4])
    assert 3 <= stop_step < steps
    assert f"step_{stop_step:08d} (step {stop_step})" in log  # "resumed from .../step_K (step K)"
    # Neither lost nor repeated: steps 1..N each logged exactly once across both attempts, and the data
    # position (micro-batches consumed per rank) continues exactly where the checkpoint left it.
    records = _steps(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["consumed_micro_batches"] == r["step"] for r in records)


# Per server role: the training config, its overrides, where the resolved config holds the server's URL, and
# what the server's log shows the trainer asked of it.
SERVED = {
    # Room for a prompt of seq_len tokens plus the appended final target and one generated token.
    "teacher": ("vllm_server.yaml", ["teacher.serve.max_model_len=256"], ("server",), ["/v1/completions"]),
    # The trainer pushes its weights (/collective_rpc) and asks for rollouts (/v1/completions).
    "student": (
        "on_policy_vllm_server.yaml",
        [],
        ("on_policy", "server"),
        ["/collective_rpc", "/v1/completions"],
    ),
}


@pytest.mark.parametrize("role", sorted(SERVED))
def test_a_server_job_serves_vllm_and_the_trainer_job_uses_it(slurm, tmp_path, role):
    pytest.importorskip("vllm")
    config, extra, where, requests = SERVED[role]
    run_dir = tmp_path / "pair"
    args = [
        "--config",
        str(REPO / "configs" / "tiny" / config),
        *_train_args(tmp_path, "pair", "train.max_steps=6", "train.eval_every=0", "train.save_every=0"),
        *extra,
    ]
    server = slurm.sbatch([f"--output={tmp_path}/%j.out", SERVER, role, *args], cwd=REPO)
    trainer = slurm.sbatch(
        [
            f"--output={tmp_path}/%j.out",
            f"--dependency=after:{server}",
            f"--export=ALL,LLMDISTILL_SERVER_JOBS={server}",
            TRAIN,
            *args,
        ],
        cwd=REPO,
    )
    _finish(slurm, trainer, run_dir, timeout=420)
    _assert_finished(run_dir, 6)

    server_log = (run_dir / "slurm" / f"{role}-{server}.log").read_text()
    healthy = [line for line in server_log.splitlines() if "healthy at http://127.0.0.1:" in line]
    assert len(healthy) == 1, server_log[-4000:]
    url = healthy[0].split("healthy at ")[1].split()[0]
    # The trainer started only after the server job had (dependency), waited until it was healthy, and ran
    # with its URL: the resolved config it saved names it, and the server answered the trainer's requests.
    train_log = (run_dir / "slurm" / f"train-{trainer}.log").read_text()
    assert slurm.job(trainer)["StartTime"] >= slurm.job(server)["StartTime"]
    used = [line for line in train_log.splitlines() if f"{role} server at {url} is healthy" in line]
    assert len(used) == 1, train_log[-4000:]
    assert _stamp(used[0]) >= _stamp(healthy[0])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["teacher"]
    for key in where:
        resolved = resolved[key]
    assert resolved["urls"] == [url]
    for request in requests:
        assert f'POST {request} HTTP/1.1" 200' in server_log, request
    # Training over, the trainer job cancelled the server job, which stopped vLLM and withdrew its URL.
    info = _wait_until(
        lambda: (i := slurm.job(server)).get("JobState") in ("CANCELLED", "COMPLETED") and i,
        60,
        f"the {role} server job to end",
        slurm,
        run_dir,
    )
    assert info["JobState"] == "CANCELLED"
    _wait_until(lambda: not (run_dir / f"{role}_url").exists(), 30, f"{role}_url removal", slurm, run_dir)


def _pipeline(env: dict, *overrides: str) -> dict[str, int]:
    out = subprocess.run(
        [PIPELINE, *overrides], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return {stage: int(job) for stage, job in (line.split() for line in out.stdout.splitlines())}


def test_pipeline_derives_trains_and_evaluates(slurm, tmp_path):
    """The whole chain on the tiny default, shrunk: derive -> train (2 tasks) -> eval, each after the last."""
    env = dict(
        slurm.env,
        DERIVE_ARGS=f"run.output_dir={tmp_path} data.train.max_documents=60 derive.calibration_samples=8 "
        "derive.eval_samples=4 derive.search.max_candidates=3 derive.plots=false",
        EVAL_ARGS=f"run.output_dir={tmp_path} eval.students=[{tmp_path}/tiny-distill] eval.limit=20",
    )
    jobs = _pipeline(
        env,
        f"run.output_dir={tmp_path}",
        f"student.path={tmp_path}/tiny-derive/derived",
        "data.seq_len=64",
        "train.max_steps=6",
        "train.eval_every=0",
    )
    assert list(jobs) == ["derive", "train", "eval"]
    _finish(slurm, jobs["eval"], tmp_path, timeout=300)
    info = {stage: slurm.job(job) for stage, job in jobs.items()}
    assert all(i["JobState"] == "COMPLETED" for i in info.values()), info
    assert info["derive"]["EndTime"] <= info["train"]["StartTime"] <= info["train"]["EndTime"]
    assert info["train"]["EndTime"] <= info["eval"]["StartTime"]
    assert (tmp_path / "tiny-derive" / "derived" / "config.json").is_file()
    _assert_finished(tmp_path / "tiny-distill", 6)
    results = json.loads((tmp_path / "tiny-eval" / "eval" / "results.json").read_text())
    assert results
    # Every job's output landed in its run directory.
    for name in ("tiny-derive", "tiny-distill", "tiny-eval"):
        assert list((tmp_path / name / "slurm").glob("*.out")), name


@pytest.mark.parametrize(
    "config, overrides, servers",
    [
        ("configs/tiny/vllm_server.yaml", [], ["teacher"]),
        # On-policy, scored by a vLLM teacher server and sampled from a student server: one job each.
        (
            "configs/tiny/on_policy_vllm_server.yaml",
            ["teacher.on_policy.scorer=vllm_server"],
            ["teacher", "student"],
        ),
    ],
    ids=["teacher", "teacher+student"],
)
def test_pipeline_with_vllm_servers_wires_the_dependencies(slurm, tmp_path, config, overrides, servers):
    """derive -> servers -> train -> eval, submitted held (never released): the dependency wiring only."""
    env = dict(
        slurm.env,
        TRAIN_CONFIG=config,
        SBATCH_ARGS="--hold",
        DERIVE_ARGS=f"run.output_dir={tmp_path}",
        EVAL_ARGS=f"run.output_dir={tmp_path}",
    )
    jobs = _pipeline(env, f"run.output_dir={tmp_path}", "run.name=chain", *overrides)
    assert list(jobs) == ["derive", *servers, "train", "eval"]
    try:
        deps = {stage: slurm.job(job)["Dependency"] for stage, job in jobs.items()}
        assert deps["derive"] == "(null)"
        assert f"afterok:{jobs['derive']}" in deps["train"]
        for role in servers:
            assert deps[role].startswith(f"afterok:{jobs['derive']}")
            assert f"after:{jobs[role]}" in deps["train"] or f":{jobs[role]}" in deps["train"], deps["train"]
            server = slurm.job(jobs[role])
            assert server["JobName"] == f"llmdistill-{role}" and server["Command"].endswith("server.sbatch")
        assert deps["eval"].startswith(f"afterok:{jobs['train']}")
        train = slurm.job(jobs["train"])
        assert train["Command"].endswith("launch/slurm/train.sbatch")
    finally:
        slurm.run(["scancel", *map(str, jobs.values())])
