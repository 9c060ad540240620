"""`deepspeed --num_gpus 2 launch/derive.py` splits calibration over ranks and derives the same student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import deepspeed_launcher

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_two_ranks_derive_the_same_student_as_one(tmp_path):
    from safetensors.torch import load_file

    args = [
        "--config",
        "configs/tiny/derive.yaml",
        "derive.search=null",
        "derive.target.num_layers=4",
        "derive.target.hidden_size=96",
        "derive.target.intermediate_size=256",
        "derive.calibration_samples=8",
        "derive.eval_samples=4",
        "derive.masking.sparsity=0.2",
        "derive.plots=false",
        "derive.depth_methods=[block_importance,perplexity,magnet_grad]",
        "data.seq_len=128",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd, out in (
        ([sys.executable, "launch/derive.py"], one),
        ([*deepspeed_launcher(2), "launch/derive.py"], two),
    ):
        run = subprocess.run(
            [*cmd, *args, f"derive.output={out}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = (json.loads((d / "derivation.json").read_text()) for d in (one, two))
    assert (a["calibration"]["ranks"], b["calibration"]["ranks"]) == (1, 2)
    assert a["kept"] == b["kept"]
    for key in ("block_importance", "perplexity", "magnet_grad"):
        assert a["scores"]["depth"][key] == pytest.approx(b["scores"]["depth"][key], rel=1e-9, abs=1e-12)
    assert a["scores"]["channels"] == pytest.approx(b["scores"]["channels"], rel=1e-9)
    assert a["held_out_loss"] == pytest.approx(b["held_out_loss"], rel=1e-9)
    ma, mb = load_file(one / "masks.safetensors"), load_file(two / "masks.safetensors")
    assert all((ma[k] == mb[k]).all() for k in ma)
