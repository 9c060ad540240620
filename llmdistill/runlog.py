"""The run's log: logs.jsonl and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the records of logs.jsonl past `last_step`: a resumed run writes those steps again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    # A line cut short by a kill is not JSON: it goes too.
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except ValueError:
        return float("inf")


class RunLog:
    """logs.jsonl and TensorBoard on rank 0; every other rank writes nothing."""

    def __init__(self, run_dir: Path, rank: int, purge_step: int | None = None):
        """`purge_step`: TensorBoard hides the events of earlier segments at this step and after (a resumed
        run's steps past its checkpoint, logged before the interruption)."""
        self.rank = rank
        self.file = self.tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard, rank 0 only

            self.file = (run_dir / "logs.jsonl").open("a")
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for k, v in record.items():
            if isinstance(v, int | float) and k != "time":
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.rank == 0 and self.file is not None:
            self.file.close()
            self.tb.close()
            self.file = self.tb = None
