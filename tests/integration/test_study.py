"""The proof-table script end to end in its smoke version: two arms on 2 DeepSpeed ranks, a few short steps.

Checks that evals/study.py trains each arm as a subprocess, runs lm-eval on the students, and writes a table,
a results JSON with finite figures and a learning-curve PNG (the full study is `configs/tiny/study.yaml`).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_study_smoke_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "evals/study.py", "--config", "configs/tiny/study.yaml", "--smoke"]
        + ["--output", str(out), "--master-port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    assert [row["arm"] for row in results["rows"]] == ["scratch-ce", "scratch-fkl"]
    for row in results["rows"]:
        for key in ("loss", "bpb", "recovery_bpb", "gain_bpb", "tokens_per_s", "wall_seconds"):
            assert math.isfinite(row[key]), (row["arm"], key, row[key])
        # steps x micro batch x seq_len x ranks: the equal budget
        assert row["train_tokens"] == 4 * 2 * 64 * 2
        bpb_task = row["lm_eval"]["llmdistill_code_bpb"]
        assert math.isfinite(bpb_task["value"]) and math.isfinite(bpb_task["recovery"])
    assert results["rows"][0]["gain_bpb"] == 0.0  # the baseline against itself
    for run in results["runs"]:
        assert len(run["curve"]) >= 2 and all(math.isfinite(p["loss"]) for p in run["curve"])

    table = (out / "table.md").read_text()
    assert "| scratch-fkl |" in table and "| teacher |" in table
    assert "| scratch-fkl |" in proc.stdout  # the script prints the table it writes
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_an_unknown_arm_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "evals/study.py", "--config", "configs/tiny/study.yaml", "--smoke"]
        + ["--output", str(out), "--arms", "scratch-ce,scratch-kl"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--arms: ['scratch-kl'] are not arms of configs/tiny/study.yaml" in proc.stderr
    assert not out.exists()
