"""Experiment trackers beside logs.jsonl: Weights & Biases, MLflow and trackio (TensorBoard is written by
RunLog itself). `train.report_to` names them; each package is imported only when named.

One small adapter per tracker: `start(params, run_dir, name, previous)` opens its run (or reopens the one
`previous` identifies, after a resume) with the run's parameters and returns what identifies it,
`log(step, scalars)` logs one record, `finish(failed)` closes the run (marked failed where the tracker
has such a state). `Trackers` fans out to them on rank 0.

A resumed run continues the same tracker run. None of these trackers can delete logged points, so the steps
it already holds are skipped instead of logged twice: run_dir/trackers/<tracker>.json keeps the run's id
and, per scalar, the last step the tracker holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from llmdistill.config import LLMDistillError

log = logging.getLogger("llmdistill.trackers")

# The project name each tracker files runs under, unless its own environment variable names another.
PROJECT = "llmdistill"


class TrackerError(LLMDistillError):
    pass


class Wandb:
    """Weights & Biases: online, or offline with WANDB_MODE=offline (`wandb sync` uploads it later)."""

    def start(self, params: dict, run_dir: Path, name: str, previous: dict) -> dict:
        import wandb  # optional extra: imported only when report_to names it

        run_id = previous.get("id") or uuid.uuid4().hex[:16]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=name,
            id=run_id,
            resume="allow",
            config=params,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            # Our own progress and logs stay on the console; no sampling thread competes with training.
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        return {"id": run_id}

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """MLflow: the tracking server or store MLFLOW_TRACKING_URI names (MLflow's local default without it),
    experiment MLFLOW_EXPERIMENT_NAME or "llmdistill"; the config goes in as flat parameters."""

    def start(self, params: dict, run_dir: Path, name: str, previous: dict) -> dict:
        from mlflow.entities import Param  # optional extra: imported only when report_to names it
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client = MlflowClient()
        self.run_id = previous.get("run_id")
        if self.run_id is not None:
            # Parameters cannot change once logged: a resumed run keeps those it started with.
            self.client.update_run(self.run_id, status="RUNNING")
            return {"run_id": self.run_id}
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        flat = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=flat[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        return {"run_id": self.run_id}

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric  # optional extra: imported only when report_to names it

        now = int(time.time() * 1000)
        # MLflow refuses metric names with other characters than these.
        metrics = [Metric(re.sub(r"[^\w./\- :]", "_", k), float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Trackio:
    """trackio: a local SQLite store under TRACKIO_DIR (default ~/.cache/huggingface/trackio), or the Space
    TRACKIO_SPACE_ID names."""

    def start(self, params: dict, run_dir: Path, name: str, previous: dict) -> dict:
        import trackio  # optional extra: imported only when report_to names it

        self.trackio = trackio
        # trackio resumes a run by name; a fresh run never joins an older one that has the same name.
        run = trackio.init(
            project=PROJECT,
            name=previous.get("name", name),
            resume="allow" if previous else "never",
            config=params,
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
        return {"name": run.name, "id": run.id}

    def log(self, step: int, scalars: dict) -> None:
        self.trackio.log(scalars, step=step)

    def finish(self, failed: bool = False) -> None:
        self.trackio.finish()  # trackio keeps no run status


ADAPTERS = {"wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}


class Trackers:
    """The trackers `names` lists (TensorBoard aside), started at once: one that fails to start raises a
    TrackerError naming it; one that fails later logs one warning and is dropped, the others go on."""

    def __init__(self, names, params: dict, run_dir: Path, name: str, resuming: bool):
        self.state_dir = run_dir / "trackers"
        self.active: dict[str, object] = {}
        self.state: dict[str, dict] = {}
        for tracker in dict.fromkeys(n for n in names if n != "tensorboard"):
            state_file = self.state_dir / f"{tracker}.json"
            previous = json.loads(state_file.read_text()) if resuming and state_file.exists() else {}
            adapter = ADAPTERS[tracker]()
            try:
                run = adapter.start(params, run_dir, name, previous.get("run", {}))
            except Exception as err:
                self.finish(failed=True)
                raise TrackerError(f"train.report_to: {tracker} failed to start: {one_line(err)}") from err
            self.active[tracker] = adapter
            self.state[tracker] = {"run": run, "held": previous.get("held", {}) if previous else {}}
            self._save(tracker)
        # The steps each tracker held when this attempt began; later writes at one step all go through.
        self.held_before = {t: dict(s["held"]) for t, s in self.state.items()}

    def log(self, step: int, scalars: dict) -> None:
        for tracker, adapter in list(self.active.items()):
            held = self.held_before[tracker]
            fresh = {k: v for k, v in scalars.items() if step > held.get(k, -1)}
            if not fresh:
                continue
            try:
                adapter.log(step, fresh)
            except Exception as err:
                log.warning(
                    f"{tracker} failed at step {step} and logs nothing more in this run "
                    f"(logs.jsonl and the other trackers go on): {one_line(err)}"
                )
                del self.active[tracker]
                continue
            self.state[tracker]["held"].update(dict.fromkeys(fresh, step))
            self._save(tracker)

    def finish(self, failed: bool = False) -> None:
        """Close every tracker's run; `failed`: the training run failed, and its tracker runs say so."""
        for tracker, adapter in list(self.active.items()):
            del self.active[tracker]
            try:
                adapter.finish(failed)
            except Exception as err:
                log.warning(f"{tracker} failed to finish its run: {one_line(err)}")

    def _save(self, tracker: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{tracker}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state[tracker]))
        tmp.replace(path)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; lists and other leaves as JSON."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def run_params(config: dict, student_path: str | None) -> dict:
    """What trackers log as the run's parameters: the resolved config, and the key figures of the
    derivation when the student was derived (its derivation.json)."""
    params = dict(config)
    record = Path(student_path) / "derivation.json" if student_path else None
    if record is not None and record.exists():
        derivation = json.loads(record.read_text())
        params["derivation"] = {
            "teacher": derivation.get("teacher"),
            "teacher_shape": derivation.get("teacher_shape"),
            "student_shape": derivation.get("student_shape"),
            "parameters": derivation.get("parameters"),
            "held_out_loss": derivation.get("held_out_loss"),
            "kept_layers": (derivation.get("kept") or {}).get("layers"),
            "method": "search" if derivation.get("search") else "target",
            "masking_sparsity": (derivation.get("masking") or {}).get("sparsity"),
        }
    return params
