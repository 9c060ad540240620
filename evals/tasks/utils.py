"""Helpers our lm-eval task YAMLs reference with `!function utils.<name>`.

No llmdistill imports: the plain `lm_eval` CLI loads them with only `--include_path evals/tasks`.
"""

from __future__ import annotations

import re
from pathlib import Path

# evals/tasks/utils.py -> the repository root, so a task's `data_file` works from any working directory.
_REPO = Path(__file__).resolve().parent.parent.parent
BUILD_COMMAND = "python -m llmdistill.evaluate build-tasks"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resolve_data_file(data_file: str) -> Path:
    """A task's data file: absolute, relative to the working directory, or relative to the repository root."""
    path = Path(data_file)
    if path.is_absolute() or path.exists():
        return path
    return _REPO / path


def load_task_data(data_file: str, **_metadata):
    """The `custom_dataset` of our tasks: one jsonl file as the `test` split.

    lm-eval passes the task's metadata (version, model args) with `dataset_kwargs`; only `data_file` matters.
    """
    import datasets

    path = resolve_data_file(data_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"task data not built: {path} is missing; build it with `{BUILD_COMMAND}` "
            f"(run from the repository root)"
        )
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})


def identifier_exact_match(doc: dict, results: list[str]) -> dict:
    """1 when the generation starts with exactly the expected identifier (leading whitespace ignored).

    The model may keep generating after the identifier (`(`, `.`, ...): only the first identifier counts.
    """
    found = _IDENTIFIER.match(results[0].lstrip())
    return {"exact_match": float(found is not None and found.group(0) == doc["target"])}
