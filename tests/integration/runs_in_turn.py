"""Several `llmdistill train` runs one after another in one launch of 2 ranks, for the tests that only need
each run's log and summary: the launcher, the imports and the process group, most of a tiny run's time, are
paid once. Each run is the command's own (its argument parsing, `train`), in its own run directory; an
error that every rank raised is recorded as the run's result and the next run starts.

As a script (`deepspeed launch ... runs_in_turn.py SPEC`, SPEC a JSON file {name: [train arguments]}) every
rank runs them all; `run_in_turn` starts it and reads back what each run left.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ != "__main__":
    from conftest import REPO, deepspeed_launcher, read_log


def _run_all(spec_path: Path) -> None:
    from llmdistill.cli import _load, build_parser
    from llmdistill.config import LLMDistillError
    from llmdistill.distributed import leave_process_group
    from llmdistill.train import train

    runs = json.loads(spec_path.read_text())
    for name, args in runs.items():
        try:
            train(_load(build_parser().parse_args(["train", *args])))
        except LLMDistillError as err:
            if not err.every_rank:
                raise  # another rank may be inside a collective: only a failure of every rank is safe
            if os.environ.get("RANK") == "0":
                (spec_path.parent / f"{name}.error").write_text(str(err))
    leave_process_group()  # as llmdistill's commands do: left to exit, gloo's threads may abort the process


def run_in_turn(tmp_path: Path, runs: dict[str, list[str]], timeout: int = 900) -> dict[str, dict]:
    """Each run's {"log", "summary"} (or {"error"}); its arguments should put it at
    run.output_dir=`tmp_path`, run.name=<its name>."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    result = subprocess.run(
        [*deepspeed_launcher(2), str(Path(__file__).resolve()), str(spec)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = {}
    for name in runs:
        error = tmp_path / f"{name}.error"
        if error.exists():
            out[name] = {"error": error.read_text()}
        else:
            summary = json.loads((tmp_path / name / "summary.json").read_text())
            out[name] = {"log": read_log(tmp_path / name), "summary": summary}
    return out


def summary(run: dict) -> dict:
    """A run's summary.json, once it is known to have finished."""
    assert "error" not in run, run["error"]
    return run["summary"]


if __name__ == "__main__":
    _run_all(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
