"""The trainer as one plain process: exact resume, crash safety, and one-line errors for bad input."""

import json

import pytest
from conftest import QUICK, read_log, run_cli

from llmdistill.checkpoint import COMPLETE, complete_checkpoints
from llmdistill.config import load_config
from llmdistill.train import Trainer

STEPS = ["train.max_steps=8", "train.save_every=4", "deepspeed.zero_stage=1"]


def _train(tmp_path, name, extra=(), env=None):
    return run_cli(
        ["train", *QUICK, *STEPS, f"run.output_dir={tmp_path}", f"run.name={name}", *extra], env=env
    )


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    result = _train(tmp, "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    return read_log(tmp / "straight"), json.loads((tmp / "straight" / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[0]


@pytest.fixture(scope="module")
def uninterrupted_summary(uninterrupted_run):
    return uninterrupted_run[1]


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, uninterrupted):
    killed = _train(tmp_path, "resumed", env={"LLMDISTILL_FAILPOINT": "checkpoint_complete@4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert max(read_log(tmp_path / "resumed")) == 4
    resumed = _train(tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    log = read_log(tmp_path / "resumed")
    for step in range(1, 9):
        assert log[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-6, rel=0), step
        # one micro-batch per step: no batch skipped or repeated across the restart
        assert log[step]["consumed_micro_batches"] == step


def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, uninterrupted):
    killed = _train(tmp_path, "crash", env={"LLMDISTILL_FAILPOINT": "checkpoint_before_complete@8"})
    assert killed.returncode == -9
    root = tmp_path / "crash" / "checkpoints"
    assert (root / "step_00000008").is_dir() and not (root / "step_00000008" / COMPLETE).exists()
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000004"]
    resumed = _train(tmp_path, "crash")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004" in resumed.stderr
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000004", "step_00000008"]
    log = read_log(tmp_path / "crash")
    assert log[8]["loss"] == pytest.approx(uninterrupted[8]["loss"], abs=1e-6, rel=0)
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["export_max_abs_diff"] < 1e-5


def test_training_improves_the_student_on_held_out_data(uninterrupted_summary):
    # Per-step losses are on different small batches; held-out loss is on the same tokens before and after.
    assert uninterrupted_summary["student_eval"]["loss"] < uninterrupted_summary["student_eval_start"]["loss"]


def _error_line(result) -> str:
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_bad_input_gives_one_line_errors(tmp_path):
    from llmdistill.data import train_bpe_tokenizer

    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer(iter(["some other text to learn from " * 40]), vocab_size=300).save_pretrained(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "train.max_stepz=3": "train.max_stepz: unknown key",
        "train.max_steps=lots": "train.max_steps: Input should be a valid integer",
        f"teacher.path={tmp_path}/missing": "teacher.path: model path not found",
        f"student.tokenizer={other}": "tokenizers differ (teacher: 2048 tokens, student: ",
        f"data.train.path={empty}": f"dataset {empty} is empty",
        "data.seq_len=4096": "data.seq_len=4096 is above the teacher's maximum sequence length 512",
    }
    for override, message in cases.items():
        line = _error_line(run_cli(["train", *QUICK, f"run.output_dir={tmp_path}", override]))
        assert line.startswith("error: ") and message in line, (override, line)


def test_lora_student_trains_and_exports_merged(tmp_path):
    result = run_cli(
        [
            "train",
            "--config",
            "configs/tiny/lora.yaml",
            f"run.output_dir={tmp_path}",
            "data.train.path=embedded:validation",
            "data.seq_len=64",
            "train.max_steps=4",
            "train.eval_batches=1",
            "train.progress=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny-lora" / "summary.json").read_text())
    student = tmp_path / "tiny-lora" / "student"
    assert (student / "model.safetensors").exists() and not (student / "adapter_config.json").exists()
    # The merged export reproduces the adapter-wrapped engine: merging sums (W + BA)x instead of
    # Wx + B(Ax), so fp32 rounding differs at ~1e-6 relative on logits of size ~10, hence 1e-4 absolute.
    assert summary["export_max_abs_diff"] < 1e-4
    # LoRA trained only a small part of the model
    assert summary["trainable_parameters"] < 0.2 * summary["student_parameters"]


def test_lm_eval_during_and_after_training(tmp_path):
    result = run_cli(
        [
            "train",
            *QUICK,
            "train.max_steps=4",
            f"run.output_dir={tmp_path}",
            "run.name=ev",
            "eval={every: 2, every_limit: 5, limit: 5, tasks: [llmdistill_code_nextline]}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ev" / "logs.jsonl").read_text().splitlines()]
    periodic = [r for r in records if any(k.startswith("lm_eval/") for k in r)]
    # every 2 steps on a subset, then the full report at the end
    assert [r["step"] for r in periodic] == [2, 4]
    report = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
    assert set(report["models"]) >= {"teacher"} and len(report["models"]) == 2


# ---------------------------------------------------------------------------------------------- in-process


def _trainer_config(tmp_path, name):
    return load_config(
        None, [*QUICK, *STEPS, "train.export=false", f"run.output_dir={tmp_path}", f"run.name={name}"]
    )


def test_single_steps_in_process_lower_the_held_out_loss(tmp_path, one_rank):
    trainer = Trainer(_trainer_config(tmp_path, "steps"))
    try:
        before = trainer.evaluate()["loss"]
        records = [trainer.train_step() for _ in range(8)]
        after = trainer.evaluate()["loss"]
    finally:
        trainer.close()
    assert trainer.step == 8 and [r["consumed_micro_batches"] for r in records] == list(range(1, 9))
    assert after < before, (before, after)


def test_save_then_a_new_trainer_resumes_to_the_same_next_step(tmp_path, one_rank):
    cfg = _trainer_config(tmp_path, "resume")
    first = Trainer(cfg)
    try:
        first.train_step()
        first.train_step()
        saved = first.save()
        expected = first.train_step()
    finally:
        first.close()
    second = Trainer(cfg)
    try:
        assert second.resume() == saved
        assert (second.step, second.consumed) == (2, 2)
        got = second.train_step()
    finally:
        second.close()
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6, rel=0)
    assert got["consumed_micro_batches"] == expected["consumed_micro_batches"] == 3
