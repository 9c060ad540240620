"""Process-group setup shared by every command that may run on several ranks (train, derive, eval)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> tuple[int, int, str]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, device).

    Works under `deepspeed`, `torchrun`, `srun` (SLURM_* variables) and as one plain process: without launcher
    variables we set a world of one, since DeepSpeed would otherwise try MPI discovery.
    """
    import deepspeed  # lazy: importing deepspeed is slow, and commands that never join a group skip it

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Launchers don't set it; ranks sharing a node's cores would otherwise oversubscribe them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
        _unlink_shm_workspace()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return rank, world, device


def _unlink_shm_workspace() -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer, keeping the buffer itself.

    When all ranks share a node (the launcher sets LOCAL_SIZE), DeepSpeed's CPU comm op gives each rank a
    /dev/shm segment of ~66 MiB and never unlinks it: every run would leave 66 MiB per rank in RAM-backed
    /dev/shm until the machine fills. The segments are opened by every rank during init, so once all ranks
    are past it the names can go; the mappings live until the processes exit, killed ones included.
    """
    path = Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}"
    )
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    path.unlink(missing_ok=True)  # absent on GPUs and across nodes: DeepSpeed made no segment


def leave_process_group() -> None:
    """Destroy the process group at the end of a command that succeeded, or that failed on every rank
    together (every rank calls it).

    Left to interpreter teardown, gloo's worker threads may still hold finished work whose tensors need the
    interpreter: the process then aborts ("terminate called without an active exception") after a run that
    finished, and the launcher fails the whole job. A worker lets go of a finished collective's tensors only
    once it gets the GIL, which a rank hurrying into teardown may not give it in time: the barrier waits
    without the GIL until every worker has moved on (a ZeRO-3 gather just before the end aborted 4 runs in
    10 without it, none in 20 with it; a run that every rank stopped together aborted 2 in 12). Not after a
    failure only some ranks met: another rank may still be inside a collective there, and the barrier would
    hang.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> list[float]:
    """`values` summed over the ranks, as Python floats: Python numbers, or a 1-d tensor left on its device
    until here, so that one all_reduce and one read (`.tolist()`, the only wait for the device) serve them
    all."""
    t = values.double() if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # nccl reduces GPU tensors (the current device, which init_distributed set), gloo CPU ones
        t = t.cuda() if torch.distributed.get_backend() == "nccl" else t.cpu()
        torch.distributed.all_reduce(t)
    return t.tolist()


def first_reason(reason: str) -> str:
    """This rank's `reason` if it has one, else the first other rank's (every rank must call it: a collective
    of Python objects, for the rare path where ranks agreed that something failed)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return reason
    reasons: list[str] = [""] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reasons, reason)
    return reason or next((r for r in reasons if r), "")
