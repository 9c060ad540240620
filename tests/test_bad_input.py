"""Bad input, tried as a hostile user would: each row is one `llmdistill train` command that must fail with
exit code 2, one `error: ...` line naming the field or file, and nothing loaded or written (no config.yaml,
no checkpoint). Most rows run `llmdistill.cli.main` in this process (a subprocess costs seconds of imports
per row); a few run the real command line end to end.
"""

import json
import shutil
import signal
import time

import pytest
import torch
from conftest import QUICK, run_cli, tiny_gemma2

from llmdistill.cli import main
from llmdistill.data import train_bpe_tokenizer
from llmdistill.models import EMBEDDED_TEACHER


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The broken files and directories the rows point to."""
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "non_utf8.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "body.jsonl").write_text("".join(json.dumps({"body": f"row {i} " * 50}) + "\n" for i in range(4)))
    (tmp / "tiny.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    # a few sequences of 64 tokens: fewer than one batch of 4
    (tmp / "short.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 12}) + "\n")
    (tmp / "no_data").mkdir()
    (tmp / "no_data" / "notes.md").write_text("not a data file")
    (tmp / "list.yaml").write_text("- train\n- max_steps: 3\n")
    other_text = iter(["some other text to learn from " * 40])
    train_bpe_tokenizer(other_text, vocab_size=300).save_pretrained(tmp / "other_tokenizer")
    truncated = tmp / "truncated_teacher"
    shutil.copytree(EMBEDDED_TEACHER, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_config = tmp / "bad_config_teacher"
    shutil.copytree(EMBEDDED_TEACHER, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (tmp / "no_config_student").mkdir()
    (tmp / "no_config_student" / "model.safetensors").write_bytes(b"")
    half = tmp / "half_checkpoint"  # a checkpoint directory a crash left without its COMPLETE marker
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    damaged = tmp / "damaged_checkpoint"  # complete, but a file it recorded is gone
    damaged.mkdir()
    (damaged / "COMPLETE").write_text(
        json.dumps({"step": 2, "consumed_micro_batches": 2, "files": {"mp_rank_00_model_states.pt": [9, ""]}})
    )
    # A tiny Gemma-2 (soft-capped attention logits) on the embedded teacher's tokenizer.
    tiny_gemma2(num_hidden_layers=2).save_pretrained(tmp / "gemma2_teacher")
    for f in EMBEDDED_TEACHER.glob("tokenizer*"):
        shutil.copy(f, tmp / "gemma2_teacher" / f.name)
    other_shape = tmp / "other_shape_checkpoint"
    other_shape.mkdir()
    (other_shape / "COMPLETE").write_text(
        json.dumps({"step": 2, "consumed_micro_batches": 2, "model_shape": {"hidden_size": 96}, "files": {}})
    )
    return tmp


MIXED = "cannot be mixed with"
# (id, overrides ({inputs}: the inputs fixture's directory), words the error line must hold)
ROWS = [
    # config values
    ("unknown_key", ["train.max_stepz=3"], "train.max_stepz: unknown key"),
    ("wrong_type", ["train.max_steps=lots"], "train.max_steps: Input should be a valid integer"),
    ("lr_inf", ["train.lr=.inf"], "train.lr: Input should be a finite number"),
    ("negative_weight", ["loss=[{name: fkl, weight: -1}]"], "loss.0.weight: Input should be greater than"),
    ("nan_weight", ["loss=[{name: fkl, weight: .nan}]"], "loss.0.weight: Input should be a finite number"),
    ("nan_loss_param", ["loss=[{name: fkl, temperature: .nan}]"], "temperature: Input should be a finite"),
    ("nan_beta", ["train.betas=[0.9, .nan]"], "train.betas.1: Input should be a finite number"),
    ("beta_above_one", ["train.betas=[0.9, 1.5]"], "train.betas: Value error, each must be in [0, 1)"),
    ("inf_grad_clip", ["train.grad_clip=.inf"], "train.grad_clip: Input should be a finite number"),
    ("nan_min_lr_ratio", ["train.min_lr_ratio=.nan"], "train.min_lr_ratio: Input should be a finite"),
    ("grad_accum_zero", ["train.grad_accum=0"], "train.grad_accum: Input should be greater than 0"),
    ("config_is_a_list", ["--config", "{inputs}/list.yaml"], "must hold a mapping at the top level"),
    # the objective
    ("alm_with_fkl", ["loss=[{name: alm}, {name: fkl}]"], MIXED + " ['fkl']"),
    ("uld_with_hidden_mse", ["loss=[{name: uld}, {name: hidden_mse}]"], MIXED + " ['hidden_mse']"),
    ("alm_with_sinkhorn", ["loss=[{name: alm}, {name: ce}, {name: sinkhorn}]"], MIXED + " ['sinkhorn']"),
    ("unknown_loss_param", ["loss=[{name: fkl, beta: 0.5}]"], "loss.0 (fkl): unknown parameter(s) ['beta']"),
    ("balance_without_a_task_term", ["balance={normalize: task}"], "balance.normalize=task: no loss term is"),
    ("zero_temperature", ["loss=[{name: fkl, temperature: 0}]"], "loss.0.temperature (fkl): Input should be"),
    ("alm_divergence", ["loss=[{name: alm, divergence: kl}]"], "loss.0.divergence (alm): Input should be"),
    # what a CPU machine lacks (CI's: no GPU, no fp16, neither flash-attn nor liger-kernel)
    *(
        []
        if torch.cuda.is_available()
        else [
            (
                "flash_attention_here",
                ["student.attn_implementation=flash_attention_2"],
                "needs the flash-attn",
            ),
            ("liger_here", ["train.liger=true"], "train.liger"),
            (
                "cuda_without_a_gpu",
                ["train.device=cuda"],
                "train.device=cuda: this machine has 0 cuda device(s)",
            ),
            ("fp16_on_a_cpu", ["train.dtype=float16"], "train.dtype=float16: DeepSpeed's cpu accelerator"),
        ]
    ),
    (
        "no_teacher_for_fkl",
        [
            "teacher.source=none",
            "student.from_teacher=null",
            "student.config={model_type: llama, vocab_size: 2048, hidden_size: 64, "
            "intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}",
            "student.tokenizer=embedded",
        ],
        "needs a teacher, but teacher.source is 'none'",
    ),
    # teacher sources
    (
        "missing_vllm_cache",
        ["teacher.source=vllm_cache", "teacher.cache.dir={inputs}/no_cache"],
        "teacher.cache.dir={inputs}/no_cache: no manifest.json",
    ),
    (
        "dead_vllm_server",  # port 9 (discard): nothing listens there
        [
            "teacher.source=vllm_server",
            "teacher.server.urls=[http://127.0.0.1:9]",
            "teacher.server.retries=0",
        ],
        "teacher.server.urls: no teacher server answers at http://127.0.0.1:9",
    ),
    (
        "dead_on_policy_scorer",
        ["teacher.source=on_policy", "teacher.server.urls=[http://127.0.0.1:9]", "teacher.server.retries=0"],
        "teacher.server.urls: no teacher server answers at http://127.0.0.1:9",
    ),
    (
        "no_student_server",
        [
            "teacher.source=on_policy",
            "teacher.on_policy.scorer=hf",
            "teacher.on_policy.generator=vllm_server",
            "teacher.on_policy.server.urls=[http://127.0.0.1:9]",
            "teacher.on_policy.server.retries=0",
        ],
        "teacher.on_policy.server.urls: no student server answers at http://127.0.0.1:9",
    ),
    (
        "server_top_k_above_the_vocabulary",  # the embedded teacher has 2048 tokens
        [
            "teacher.source=vllm_server",
            "teacher.server.urls=[http://127.0.0.1:9]",
            "teacher.server.retries=0",
            "teacher.server.top_k=4096",
        ],
        "teacher.server.top_k=4096 is larger than the teacher's vocabulary (2048 tokens",
    ),
    (
        "on_policy_top_k_above_the_vocabulary",
        [
            "teacher.source=on_policy",
            "teacher.server.urls=[http://127.0.0.1:9]",
            "teacher.server.retries=0",
            "teacher.server.top_k=2049",
        ],
        "teacher.server.top_k=2049 is larger than the teacher's vocabulary (2048 tokens",
    ),
    (
        "cache_top_k_above_the_vocabulary",
        ["teacher.source=vllm_cache", "teacher.cache.dir={inputs}/no_cache", "teacher.cache.top_k=4096"],
        "teacher.cache.top_k=4096 is larger than the teacher's vocabulary (2048 tokens",
    ),
    # DeepSpeed
    ("offload_param_stage1", ["deepspeed.offload_param=true"], "offload_param needs deepspeed.zero_stage=3"),
    ("missing_ds_file", ["deepspeed.config_file={inputs}/ds.json"], "deepspeed.config_file not found"),
    # models and tokenizers
    ("truncated_teacher", ["teacher.path={inputs}/truncated_teacher"], "model.safetensors is damaged"),
    ("bad_teacher_config", ["teacher.path={inputs}/bad_config_teacher"], "teacher.path: {inputs}/bad_config"),
    (
        "student_without_config",
        ["student.from_teacher=null", "student.path={inputs}/no_config_student"],
        "student.path: {inputs}/no_config_student is not a Hugging Face model directory",
    ),
    ("missing_teacher", ["teacher.path={inputs}/missing"], "teacher.path: model path not found"),
    ("missing_tokenizer", ["student.tokenizer={inputs}/none"], "student.tokenizer: model path not found"),
    (
        "other_tokenizer",
        ["student.tokenizer={inputs}/other_tokenizer"],
        "tokenizers differ (teacher: 2048 tokens, student: ",
    ),
    ("seq_len_above_teacher", ["data.seq_len=4096"], "data.seq_len=4096 is above the teacher's maximum"),
    (
        "softcapped_teacher_under_sdpa",  # transformers' sdpa path drops Gemma-2's attention soft-capping
        ["teacher.path={inputs}/gemma2_teacher"],
        "teacher.attn_implementation=sdpa ignores the model's attn_logit_softcapping=50.0",
    ),
    (
        "softcapped_student_under_sdpa",
        ["teacher.path={inputs}/gemma2_teacher", "teacher.attn_implementation=eager"],
        "student.attn_implementation=sdpa ignores the model's attn_logit_softcapping=50.0",
    ),
    (
        "from_teacher_layer_types_of_another_depth",
        [
            "teacher.path={inputs}/gemma2_teacher",
            "teacher.attn_implementation=eager",
            "student.attn_implementation=eager",
            "student.from_teacher={num_hidden_layers: 3, layer_types: [full_attention]}",
        ],
        "student.from_teacher: Class validation error for validator 'validate_layer_type': ValueError:",
    ),
    ("peft_matches_nothing", ["student.peft={target_modules: [nothing]}"], "student.peft.target_modules"),
    (
        "unknown_eval_task",
        ["eval={every: 2, tasks: [no_such_task], include_defaults: false}"],
        "['no_such_task']",
    ),
    # data
    ("non_utf8", ["data.train.path={inputs}/non_utf8.jsonl"], "non_utf8.jsonl line 1: not UTF-8"),
    ("missing_train", ["data.train.path={inputs}/missing.jsonl"], "data file not found"),
    ("empty_train", ["data.train.path={inputs}/empty.jsonl"], "empty.jsonl is empty"),
    ("wrong_text_field", ["data.train.path={inputs}/body.jsonl"], "no field 'text' (fields: ['body'])"),
    ("dir_without_data", ["data.train.path={inputs}/no_data"], "no data files (.jsonl/.json/.txt/.parquet)"),
    ("missing_validation", ["data.validation.path={inputs}/missing.jsonl"], "data file not found"),
    (
        "bad_validation_field",
        ["data.validation={path: {inputs}/body.jsonl, text_field: content}"],
        "no field 'content'",
    ),
    # resuming
    ("missing_resume_dir", ["train.resume={inputs}/gone"], "train.resume: checkpoint directory not found"),
    ("resume_half_written", ["train.resume={inputs}/half_checkpoint"], "is not a complete checkpoint"),
    ("resume_damaged", ["train.resume={inputs}/damaged_checkpoint"], "mp_rank_00_model_states.pt is missing"),
    ("resume_other_shape", ["train.resume={inputs}/other_shape_checkpoint"], "hidden_size 96 -> 128"),
]

# Rows caught once the datasets are built (before the models): they need the process group of one rank.
AFTER_DATA_BUILD = [
    ("too_few_tokens", ["data.train.path={inputs}/tiny.jsonl"], "has fewer than 65 tokens"),
    ("validation_below_one_batch", ["data.validation.path={inputs}/short.jsonl"], "fewer than one batch"),
    (
        "train_below_one_batch",
        ["data.train.path={inputs}/short.jsonl"],
        "data.train: 2 sequences, fewer than",
    ),
]


def _args(overrides, inputs, out):
    args = [o.replace("{inputs}", str(inputs)) for o in overrides]
    # A row that is wrongly accepted trains one step only.
    return [
        "train",
        *QUICK,
        "train.max_steps=1",
        "train.export=false",
        f"run.output_dir={out}",
        "run.name=bad",
        *args,
    ]


def _check_refused(code, err, words, out):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], err[-3000:]
    assert len(errors[0].splitlines()) == 1
    # nothing written: the run directory's config.yaml, log and checkpoints appear only once the checks pass
    assert not (out / "bad").exists(), sorted(p.name for p in (out / "bad").iterdir())


@pytest.mark.parametrize("overrides, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_before_anything_loads(overrides, words, inputs, tmp_path, capsys):
    words = words.replace("{inputs}", str(inputs))
    handler = signal.getsignal(signal.SIGTERM)
    code = main(_args(overrides, inputs, tmp_path))
    _check_refused(code, capsys.readouterr().err, words, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's preemption handler is given back


@pytest.mark.parametrize(
    "overrides, words", [r[1:] for r in AFTER_DATA_BUILD], ids=[r[0] for r in AFTER_DATA_BUILD]
)
def test_bad_data_is_refused_before_the_models_load(overrides, words, inputs, tmp_path, capsys, one_rank):
    code = main(_args(overrides, inputs, tmp_path))
    _check_refused(code, capsys.readouterr().err, words, tmp_path)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.lr=.inf"], "train.lr: Input should be a finite number"),
        (["loss=[{name: alm}, {name: fkl}]"], MIXED),
        (["data.train.path={inputs}/non_utf8.jsonl"], "not UTF-8"),
    ],
    ids=["lr_inf", "alm_with_fkl", "non_utf8"],
)
def test_the_command_line_prints_only_the_error(overrides, words, inputs, tmp_path):
    """End to end, as a user runs it: stderr holds the one line and nothing else, and it comes in seconds
    (the models and DeepSpeed take far longer to load; generous for a loaded machine)."""
    start = time.monotonic()
    result = run_cli(_args(overrides, inputs, tmp_path))
    elapsed = time.monotonic() - start
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr[-3000:]
    _check_refused(result.returncode, result.stderr, words, tmp_path)
    assert elapsed < 60, elapsed
