"""The tiny cross-tokenizer run under 2-rank DeepSpeed: the embedded BPE teacher into a random Llama with the
SentencePiece student tokenizer (configs/tiny/alm.yaml, shortened). Bits-per-byte on held-out text must
improve over the start and end better than the same student trained with CE alone for the same steps.

~3 minutes on 2 cores (two runs of ~1.5 min, most of it start-up)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, deepspeed_launcher, run_cli

pytestmark = pytest.mark.slow

# Train on the small validation split, evaluate on the test split: held-out text neither run trained on.
SHORT = [
    "data.train.path=embedded:validation",
    "data.validation.path=embedded:test",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_batches=4",
    "train.warmup_steps=10",
    "train.max_steps=300",
    "train.eval_every=0",
    "train.save_every=0",
    "train.export=false",
    "train.progress=false",
    "train.resume=never",
]


def run(tmp_path, name: str, extra: list[str]) -> dict:
    config = str(REPO / "configs" / "tiny" / "alm.yaml")
    args = ["--config", config, f"run.output_dir={tmp_path}", f"run.name={name}", *SHORT, *extra]
    result = run_cli(args, timeout=400, launcher=deepspeed_launcher(2))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_alm_beats_ce_on_bits_per_byte(tmp_path):
    alm = run(tmp_path, "alm", [])
    # The same student, data, seed and steps; next-token CE on its own tokens, no teacher.
    ce = run(tmp_path, "ce", ["loss=[{name: ce}]", "teacher.source=none"])
    start = alm["student_eval_start"]["bpb"]
    assert ce["student_eval_start"]["bpb"] == start  # same init, same held-out text
    alm_bpb, ce_bpb = alm["student_eval"]["bpb"], ce["student_eval"]["bpb"]
    print(
        f"\nheld-out bits/byte after {alm['steps']} steps: start {start:.4f}, ALM {alm_bpb:.4f}, "
        f"CE alone {ce_bpb:.4f} (ALM better by {ce_bpb - alm_bpb:.4f})"
    )
    assert alm["world_size"] == 2
    assert alm_bpb < start - 1.0
    assert alm_bpb < ce_bpb
