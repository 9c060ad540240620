"""Pushing a student to the hub, up to the network call (nothing here reaches the hub), and its errors."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from llmdistill import hub
from llmdistill.config import ConfigError, load_config


@pytest.fixture
def run(finished_runs, tmp_path):
    """A copy of a finished run: pushing rewrites its card."""
    return shutil.copytree(finished_runs["lora"], tmp_path / "lora")


def test_push_uploads_exactly_the_student_folder_with_its_card(run, monkeypatch):
    calls = []
    # The one function that talks to the hub is replaced by a recorder: everything before it runs for real.
    monkeypatch.setattr(hub, "upload", lambda *args: calls.append(args) or "https://hub/commit/1")
    url = hub.push_student(run, "org/tiny-student", private=True, revision="v1", commit_message="first")
    assert url == "https://hub/commit/1"
    [(folder, files, repo_id, private, revision, message)] = calls
    assert folder == run / "student" and (repo_id, private, revision, message) == (
        "org/tiny-student",
        True,
        "v1",
        "first",
    )
    on_disk = sorted(p.name for p in (run / "student").iterdir())
    assert files == on_disk
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    # upload_folder selects with these as allow_patterns: the hub client's own filter keeps exactly them.
    others = ["checkpoints/step_00000003/model.pt", "README.md.bak", "student.tmp/model.safetensors"]
    assert sorted(filter_repo_objects(on_disk + others, allow_patterns=files)) == files
    card = ModelCard.load(run / "student" / "README.md")
    assert "lora" in card.data.tags
    assert 'from_pretrained("org/tiny-student")' in card.text  # the usage example names the repository


def test_push_when_offline_is_one_line(run):
    result = run_cli(["push", str(run), "--repo-id", "org/tiny-student"], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot push to org/tiny-student: the hub is offline here (HF_HUB_OFFLINE")
    # The card was written before the network call: the folder is ready for a push from elsewhere.
    assert (run / "student" / "README.md").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no student", "no exported student in"),
        ("bad repo id", "--repo-id 'not a/repo' is not a hub repository name"),
        ("not a run", "is not a finished run directory: no config.yaml"),
    ],
)
def test_push_refuses_bad_input_with_one_line(run, tmp_path, case, message):
    repo_id = "org/name"
    if case == "no student":
        shutil.rmtree(run / "student")
    elif case == "bad repo id":
        repo_id = "not a/repo"
    else:
        run = tmp_path / "empty"
        (run / "student").mkdir(parents=True)
        (run / "student" / "config.json").write_text("{}")
    result = run_cli(["push", str(run), "--repo-id", repo_id])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


def test_push_to_hub_config():
    cfg = load_config(None, ["train.push_to_hub={repo_id: org/student, private: true}"])
    assert cfg.train.push_to_hub.repo_id == "org/student" and cfg.train.push_to_hub.private
    assert load_config(None, []).train.push_to_hub is None
    with pytest.raises(ConfigError, match="train.push_to_hub.repo_id"):
        load_config(None, ["train.push_to_hub={repo_id: 'a b'}"])
    with pytest.raises(ConfigError, match="train.push_to_hub needs train.export"):
        load_config(None, ["train.push_to_hub={repo_id: org/x}", "train.export=false"])


def test_a_push_at_the_end_of_training_is_checked_before_it(tmp_path):
    with pytest.raises(hub.HubError, match="the hub is offline here"):
        hub.check_can_push("org/student")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(hub.HubError, match="is not a hub repository name"):
        hub.check_can_push("org/a b")
    # Online but not logged in (an empty HF home, no HF_TOKEN): nothing is sent, the missing token is named.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path))
    code = "from llmdistill.hub import check_can_push; check_can_push('org/student')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "no Hugging Face token" in result.stderr.strip().splitlines()[-1]
