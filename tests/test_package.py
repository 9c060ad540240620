"""The built wheel, installed into a fresh venv, runs the demo and `llmdistill eval` from an empty directory.

Proves that an installed llmdistill (not editable, no checkout on its path) finds its configs, lm-eval tasks
and embedded teacher: `pip wheel .`, a venv that sees this environment's dependencies but not the checkout,
then a short demo (derive, distil on 2 DeepSpeed ranks, lm-eval) and the README's eval command.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
# Where the installed package's module, configs and lm-eval tasks are.
WHERE = (
    "import llmdistill.cli as c, llmdistill.evaluate as e; print(c.__file__, c.PACKAGED_CONFIGS, e.TASKS_DIR)"
)

# The demo, shortened: a small calibration and search, a few steps on short sequences, a small lm-eval subset.
DERIVE_QUICK = [
    "derive.calibration_samples=8",
    "derive.eval_samples=4",
    "derive.search.max_candidates=2",
    "derive.plots=false",
    "data.seq_len=64",
    "data.train.max_documents=40",
]
TRAIN_QUICK = [
    "train.max_steps=4",
    "train.eval_every=2",
    "train.save_every=2",
    "train.eval_batches=2",
    "train.warmup_steps=1",
    "train.micro_batch_size=4",
    "train.progress=false",
    "data.seq_len=64",
    "data.train.path=embedded:validation",
    "eval.limit=4",
    "eval.max_length=256",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the llmdistill wheel; its dependencies come from this interpreter's packages."""
    root = tmp_path_factory.mktemp("package")
    # Build from a copy: an in-tree build leaves build/ behind, whose stale files a later wheel would carry.
    source = root / "source"
    skip = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    wheel_dir = root / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir]
    subprocess.run([*build, source], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("llmdistill-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*install, wheel], check=True, capture_output=True, timeout=300)
    # `venv --system-site-packages` would give the base interpreter's packages, not this environment's: add
    # this environment's site-packages as a plain path instead (its .pth files, among them an editable
    # llmdistill's finder, are not run), after the venv's own site-packages that holds the wheel. Written
    # after the install, so that pip never sees (nor offers to replace) this environment's llmdistill.
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(
        env,
        PATH=f"{venv / 'bin'}:{env['PATH']}",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_and_eval_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = _env(installed)
    where = subprocess.run(
        [installed / "bin" / "python", "-c", WHERE],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    for path in (Path(p) for p in where.stdout.split()):  # the module, its configs and its lm-eval tasks
        assert path.is_relative_to(installed) and path.exists() and not path.is_symlink(), path

    llmdistill = str(installed / "bin" / "llmdistill")
    derive = [a for o in DERIVE_QUICK for a in ("--derive-set", o)]
    demo = [llmdistill, "demo", "--master-port", str(free_port()), *derive, *TRAIN_QUICK]
    run = subprocess.run(demo, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    summary = json.loads((work / "runs" / "tiny-distill" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert (work / "runs" / "tiny-distill" / "student" / "config.json").is_file()
    assert "llmdistill_code_nextline" in run.stdout  # the demo's lm-eval table

    # The README's eval command, its config shipped in the package: the teacher vs the demo's student.
    out = work / "eval"
    cmd = [llmdistill, "eval", "--config", "configs/tiny/eval.yaml", "eval.limit=4", f"eval.output_dir={out}"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["teacher", "tiny-distill"]
    for task in ("llmdistill_code_bpb", "llmdistill_code_nextline", "llmdistill_code_identifier"):
        assert report["primary"][task] is not None, task
    assert (out / "results.md").is_file() and (out / "scores.png").is_file()
    assert not (work / "configs").exists()  # nothing was copied next to the user's files
