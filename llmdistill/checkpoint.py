"""Crash-safe training checkpoints: a checkpoint counts only once its COMPLETE marker exists, and is trusted
only while its files match what the marker recorded.

Layout: checkpoints/step_XXXXXXXX/ holds DeepSpeed's files, one `rng_rank<r>.pt` per rank, the teacher
source's files if it has state (TeacherSource.save_state: the on-policy vLLM generator's rollout weights)
and, written last and atomically by rank 0, `COMPLETE` (JSON: step, consumed micro-batches, time, the run's
training seconds and tokens so far, the student's shape, the teacher source's state, and every file's size
and fingerprint). A directory without the marker is a half-written leftover of a crash: it is never resumed
from and is replaced when that step is saved again. A checkpoint whose files no longer match (deleted,
truncated, rewritten) is damaged: `resume: auto` falls back to the newest older one that is intact, an
explicit `train.resume` fails naming the file.

The fingerprint is the size plus a SHA-256 of the first and last MiB, not of the whole file: a full hash
runs at ~0.5 GB/s here, minutes per save and per resume for a multi-billion-parameter run's optimizer state,
while a deleted, truncated or half-copied file is caught by size and ends alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal as signals
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from llmdistill.config import Config, LLMDistillError, config_from_dict, save_config
from llmdistill.distributed import barrier

log = logging.getLogger("llmdistill.checkpoint")

COMPLETE = "COMPLETE"
_EDGE = 1 << 20  # bytes fingerprinted at each end of a file


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


def fingerprint(path: Path) -> list:
    """[size, SHA-256 of the first and last MiB] of a file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            digest.update(f.read())
    return [size, digest.hexdigest()]


def _files_of(path: Path) -> dict[str, list]:
    return {
        str(f.relative_to(path)): fingerprint(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and not f.name.startswith(COMPLETE)
    }


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when they match its marker. A marker
    without a file list (an older version's) is trusted as it is."""
    try:
        meta = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        return f"{path / COMPLETE} cannot be read ({err})"
    for name, (size, digest) in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written"
        if fingerprint(f)[1] != digest:
            return f"{f} differs from what was written"
    return None


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


def save_checkpoint(
    engine,
    root: Path,
    step: int,
    consumed: int,
    rank: int,
    keep: int,
    meta: dict,
    save_state: Callable[[Path], dict | None] | None = None,
) -> Path:
    """Every rank writes its part; rank 0 marks the checkpoint complete (with `meta` and every file's
    fingerprint), then keeps only the newest `keep`. `save_state(path)`, on every rank, writes more files
    (the teacher source's) into the checkpoint; what it returns on rank 0 goes into the marker as
    "teacher_source"."""
    path = checkpoint_dir(root, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a half-written leftover of a crashed run at this step
    barrier()
    engine.save_checkpoint(str(root), tag=path.name, client_state={"step": step}, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    extra = save_state(path) if save_state is not None else None
    barrier()
    failpoint("checkpoint_before_complete", step)
    if rank == 0:
        marker = path / (COMPLETE + ".tmp")
        record = {"step": step, "consumed_micro_batches": consumed, "time": time.time(), **meta}
        if extra is not None:
            record["teacher_source"] = extra
        marker.write_text(json.dumps(record | {"files": _files_of(path)}))
        marker.replace(path / COMPLETE)  # atomic: a checkpoint is complete or it is not
        prune_checkpoints(root, keep)
    barrier()
    failpoint("checkpoint_complete", step)
    return path


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` intact checkpoints and the damaged ones newer than the oldest of them.

    Counting a damaged checkpoint as one of the `keep` would delete the intact one that `resume: auto`
    falls back to; damaged ones are left for the user to look at until intact ones outnumber them."""
    done = complete_checkpoints(root)
    kept = [p for p in done if damage(p) is None][-keep:]
    oldest_kept = done.index(kept[0]) if kept else len(done)
    for old in done[:oldest_kept]:
        shutil.rmtree(old)


def set_aside_checkpoints(root: Path) -> Path | None:
    """Move an earlier run's checkpoints out of a run that starts over (`train.resume: never`), to
    `checkpoints.before-<time>` beside them; returns where, or None when there were none.

    Left in place they would outnumber this run's lower steps: pruning would delete the new checkpoints, and
    the next `resume: auto` would continue the abandoned run. Moved rather than deleted: nothing is lost."""
    if not root.is_dir() or not any(root.iterdir()):
        return None
    aside = root.with_name(f"{root.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(aside)
    return aside


def read_marker(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the checkpoint's marker (step,
    consumed micro-batches, ...)."""
    meta = read_marker(path)
    try:
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (RuntimeError, OSError, AssertionError, KeyError, ValueError) as err:
        # `damage` checked sizes and ends; a file changed in its middle surfaces here.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LLMDistillError(f"checkpoint {path} cannot be loaded: {reason[:300]}") from None
    if load_path is None:
        raise LLMDistillError(f"could not load checkpoint {path}")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return meta


def _refuse_other_shape(path: Path, shape: dict | None) -> None:
    saved = read_marker(path).get("model_shape")
    if shape is None or saved is None or saved == shape:
        return
    diff = sorted(k for k in set(saved) | set(shape) if saved.get(k) != shape.get(k))
    changes = ", ".join(f"{k} {saved.get(k)} -> {shape.get(k)}" for k in diff)
    raise LLMDistillError(f"checkpoint {path} holds a student of another shape ({changes})")


def find_resume_point(cfg: Config, root: Path, shape: dict | None = None) -> Path | None:
    """The checkpoint `train.resume` asks for: never, the newest intact one (auto), or a given path.

    Under `auto` a damaged checkpoint is skipped with a warning naming it; a given one that is damaged, or a
    checkpoint of another student shape (`shape`, from `model_shape`), is an error.
    """
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        for path in reversed(complete_checkpoints(root)):
            problem = damage(path)
            if problem is None:
                _refuse_other_shape(path, shape)
                return path
            log.warning(f"checkpoint {path} is damaged, not resuming from it: {problem}")
        return None
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise LLMDistillError(f"train.resume: checkpoint directory not found: {path}")
    if not is_complete(path):
        raise LLMDistillError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    problem = damage(path)
    if problem is not None:
        raise LLMDistillError(f"train.resume: checkpoint {path} is damaged: {problem}")
    _refuse_other_shape(path, shape)
    return path


# Settings that may change between the segments of one run: they do not change what a step computes
# (extending train.max_steps re-stretches the cosine schedule, which is what extending a run means).
RESUMABLE_CHANGES = (
    "run.output_dir",  # a run directory may be moved or copied
    "run.name",
    "run.overwrite_config",
    "train.max_steps",
    "train.resume",
    "train.progress",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_checkpoints",
    "train.export",
    "train.max_skipped_steps",
    "data.num_workers",
    # Where the vLLM servers are and how they are waited for (the teacher's, and the student rollout servers'
    # of on_policy's vllm_server generator): a resumed run may find them on other nodes.
    "teacher.server.urls",
    "teacher.server.timeout",
    "teacher.server.retries",
    "teacher.server.backoff",
    "teacher.server.prefetch",
    "teacher.on_policy.server.urls",
    "teacher.on_policy.server.timeout",
    "teacher.on_policy.server.retries",
    "teacher.on_policy.server.backoff",
    "eval",
    "derive",
)


def _flatten(tree, prefix: str = "") -> dict:
    """{dotted key: leaf value}; list items are keyed by their index, as overrides name them."""
    if isinstance(tree, dict | list) and tree:
        out = {}
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> list[str]:
    """The dotted keys where two configs differ in a way that matters for resuming (all but
    RESUMABLE_CHANGES)."""
    a, b = _flatten(old), _flatten(new)

    def free(key):
        return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)

    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


def check_run_config(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run directory's checkpoints under a config that changes what a step computes.

    Nothing to check when there is no checkpoint, under `train.resume: never` (the run starts over), or with
    `run.overwrite_config: true`.
    """
    saved = run_dir / "config.yaml"
    if cfg.train.resume == "never" or cfg.run.overwrite_config or not saved.is_file():
        return
    if not complete_checkpoints(run_dir / "checkpoints"):
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as err:
        raise LLMDistillError(
            f"{saved} is not valid YAML ({str(err).splitlines()[0]}): restore it, or use train.resume=never "
            "to start over or run.overwrite_config=true to continue under this config"
        ) from None
    try:
        old = config_from_dict(old).model_dump(mode="json")  # defaults filled in, as in the new one
    except LLMDistillError:
        old = old if isinstance(old, dict) else {}
    changes = config_changes(old, cfg.model_dump(mode="json"))
    if changes:
        shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise LLMDistillError(
            f"{run_dir} has checkpoints of a run with another config ({saved}; this one differs in {shown}): "
            "use the same config, another run.name, train.resume=never to start over, or "
            "run.overwrite_config=true to continue under this one"
        )


def write_config(cfg: Config, run_dir: Path) -> None:
    """The resolved config as run_dir/config.yaml, replaced atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    save_config(cfg, tmp)
    tmp.replace(run_dir / "config.yaml")
