"""The run's log: logs.jsonl and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    """logs.jsonl and TensorBoard on rank 0; every other rank writes nothing."""

    def __init__(self, run_dir: Path, rank: int):
        self.rank = rank
        self.file = self.tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard, rank 0 only

            self.file = (run_dir / "logs.jsonl").open("a")
            self.tb = SummaryWriter(str(run_dir / "tb"))

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
