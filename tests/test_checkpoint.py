"""Checkpoints checked before they are trusted, a run directory's config kept by refused commands, and the
files a run writes honouring the umask. One real short training (two checkpoints) is shared; each test
works on its own copy of the run directory (the config comparison needs none: configs alone)."""

import json
import os
import shutil
import stat

import pytest
from conftest import QUICK, is_config_field, read_log, run_cli

from llmdistill.checkpoint import (
    COMPLETE,
    RESUMABLE_CHANGES,
    check_run_config,
    complete_checkpoints,
    config_changes,
    damage,
    prune_checkpoints,
    write_config,
)
from llmdistill.cli import main
from llmdistill.config import LLMDistillError, load_config

RUN = [*QUICK, "train.max_steps=4", "train.save_every=2", "deepspeed.zero_stage=1", "run.name=run"]
UMASK = 0o027  # not the usual 022, so a fixed 0644 would be caught


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    previous = os.umask(UMASK)  # the subprocess inherits it
    try:
        result = run_cli(["train", *RUN, f"run.output_dir={out}"])
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


@pytest.fixture
def run_dir(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _checkpoints(run_dir):
    return [p.name for p in complete_checkpoints(run_dir / "checkpoints")]


def _weights_file(checkpoint):
    return checkpoint / "mp_rank_00_model_states.pt"


def test_every_output_honours_the_umask(finished_run):
    modes = {
        str(p.relative_to(finished_run)): stat.S_IMODE(p.stat().st_mode)
        for p in finished_run.rglob("*")
        if p.is_file()
    }
    # safetensors writes 0600 whatever the umask: the group could not read the student
    assert modes["student/model.safetensors"] == 0o666 & ~UMASK
    assert {name: oct(mode) for name, mode in modes.items() if mode & UMASK} == {}


def test_damage_names_a_deleted_truncated_or_rewritten_file(run_dir):
    newest = run_dir / "checkpoints" / "step_00000004"
    assert _checkpoints(run_dir) == ["step_00000002", "step_00000004"]
    assert damage(newest) is None
    weights = _weights_file(newest)
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, last byte changed
    assert damage(newest) == f"{weights} differs from what was written"
    weights.write_bytes(data[: len(data) // 2])
    assert damage(newest) == f"{weights} has {len(data) // 2} bytes, {len(data)} were written"
    weights.unlink()
    assert damage(newest) == f"{weights} is missing"


def test_pruning_counts_only_intact_checkpoints(run_dir):
    root = run_dir / "checkpoints"
    for step in (6, 8):  # two more complete checkpoints, copies of step 4 under their own markers
        shutil.copytree(root / "step_00000004", root / f"step_{step:08d}")
    weights = _weights_file(root / "step_00000006")
    weights.write_bytes(weights.read_bytes()[:1000])
    # Keeping the newest two would keep the damaged step 6 and leave one checkpoint to fall back to.
    prune_checkpoints(root, keep=2)
    assert _checkpoints(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    prune_checkpoints(root, keep=1)
    assert _checkpoints(run_dir) == ["step_00000008"]


def test_a_damaged_checkpoint_named_by_resume_is_an_error(run_dir, capsys):
    newest = run_dir / "checkpoints" / "step_00000004"
    weights = _weights_file(newest)
    weights.write_bytes(weights.read_bytes()[:1000])
    code = main(["train", *RUN, f"run.output_dir={run_dir.parent}", f"train.resume={newest}"])
    err = capsys.readouterr().err
    assert code == 2 and f"train.resume: checkpoint {newest} is damaged: {weights} has 1000 bytes" in err, err


def test_resume_auto_falls_back_to_the_previous_intact_checkpoint(run_dir):
    newest = run_dir / "checkpoints" / "step_00000004"
    _weights_file(newest).unlink()
    before = read_log(run_dir)
    # Extending max_steps is a change a run directory accepts.
    result = run_cli(["train", *RUN, f"run.output_dir={run_dir.parent}", "train.max_steps=6"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {newest} is damaged, not resuming from it: {_weights_file(newest)} is missing" in (
        result.stderr
    )
    assert "resumed from" in result.stderr and "step_00000002 (step 2)" in result.stderr
    assert _checkpoints(run_dir) == ["step_00000004", "step_00000006"]
    assert damage(newest) is None  # written again when the run passed step 4
    # Steps 3 and 4 were trained twice; the log holds each once, and steps 1-2 as first written.
    records = [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    after = read_log(run_dir)
    assert [after[s]["time"] for s in (1, 2)] == [before[s]["time"] for s in (1, 2)]
    assert after[3]["time"] > before[4]["time"]
    # Throughput over both segments: the 2 steps before the checkpoint that was used, and the 4 after it.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_per_s"] * summary["train_seconds"] == pytest.approx(6 * 4 * 64)


def test_a_refused_command_leaves_config_yaml_as_it_was(run_dir, capsys):
    saved = (run_dir / "config.yaml").read_bytes()
    out = f"run.output_dir={run_dir.parent}"
    code = main(["train", *RUN, out, "data.train.path=/no/such/data.jsonl"])
    assert code == 2 and "data file not found" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == saved
    code = main(["train", *RUN, out, "train.lr=0.01", "loss=[{name: jsd}]"])
    err = capsys.readouterr().err
    assert code == 2 and "has checkpoints of a run with another config" in err
    assert "differs in loss.0.name, train.lr" in err and "run.overwrite_config=true" in err, err
    assert (run_dir / "config.yaml").read_bytes() == saved


def test_a_run_that_starts_over_sets_the_earlier_checkpoints_aside(run_dir):
    # Left among the new ones, the earlier steps 2 and 4 would outnumber this run's step 2 (pruned at once
    # with keep 1) and be what the next resume: auto continues.
    before = read_log(run_dir)
    out = f"run.output_dir={run_dir.parent}"
    # Both segments in subprocesses: a command run in this process leaves the process group other tests share.
    never = ["train.resume=never", "train.max_steps=2", "train.keep_checkpoints=1"]
    result = run_cli(["train", *RUN, out, *never])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoints(run_dir) == ["step_00000002"]
    marker = json.loads((run_dir / "checkpoints" / "step_00000002" / COMPLETE).read_text())
    assert marker["time"] > before[4]["time"]
    (aside,) = run_dir.glob("checkpoints.before-*")
    assert [p.name for p in complete_checkpoints(aside)] == ["step_00000002", "step_00000004"]
    assert all(damage(p) is None for p in complete_checkpoints(aside))
    # The next segment continues the new run, not the earlier one.
    result = run_cli(["train", *RUN, out, "train.max_steps=3", "train.keep_checkpoints=1"])
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-3000:]
    assert _checkpoints(run_dir) == ["step_00000003"] and sorted(read_log(run_dir)) == [1, 2, 3]


def test_a_run_directory_whose_config_is_not_yaml_is_refused_by_name(run_dir, capsys):
    (run_dir / "config.yaml").write_text("run: {name: [unclosed\n")
    assert main(["train", *RUN, f"run.output_dir={run_dir.parent}"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.yaml'} is not valid YAML" in err and "Traceback" not in err, err
    assert _checkpoints(run_dir) == ["step_00000002", "step_00000004"]


def test_a_checkpoint_of_another_student_shape_is_refused_before_loading(run_dir, capsys):
    shape = "student.from_teacher={num_hidden_layers: 3, intermediate_size: 128}"
    code = main(["train", *RUN, f"run.output_dir={run_dir.parent}", shape, "run.overwrite_config=true"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a student of another shape (num_hidden_layers 2 -> 3)" in err, err


def test_the_marker_records_the_run_so_far(finished_run):
    marker = json.loads((finished_run / "checkpoints" / "step_00000004" / COMPLETE).read_text())
    assert marker["tokens"] == 4 * 4 * 64  # steps x micro-batch x seq_len
    summary = json.loads((finished_run / "summary.json").read_text())
    assert 0 < marker["train_seconds"] <= summary["train_seconds"]
    assert summary["tokens_per_s"] == pytest.approx(marker["tokens"] / summary["train_seconds"])


def test_every_resumable_setting_is_a_config_field():
    """A key that moved (teacher.urls -> teacher.server.urls) would leave RESUMABLE_CHANGES naming nothing."""
    assert [key for key in RESUMABLE_CHANGES if not is_config_field(key)] == []


# The settings README ("Checkpoints and resume") says may change between the segments of a run.
README_RESUMABLE = [
    "train.max_steps=9",
    "train.resume=elsewhere/checkpoints/step_00000002",
    "train.progress=false",
    "train.log_every=3",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.save_every=2",
    "train.keep_checkpoints=5",
    "train.export=false",
    "train.max_skipped_steps=3",
    "data.num_workers=2",
    "teacher.server.urls=[http://10.0.0.1:8000, http://10.0.0.2:8000]",
    "teacher.server.timeout=120",
    "teacher.server.retries=9",
    "teacher.server.backoff=2.5",
    "teacher.server.prefetch=4",
    "teacher.on_policy.server.urls=[http://10.0.0.3:8001]",
    "teacher.on_policy.server.timeout=600",
    "teacher.on_policy.server.retries=1",
    "teacher.on_policy.server.backoff=0.5",
    "eval={tasks: [llmdistill_code_bpb], limit: 5}",
    "derive={target: {num_layers: 1}}",
]


def test_settings_that_may_change_between_segments_keep_the_checkpoints_resumable(tmp_path):
    run_dir = tmp_path / "run"
    write_config(load_config(None, ["teacher.source=on_policy"]), run_dir)
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / COMPLETE).write_text("{}")
    for change in README_RESUMABLE:
        check_run_config(load_config(None, ["teacher.source=on_policy", change]), run_dir)
    check_run_config(load_config(None, ["teacher.source=on_policy", *README_RESUMABLE]), run_dir)
    old = load_config(None, ["teacher.source=on_policy"]).model_dump(mode="json")
    new = load_config(None, ["teacher.source=on_policy", *README_RESUMABLE]).model_dump(mode="json")
    assert config_changes(old, new) == []
    with pytest.raises(LLMDistillError, match=r"this one differs in teacher\.server\.top_k, train\.lr\)"):
        check_run_config(
            load_config(None, ["teacher.source=on_policy", "train.lr=0.1", "teacher.server.top_k=5"]), run_dir
        )
