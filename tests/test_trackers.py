"""train.report_to: every logged scalar and the run's parameters reach each experiment tracker, read back
from what the tracker itself stored: a wandb offline run file, trackio's local database, a real MLflow
tracking server on 127.0.0.1."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import QUICK, nan_teacher, read_log, run_cli

from llmdistill import trackers
from llmdistill.config import ConfigError, load_config
from llmdistill.distributed import free_port
from llmdistill.trackers import Trackers, flatten

TRAIN = [*QUICK, "train.max_steps=3", "train.save_every=2", "train.export=false", "deepspeed.zero_stage=1"]


def _error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    return result.stderr.strip().splitlines()[-1]


def _scalars_by_step(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one scalar in logs.jsonl."""
    out = {}
    for line in (run_dir / "logs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def _tracker_state(run_dir: Path, tracker: str) -> dict:
    return json.loads((run_dir / "trackers" / f"{tracker}.json").read_text())


# ------------------------------------------------------------------------------ the fan-out, in process


class Recorder:
    """A tracker that keeps what it is given; with `fail_at`, it raises from that step on."""

    def __init__(self, fail_at=None):
        self.started, self.logged, self.finished, self.fail_at = [], [], None, fail_at

    def start(self, params, run_dir, name, previous):
        self.started.append(previous)
        return {"id": previous.get("id", "run-1")}

    def log(self, step, scalars):
        if self.fail_at is not None and step >= self.fail_at:
            raise ConnectionError(f"tracker gone\nat step {step}")
        self.logged.append((step, dict(scalars)))

    def finish(self, failed=False):
        self.finished = "failed" if failed else "finished"


def test_a_tracker_failing_mid_run_warns_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    good, bad = Recorder(), Recorder(fail_at=2)
    monkeypatch.setitem(trackers.ADAPTERS, "good", lambda: good)
    monkeypatch.setitem(trackers.ADAPTERS, "bad", lambda: bad)
    fan = Trackers(["tensorboard", "good", "bad"], {}, tmp_path, "r", resuming=False)
    with caplog.at_level(logging.WARNING, logger="llmdistill.trackers"):
        for step in range(1, 5):
            fan.log(step, {"loss": 1.0 / step})
        fan.finish()
    assert [s for s, _ in good.logged] == [1, 2, 3, 4] and good.finished == "finished"
    assert [s for s, _ in bad.logged] == [1] and bad.finished is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("bad failed at step 2"), warnings
    assert "\n" not in warnings[0]


def test_a_resumed_run_reopens_the_tracker_run_and_skips_the_steps_it_holds(tmp_path, monkeypatch):
    first, second = Recorder(), Recorder()
    adapters = iter([first, second])
    monkeypatch.setitem(trackers.ADAPTERS, "rec", lambda: next(adapters))
    fan = Trackers(["rec"], {}, tmp_path, "r", resuming=False)
    for step in (1, 2, 3):
        fan.log(step, {"loss": float(step)})
    fan.log(3, {"eval/loss": 9.0})
    # A crash after step 3 was logged; the newest checkpoint is step 2, so step 3 is trained again.
    fan = Trackers(["rec"], {}, tmp_path, "r", resuming=True)
    fan.log(3, {"loss": 30.0})
    fan.log(3, {"eval/loss": 90.0, "eval/ppl": 5.0})
    fan.log(4, {"loss": 4.0})
    fan.log(4, {"eval/loss": 8.0})
    assert second.started == [{"id": "run-1"}]
    assert second.logged == [(3, {"eval/ppl": 5.0}), (4, {"loss": 4.0}), (4, {"eval/loss": 8.0})]
    assert _tracker_state(tmp_path, "rec")["held"] == {"loss": 4, "eval/loss": 4, "eval/ppl": 3}


def test_a_fresh_run_in_the_same_directory_starts_a_new_tracker_run(tmp_path, monkeypatch):
    first, second = Recorder(), Recorder()
    adapters = iter([first, second])
    monkeypatch.setitem(trackers.ADAPTERS, "rec", lambda: next(adapters))
    Trackers(["rec"], {}, tmp_path, "r", resuming=False).log(1, {"loss": 1.0})
    fan = Trackers(["rec"], {}, tmp_path, "r", resuming=False)
    fan.log(1, {"loss": 2.0})
    assert second.started == [{}] and second.logged == [(1, {"loss": 2.0})]


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.report_to\.1: Input should be 'tensorboard', 'wandb'"):
        load_config(None, ["train.report_to=[tensorboard, comet]"])


def test_a_tracker_that_cannot_start_stops_the_run_before_training(tmp_path):
    closed = free_port()
    result = run_cli(
        ["train", *TRAIN, f"run.output_dir={tmp_path}", "run.name=nostart", "train.report_to=[mlflow]"],
        env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed}",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        },
    )
    line = _error_line(result)
    assert line.startswith("error: train.report_to: mlflow failed to start: "), line
    assert str(closed) in line
    assert not (tmp_path / "nostart" / "logs.jsonl").exists()
    assert not (tmp_path / "nostart" / "checkpoints").exists()


# ------------------------------------------------------------------------ wandb offline and trackio local


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A derived student trained 3 steps reporting to TensorBoard, wandb (offline) and trackio (local)."""
    from llmdistill.derive import derive_student

    tmp = tmp_path_factory.mktemp("offline")
    derived = derive_student(
        load_config(
            None,
            [
                "data.train.path=embedded:validation",
                "data.seq_len=64",
                "derive.target={num_layers: 2, intermediate_size: 128}",
                "derive.calibration_samples=4",
                "derive.eval_samples=2",
                "derive.plots=false",
                f"run.output_dir={tmp}",
                "run.name=derive",
            ],
        )
    )
    (tmp / "wandb").mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "TRACKIO_DIR": str(tmp / "trackio")}
    args = [a for a in TRAIN if not a.startswith("student.from_teacher")]
    result = run_cli(
        [
            "train",
            *args,
            f"student.path={derived}",
            f"run.output_dir={tmp}",
            "run.name=offline",
            "train.report_to=[tensorboard, wandb, trackio]",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "offline", derived, env


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: LevelDB's log format (32 KiB blocks of checksummed chunks)
    after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_config_the_derivation_and_every_step(offline_run):
    run_dir, derived, env = offline_run
    run_id = _tracker_state(run_dir, "wandb")["run"]["id"]
    (run_file,) = Path(env["WANDB_DIR"]).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.display_name == "offline"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    derivation = json.loads((derived / "derivation.json").read_text())
    assert config.pop("derivation")["parameters"] == derivation["parameters"]
    assert config == saved
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            # wandb-core writes each key as a one-element nested_key; older writers used key
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    losses = {step: rec["loss"] for step, rec in read_log(run_dir).items()}
    assert sorted(losses) == [1, 2, 3]
    assert {s: row["loss"] for s, row in history.items() if "loss" in row} == losses
    assert {s: row["lr"] for s, row in history.items() if "lr" in row} == _scalars_by_step(run_dir, "lr")
    assert {s: row["eval/loss"] for s, row in history.items() if "eval/loss" in row} == _scalars_by_step(
        run_dir, "eval/loss"
    )


def test_trackio_local_run_holds_the_config_and_every_step(offline_run):
    run_dir, derived, env = offline_run
    name = _tracker_state(run_dir, "trackio")["run"]["name"]
    # trackio fixes its directory at import: read its store in a process that has TRACKIO_DIR set.
    read = "\n".join(
        [
            "import json, sys",
            "from trackio.sqlite_storage import SQLiteStorage as S",
            "p, n = 'llmdistill', sys.argv[1]",
            "stored = {'runs': S.get_runs(p), 'config': S.get_run_config(p, n), 'logs': S.get_logs(p, n)}",
            "print(json.dumps(stored, default=str))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", read, name],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    stored = json.loads(out.stdout.strip().splitlines()[-1])
    assert name in stored["runs"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = {k: v for k, v in stored["config"].items() if k in saved or k == "derivation"}
    assert config.pop("derivation")["student_shape"]["num_layers"] == 2
    assert config == saved
    by_key: dict[str, dict[int, float]] = {}
    for row in stored["logs"]:
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                by_key.setdefault(key, {})[row["step"]] = value
    assert by_key["loss"] == {s: rec["loss"] for s, rec in read_log(run_dir).items()}
    assert by_key["tokens_per_s"] == _scalars_by_step(run_dir, "tokens_per_s")
    assert by_key["eval/bpb"] == _scalars_by_step(run_dir, "eval/bpb")


# ------------------------------------------------------------------------------- a real MLflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store; yields (uri, stop)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stop():
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            stop()
            pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield uri, stop
    stop()
    log.close()


@pytest.fixture(scope="module")
def mlflow_run(mlflow_server, tmp_path_factory):
    uri, _ = mlflow_server
    tmp = tmp_path_factory.mktemp("mlflow-run")
    args = ["train", *TRAIN, f"run.output_dir={tmp}", "run.name=tracked", "train.report_to=[mlflow]"]
    env = {"MLFLOW_TRACKING_URI": uri}
    result = run_cli(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "tracked", args, env


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_run_holds_the_config_and_every_step(mlflow_server, mlflow_run):
    from mlflow.tracking import MlflowClient

    run_dir, _, _ = mlflow_run
    client = MlflowClient(mlflow_server[0])
    run = client.get_run(_tracker_state(run_dir, "mlflow")["run"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params == flatten(saved)
    assert run.data.params["train.report_to"] == '["mlflow"]'
    for key in ("loss", "lr", "tokens_per_s", "eval/loss", "eval/ppl"):
        assert _history(client, run.info.run_id, key) == sorted(_scalars_by_step(run_dir, key).items()), key


@pytest.mark.slow
def test_mlflow_resume_continues_the_same_run_and_logs_no_step_twice(mlflow_server, mlflow_run):
    from mlflow.tracking import MlflowClient

    run_dir, args, env = mlflow_run
    run_id = _tracker_state(run_dir, "mlflow")["run"]["run_id"]
    # As if the run had died after logging step 3 but before its checkpoint was complete.
    (last,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith("3")]
    shutil.rmtree(last)
    result = run_cli(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr + result.stdout
    assert _tracker_state(run_dir, "mlflow")["run"]["run_id"] == run_id
    client = MlflowClient(mlflow_server[0])
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in _history(client, run_id, "loss")] == [1, 2, 3]
    assert [s for s, _ in _history(client, run_id, "eval/loss")] == [0, 3]


@pytest.mark.slow
def test_a_run_that_fails_ends_its_mlflow_run_as_failed_and_gives_the_signals_back(
    mlflow_server, tmp_path, one_rank, monkeypatch
):
    """Every loss NaN (a NaN teacher): the run stops with TrainingStopped, and the MLflow run it opened says
    FAILED (not RUNNING forever); the process has its own SIGTERM handler back."""
    from mlflow.tracking import MlflowClient

    from llmdistill.train import Trainer, TrainingStopped

    uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [f"teacher.path={nan_teacher(tmp_path)}", "train.max_skipped_steps=2", "run.name=failed"]
    cfg = load_config(None, [*TRAIN, f"run.output_dir={tmp_path}", "train.report_to=[mlflow]", *overrides])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped):
        Trainer(cfg).run()
    assert signal.getsignal(signal.SIGTERM) is before
    run_id = _tracker_state(tmp_path / "failed", "mlflow")["run"]["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


@pytest.mark.slow
def test_mlflow_server_gone_mid_run_warns_once_and_training_completes(
    mlflow_server, tmp_path, one_rank, monkeypatch, caplog
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmdistill.train import Trainer

    uri, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config(
        None, [*TRAIN, f"run.output_dir={tmp_path}", "run.name=gone", "train.report_to=[tensorboard, mlflow]"]
    )
    trainer = Trainer(cfg)  # the MLflow run starts here
    stop()
    with caplog.at_level(logging.WARNING, logger="llmdistill.trackers"):
        summary = trainer.run()
    assert summary["steps"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmdistill.trackers"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow failed at step 0"), warnings
    events = EventAccumulator(str(tmp_path / "gone" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
