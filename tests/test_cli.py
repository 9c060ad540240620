"""`llmdistill <command>`: packaged configs found from anywhere, launcher arguments, shims, clear errors.

The commands' real work is tested where it lives (test_evaluate, test_train, integration/); here only what the
front door itself adds. The installed wheel is tested in test_package.py.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, is_config_field, nan_teacher

from llmdistill import cli
from llmdistill.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent


def test_packaged_configs_are_the_checkouts_and_found_from_anywhere(tmp_path, monkeypatch):
    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    shipped, in_checkout = files(cli.PACKAGED_CONFIGS), files(REPO / "configs")
    assert shipped == in_checkout and len(shipped) > 10
    for rel in shipped:  # one copy: the package's configs are the checkout's files, not a copy that may drift
        assert (cli.PACKAGED_CONFIGS / rel).resolve() == (REPO / "configs" / rel).resolve()

    monkeypatch.chdir(tmp_path)
    found = cli.config_path("configs/tiny/eval.yaml")
    assert Path(found) == cli.PACKAGED_CONFIGS / "tiny" / "eval.yaml"
    assert load_config(found).run.name == "tiny-eval"
    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    (tmp_path / "configs" / "tiny" / "eval.yaml").write_text("run: {name: mine}\n")
    assert cli.config_path("configs/tiny/eval.yaml") == "configs/tiny/eval.yaml"  # a local file wins


def test_missing_config_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--config", "configs/tiny/no_such.yaml"]) == 2
    assert "config file not found: configs/tiny/no_such.yaml" in capsys.readouterr().err


def test_launcher_rank_argument_is_ignored(tmp_path):
    """deepspeed and torch.distributed.launch add --local_rank=N (LOCAL_RANK in the environment says it)."""
    assert cli.main(["--local_rank=1", "build-tasks", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "code_bpb.jsonl").is_file()


def test_a_command_that_succeeded_leaves_no_process_group(monkeypatch, capsys):
    """Left to interpreter teardown, gloo's threads may abort a finished run ("terminate called without an
    active exception", a failed job in CI); the group is destroyed on success, and a later command in the
    same process makes a new one."""
    import torch

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # init_distributed sets a world of one; put them back after
    if torch.distributed.is_initialized():  # another in-process test left one up
        torch.distributed.destroy_process_group()
    for _ in range(2):
        assert cli.main(["warm"]) == 0
        assert "deepspeed ready" in capsys.readouterr().out
        assert not torch.distributed.is_initialized()


def test_a_run_every_rank_stopped_together_leaves_no_process_group(tmp_path):
    """A stop the ranks decided together (here every loss is NaN) leaves the group as a success does: left to
    teardown, gloo's threads aborted 2 failed two-rank ZeRO-3 runs in 12 after their error line (exit 250)."""
    leaves = "import sys, torch; from llmdistill import cli; rc = cli.main(sys.argv[1:]); "
    leaves += "print('group up:', torch.distributed.is_initialized()); sys.exit(rc)"
    args = [
        "train",
        *QUICK,
        f"teacher.path={nan_teacher(tmp_path)}",
        "train.max_skipped_steps=1",
        f"run.output_dir={tmp_path}",
    ]
    run = subprocess.run(
        [sys.executable, "-c", leaves, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: stopped at step 0: 1 steps or micro-batches in a row skipped" in run.stderr
    assert run.stdout.strip().splitlines()[-1] == "group up: False"


@pytest.mark.parametrize("command", ["serve-teacher", "cache-teacher"])
def test_teacher_commands_fail_clearly_before_starting_vllm(command, tmp_path, capsys):
    config = "configs/tiny/vllm_server.yaml" if command == "serve-teacher" else "configs/tiny/vllm_cache.yaml"
    missing = tmp_path / "no-such-teacher"
    args = [command, "--config", str(REPO / config), f"teacher.path={missing}", f"run.output_dir={tmp_path}"]
    assert cli.main(args) == 2
    assert f"teacher.path: model path not found: {missing}" in capsys.readouterr().err
    assert not list(tmp_path.rglob("teacher_server.pid"))  # no server was started


def test_serve_student_refuses_a_config_without_a_student_server(tmp_path, capsys):
    config = str(REPO / "configs/tiny/distill.yaml")
    assert cli.main(["serve-student", "--config", config, f"run.output_dir={tmp_path}"]) == 2
    said = capsys.readouterr().err
    assert "teacher.on_policy.generator=vllm_server; this config has teacher.source=hf" in said
    assert not list(tmp_path.rglob("student_server*"))  # nothing written, no server started


@pytest.mark.parametrize("shim", ["eval.py", "train.py", "derive.py", "cache_teacher.py"])
def test_launch_scripts_are_the_cli(shim, tmp_path):
    """launch/*.py pass their arguments (and a launcher's --local_rank) to the same command."""
    run = subprocess.run(
        [sys.executable, str(REPO / "launch" / shim), "--local_rank=0", "--config", "no_such.yaml"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().endswith("config file not found: no_such.yaml")


def test_help_and_docstrings_name_config_fields_that_exist():
    """Config keys named in the commands' help and docstrings (teacher.cache.dir, not the old
    teacher.cache_dir) are fields of the config."""
    texts = [fn.__doc__ or "" for name, fn in vars(cli).items() if name.startswith("cmd_")]
    (commands,) = [a for a in cli.build_parser()._actions if a.choices and "train" in a.choices]
    texts += [sub.format_help() for sub in commands.choices.values()]
    sections = "|".join(Config.model_fields)
    keys = {k for text in texts for k in re.findall(rf"\b(?:{sections})(?:\.[a-z_0-9]+)+", text)}
    assert "teacher.cache.dir" in keys
    assert [key for key in sorted(keys) if not is_config_field(key)] == []
