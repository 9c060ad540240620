"""The trainer as one plain process: exact resume, crash safety, and one-line errors for bad input."""

import collections
import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import BF16, QUICK, nan_teacher, read_log, run_cli

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
    # Steps 5-8 ran twice (before the kill and after the resume from step 4); each is logged once.
    records = [json.loads(line) for line in (tmp_path / "crash" / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in records if "loss" in r] == [log[s]["loss"] for s in range(1, 9)]
    assert _tensorboard_steps(tmp_path / "crash" / "tb", "loss") == list(range(1, 9))


def test_a_bf16_run_tracks_fp32_resumes_bit_for_bit_and_exports_bf16(tmp_path, uninterrupted):
    # A GPU run's usual precision, end to end: DeepSpeed's bf16 engine (fp32 master weights), the loss on
    # bf16 logits, a kill -9 and a resume, the bf16 export and its check at bf16's tolerance.
    from safetensors import safe_open

    from llmdistill.export import EXPORT_TOLERANCE

    straight = _train(tmp_path, "bf16", BF16)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train(tmp_path, "resumed", BF16, env={"LLMDISTILL_FAILPOINT": "checkpoint_complete@4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _train(tmp_path, "resumed", BF16)
    assert resumed.returncode == 0 and "step_00000004" in resumed.stderr, resumed.stderr[-3000:]
    log, again = read_log(tmp_path / "bf16"), read_log(tmp_path / "resumed")
    for step in range(1, 9):
        assert again[step]["loss"] == log[step]["loss"], step
        assert log[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-2), step
    assert any(log[step]["loss"] != uninterrupted[step]["loss"] for step in range(1, 9))  # really bf16
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert 0 < summary["export_max_rel_diff"] < EXPORT_TOLERANCE["bfloat16"]
    with safe_open(str(tmp_path / "bf16" / "student" / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}


def _tensorboard_steps(tb_dir, tag: str) -> list[int]:
    """The steps TensorBoard shows for a scalar, as it reads the event files (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_training_improves_the_student_on_held_out_data(uninterrupted_summary):
    # Per-step losses are on different small batches; held-out loss is on the same tokens before and after.
    assert uninterrupted_summary["student_eval"]["loss"] < uninterrupted_summary["student_eval_start"]["loss"]


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


def test_a_run_whose_every_loss_is_nan_stops_with_one_line(tmp_path, one_rank):
    """A teacher with NaN weights makes every loss NaN: each micro-batch is dropped before its backward, and
    after train.max_skipped_steps of them the run stops, having applied nothing."""
    from llmdistill.train import TrainingStopped

    teacher = nan_teacher(tmp_path)
    cfg = load_config(
        None,
        [
            *QUICK,
            *STEPS,
            f"teacher.path={teacher}",
            "train.max_skipped_steps=3",
            f"run.output_dir={tmp_path}",
            "run.name=nan",
        ],
    )
    trainer = Trainer(cfg)
    try:
        start = [p.detach().clone() for p in trainer.params]
        with pytest.raises(
            TrainingStopped, match=r"stopped at step 0: 3 steps or micro-batches in a row skipped"
        ) as stopped:
            trainer.train_step()
        assert stopped.value.every_rank  # every rank drops together, so the CLI leaves the group on each
        assert trainer.consumed == 3 and trainer.step == 0
        assert all(torch.equal(a, b) for a, b in zip(start, trainer.params, strict=True))
    finally:
        trainer.close()
    assert not (tmp_path / "nan" / "checkpoints").exists()


# Reads that make the host wait for the device on a GPU: a tensor's value (item, tolist, bool/int/float),
# nonzero (its result's size depends on the values), a copy to the CPU, torch.equal.
HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu")


@contextlib.contextmanager
def host_reads(files):
    """Count the host reads made directly by code in `files` (under llmdistill/), keyed by (caller of the
    reading function, reading function, read)."""
    import llmdistill

    roots = tuple(str(Path(llmdistill.__file__).parent / f) for f in files)
    counts = collections.Counter()

    def counting(name, original):
        def read(*args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(roots):
                counts[(frame.f_back.f_code.co_name, frame.f_code.co_name, name)] += 1
            return original(*args, **kwargs)

        return read

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    equal = torch.equal
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    torch.equal = counting("equal", equal)
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.equal = equal


def test_a_step_reads_the_device_once_per_micro_batch_and_once_for_its_metrics(tmp_path, one_rank):
    """The step, the objective and the losses (train.py, distributed.py, losses/) wait for the device once
    per micro-batch: the flag "finite on every rank", summed over the ranks, before the backward. Besides it,
    the shared head pass of fkl + ce looks up the valid positions once (nonzero). The metrics (both terms'
    values, the loss) are read once per optimizer step. Nothing explains a finite micro-batch."""
    cfg = load_config(
        None,
        [
            *QUICK,
            *STEPS,
            "train.grad_accum=3",
            "loss=[{name: fkl}, {name: ce, weight: 0.1}]",
            "train.export=false",
            f"run.output_dir={tmp_path}",
            "run.name=reads",
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer.train_step()  # opens the data stream
        with host_reads(["train.py", "distributed.py", "losses/"]) as counts:
            record = trainer.train_step()
    finally:
        trainer.close()
    assert counts == {
        ("_forward", "all_reduce_sum", "tolist"): 3,
        ("fused_head_terms", "valid_positions", "nonzero"): 3,
        ("train_step", "all_reduce_sum", "tolist"): 1,
    }
    assert record["loss"] == pytest.approx(record["loss/fkl"] + 0.1 * record["loss/ce"], rel=1e-6)


def test_a_dropped_micro_batch_is_explained_by_term_and_input(tmp_path, one_rank):
    """The trainer reads only a flag per micro-batch; once it is set, the objective names the term, the step,
    the micro-batch and the broken input."""
    from llmdistill.train import TrainingStopped

    cfg = load_config(
        None,
        [
            *QUICK,
            *STEPS,
            f"teacher.path={nan_teacher(tmp_path)}",
            "loss=[{name: ce}, {name: fkl, weight: 0.5}]",
            "train.max_skipped_steps=1",
            f"run.output_dir={tmp_path}",
            "run.name=explained",
        ],
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(
            TrainingStopped,
            match=r"micro-batch 0 dropped: loss fkl is nan at step 0, batch 0 \(input_ids \(4, 64\)\): "
            # every value of the teacher's [4, 64, 128] final hidden state
            f"teacher final hidden state has {4 * 64 * 128} NaN/inf values",
        ):
            trainer.train_step()
    finally:
        trainer.close()
