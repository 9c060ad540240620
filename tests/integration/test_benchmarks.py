"""The benchmark scripts run and print their ratios (a smoke test on tiny sizes, so that a borrowed GPU's
minutes never go to a broken script). No timing is asserted: the figures belong to README, not to CI."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "evals" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result


def test_bench_step_prints_each_modes_ratio_setup_and_override():
    override = "train.grad_clip=0.5"
    out = _run(
        "bench_step.py",
        *("--modes", "ce,kd", "--batch", "2", "--seq-len", "64"),
        *("--rounds", "2", "--steps", "1", "--warmup", "1", "--set", override),
    ).stdout
    assert out.splitlines()[0].endswith(f"; {override}")
    for mode in ("ce", "kd"):
        ratio = re.search(
            rf"^{mode}: step time ours/reference ([\d.]+) \(median\), ([\d.]+) \(min\)", out, re.M
        )
        assert ratio and float(ratio[1]) > 0 and float(ratio[2]) > 0, out
        assert re.search(
            rf"^{mode}: setup phases config [\d.]+ s, .*engine [\d.]+ s.*; warm-up steps", out, re.M
        )


def test_bench_losses_prints_memory_and_speed_ratios_per_variant():
    sizes = ("--tokens", "128", "--hidden", "32", "--vocab", "512", "--repeats", "1")
    out = _run("bench_losses.py", *sizes, "--losses", "fkl,jsd").stdout
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("loss "))
    columns = re.split(r"\s{2,}", header.strip())
    for loss in ("fkl", "jsd"):
        row = dict(
            zip(columns, next(line for line in lines if line.startswith(loss + " ")).split(), strict=True)
        )
        for variant in ("ours", "head"):
            assert float(row[f"mem {variant}"]) > 0, row
            assert float(row[f"speed {variant}"].rstrip("x")) > 0, row


def test_bench_losses_refuses_a_loss_it_has_no_naive_version_of():
    result = _run("bench_losses.py", "--losses", "fkl,ce", returncode=2)
    assert "--losses: no naive version of ce" in result.stderr
