"""Helpers our lm-eval task YAMLs reference with `!function utils.<name>`.

No llmdistill imports: the plain `lm_eval` CLI loads them with only `--include_path evals/tasks` (in an
installed llmdistill: `--include_path $(python -c "import llmdistill.evaluate as e; print(e.TASKS_DIR)")`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BUILD_COMMAND = "python -m llmdistill.cli build-tasks"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def task_data_dir() -> Path:
    """Where `llmdistill.evaluate.task_data.task_data_dir()` builds the data: <LLMDISTILL_CACHE>/eval-data.

    The same rule as llmdistill.cache_dir (a test checks that they agree), repeated here so that the
    plain lm_eval CLI needs nothing but this directory.
    """
    return Path(os.environ.get("LLMDISTILL_CACHE", Path.home() / ".cache" / "llmdistill")) / "eval-data"


def resolve_data_file(data_file: str) -> Path:
    """A task's data file: absolute, or relative to the task data directory."""
    path = Path(data_file)
    return path if path.is_absolute() else task_data_dir() / path


def load_task_data(data_file: str, **_metadata):
    """The `custom_dataset` of our tasks: one jsonl file as the `test` split.

    lm-eval passes the task's metadata (version, model args) with `dataset_kwargs`; only `data_file` matters.
    """
    import datasets

    path = resolve_data_file(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"task data not built: {path} is missing; build it with `{BUILD_COMMAND}`")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})


def identifier_exact_match(doc: dict, results: list[str]) -> dict:
    """1 when the generation starts with exactly the expected identifier (leading whitespace ignored).

    The model may keep generating after the identifier (`(`, `.`, ...): only the first identifier counts.
    """
    found = _IDENTIFIER.match(results[0].lstrip())
    return {"exact_match": float(found is not None and found.group(0) == doc["target"])}
