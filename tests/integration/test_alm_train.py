"""The tiny cross-tokenizer run under 2-rank DeepSpeed: the embedded BPE teacher into a random Llama with the
SentencePiece student tokenizer (configs/tiny/alm.yaml, shortened). Bits-per-byte on held-out text must
improve over the start and end better than the same student trained with CE alone for the same steps.

About a minute on 2 cores (two runs in one launch)."""

from __future__ import annotations

import pytest
from conftest import REPO

from .runs_in_turn import run_in_turn, summary

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


def _args(tmp_path, name: str, extra: list[str]) -> list[str]:
    config = str(REPO / "configs" / "tiny" / "alm.yaml")
    return ["--config", config, f"run.output_dir={tmp_path}", f"run.name={name}", *SHORT, *extra]


def test_alm_beats_ce_on_bits_per_byte(tmp_path):
    # The same student, data, seed and steps; next-token CE on its own tokens, no teacher (one launch).
    ce_only = ["loss=[{name: ce}]", "teacher.source=none"]
    runs = run_in_turn(tmp_path, {"alm": _args(tmp_path, "alm", []), "ce": _args(tmp_path, "ce", ce_only)})
    alm, ce = summary(runs["alm"]), summary(runs["ce"])
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
