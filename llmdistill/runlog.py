"""The run's log: logs.jsonl, TensorBoard and the other trackers `train.report_to` names, written by rank 0
only."""

from __future__ import annotations

import json
from pathlib import Path

from llmdistill.distributed import all_reduce_sum
from llmdistill.trackers import TrackerError, Trackers


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
    """logs.jsonl, TensorBoard and the trackers on rank 0; every other rank writes nothing.

    The trackers start here, before training: one that cannot start stops every rank with a TrackerError.
    `purge_step`: TensorBoard hides the events of earlier segments at this step and after (a resumed run's
    steps past its checkpoint, logged before the interruption).
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        report_to=("tensorboard",),
        params: dict | None = None,
        name: str = "run",
        resuming: bool = False,
        purge_step: int | None = None,
    ):
        self.rank = rank
        self.file = self.tb = self.trackers = None
        failure = None
        if rank == 0:
            try:
                self.trackers = Trackers(report_to, params or {}, run_dir, name, resuming)
            except TrackerError as err:
                failure = err
        # Every rank must stop, or the others would wait in a collective rank 0 never enters.
        if all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
            raise failure or TrackerError("train.report_to: a tracker failed to start on rank 0")
        if rank == 0:
            self.file = (run_dir / "logs.jsonl").open("a")
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard, rank 0 only

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def write(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "time"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        self.trackers.log(step, scalars)

    def close(self, failed: bool = False) -> None:
        """Close the files and the trackers' runs (`failed`: marked failed); again, it does nothing."""
        if self.rank == 0 and self.file is not None:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            self.trackers.finish(failed)
            self.file = self.tb = None
