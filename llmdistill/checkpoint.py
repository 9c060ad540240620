"""Crash-safe training checkpoints: a checkpoint counts only once its COMPLETE marker exists.

Layout: checkpoints/step_XXXXXXXX/ holds DeepSpeed's files, one `rng_rank<r>.pt` per rank and, written
last and atomically by rank 0, `COMPLETE` (JSON: step, consumed micro-batches, time). A directory without the
marker is a half-written leftover of a crash: it is never resumed from and is replaced when that step is
saved again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal as signals
import time
from pathlib import Path

import torch

from llmdistill.config import Config, LLMDistillError
from llmdistill.distributed import barrier

COMPLETE = "COMPLETE"


def failpoint(name: str, step: int) -> None:
    """Crash-safety tests: LLMDISTILL_FAILPOINT=<name>@<step> kills the process at this point."""
    if os.environ.get("LLMDISTILL_FAILPOINT") == f"{name}@{step}":
        os.kill(os.getpid(), signals.SIGKILL)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose COMPLETE marker exists, oldest first; half-written ones are never listed."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if is_complete(p)]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, consumed: int, rank: int, keep: int) -> Path:
    """Every rank writes its part; rank 0 marks the checkpoint complete, then keeps only the newest `keep`."""
    path = checkpoint_dir(root, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a half-written leftover of a crashed run at this step
    barrier()
    engine.save_checkpoint(str(root), tag=path.name, client_state={"step": step}, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    barrier()
    failpoint("checkpoint_before_complete", step)
    if rank == 0:
        marker = path / (COMPLETE + ".tmp")
        marker.write_text(json.dumps({"step": step, "consumed_micro_batches": consumed, "time": time.time()}))
        marker.replace(path / COMPLETE)  # atomic: a checkpoint is complete or it is not
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    barrier()
    failpoint("checkpoint_complete", step)
    return path


def load_checkpoint(engine, path: Path, rank: int) -> tuple[int, int]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns (step, consumed micro-batches)."""
    meta = json.loads((path / COMPLETE).read_text())
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise LLMDistillError(f"could not load checkpoint {path}")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return meta["step"], meta["consumed_micro_batches"]


def find_resume_point(cfg: Config, root: Path) -> Path | None:
    """The checkpoint `train.resume` asks for: never, the newest complete one (auto), or a given path."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(cfg.train.resume)
    if not is_complete(path):
        raise LLMDistillError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path
