"""Shared test helpers: offline environment, running our CLI in a subprocess, quick-run overrides."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmdistill.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A short run on the embedded teacher: a 2-layer student, short sequences, the small validation split as data.
QUICK = [
    "data.train.path=embedded:validation",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "train.warmup_steps=2",
    "train.progress=false",
    "student.from_teacher={num_hidden_layers: 2, intermediate_size: 128}",
]
# A GPU run's usual precision for QUICK's runs: bf16 weights and activations throughout.
BF16 = ["train.dtype=bfloat16", "student.dtype=bfloat16", "teacher.dtype=bfloat16"]


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, launcher: list[str] | None = None):
    """Run `python -m llmdistill.cli ...` (or a launcher in front of launch/train.py) and return the
    result."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = (
        [*launcher, str(REPO / "launch" / "train.py"), *args]
        if launcher
        else [sys.executable, "-m", "llmdistill.cli", *args]
    )
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_log(run_dir: Path) -> dict[int, dict]:
    """logs.jsonl as {step: training record}; a step logged twice (after a crash) keeps its last record."""
    steps = {}
    for line in (run_dir / "logs.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps[rec["step"]] = rec
    return steps


def nan_teacher(tmp_path: Path) -> Path:
    """The embedded teacher with every weight NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmdistill.models import EMBEDDED_TEACHER

    teacher = tmp_path / "nan-teacher"
    shutil.copytree(EMBEDDED_TEACHER, teacher)
    weights = load_file(teacher / "model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, teacher / "model.safetensors"
    )
    return teacher


def deepspeed_launcher(ranks: int = 2) -> list[str]:
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
    ]


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from llmdistill.models import EMBEDDED_TEACHER, load_tokenizer

    return load_tokenizer(str(EMBEDDED_TEACHER))


@pytest.fixture(scope="session")
def tiny_llama():
    """A small random Llama (GQA, head_dim 32) on the embedded tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma2(**config):
    """A tiny random Gemma-2 on the embedded tokenizer's vocabulary (soft-capped attention logits by default;
    `config` overrides its fields)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    fields = dict(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
    )
    return Gemma2ForCausalLM(Gemma2Config(**fields | config)).eval()


@pytest.fixture(scope="session")
def softcapped_gemma2():
    """A tiny Gemma-2 whose logits are soft-capped after its head, so not its head applied to its states."""
    return tiny_gemma2(final_logit_softcapping=0.5)


def is_config_field(key: str) -> bool:
    """Whether a dotted key (`teacher.server.urls`, `eval`) names a field of the config, the optional sections
    included."""
    from llmdistill.config import Config, DeriveConfig, DeriveTarget, EvalConfig

    node = Config(eval=EvalConfig(), derive=DeriveConfig(target=DeriveTarget())).model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def markdown_tables(text: str) -> dict[str, dict[str, list[str]]]:
    """Every markdown table of `text`: {first header cell: {first cell of a row: the row's other cells}}."""
    tables, current = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = tables.setdefault(cells[0], {})
        elif not set(line) <= set("|-"):
            current[cells[0]] = cells[1:]
    return tables


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory):
    """Two short real runs for the card, hub and report tests (~1.5 min together): "derived" trains a student
    that `llmdistill derive` pruned from the embedded teacher and runs lm-eval at the end; "lora" trains a
    LoRA copy of the teacher, without lm-eval. {name: run directory}."""
    root = tmp_path_factory.mktemp("finished-runs")
    short = ["data.seq_len=64", "train.max_steps=3", "train.eval_batches=2", "train.device=cpu"]
    steps = {
        "derive": [
            "derive",
            "--config",
            "configs/tiny/derive.yaml",
            f"run.output_dir={root}",
            "run.name=derive",
            "data.train.max_documents=50",
            "data.seq_len=64",
            "derive.search=null",
            "derive.target={num_layers: 2, hidden_size: 96}",
            "derive.calibration_samples=4",
            "derive.eval_samples=2",
            "derive.plots=false",
        ],
        "derived": [
            "train",
            *QUICK,
            *short,
            f"run.output_dir={root}",
            "run.name=derived",
            f"student.path={root / 'derive' / 'derived'}",
            "student.from_teacher=null",
            "eval={limit: 5, tasks: [llmdistill_code_nextline]}",
        ],
        "lora": [
            "train",
            "--config",
            "configs/tiny/lora.yaml",
            "data.train.path=embedded:validation",
            *short,
            "train.progress=false",
            f"run.output_dir={root}",
            "run.name=lora",
        ],
    }
    for name, args in steps.items():
        result = run_cli(args)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    return {name: root / name for name in ("derived", "lora")}


@pytest.fixture
def one_rank():
    """A world of one in this process, as a launcher would describe it. The process group stays up for the
    rest of the session (DeepSpeed keeps its own handles on it, so it cannot be rebuilt), but the variables
    are restored, so later subprocesses do not inherit its address."""
    saved = dict(os.environ)
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    yield
    os.environ.clear()
    os.environ.update(saved)
