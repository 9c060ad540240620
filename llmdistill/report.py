"""Finished runs read back from their directories, compared in one table and one plot of learning curves.

A run directory (`llmdistill train`) holds config.yaml (the resolved config), summary.json (held-out figures,
speed, parameters), logs.jsonl (one record per logged step: training loss terms, and `eval/*` for held-out
evaluations) and, when lm-eval ran at the end, eval/results.json (llmdistill.evaluate.report).

`llmdistill report RUN...` prints `runs_table` and writes `plot_curves`; evals/study.py formats its table with
`markdown` and `fmt` and plots its arms with `plot_curves`; llmdistill.card reads runs with `read_run`.
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmdistill.config import LLMDistillError
from llmdistill.evaluate import parameters_of_dir


@dataclass
class Run:
    dir: Path
    config: dict  # config.yaml as plain data
    summary: dict
    lm_eval: dict | None  # eval/results.json, when lm-eval ran
    label: str = ""  # how tables and plots name it; default: the directory's name
    # Where the student was exported: always <run dir>/student (summary.json's student_dir is the path as the
    # training saw it, relative to where it ran).
    student_dir: Path | None = None

    def __post_init__(self):
        self.student_dir = Path(self.student_dir) if self.student_dir else self.dir / "student"

    @property
    def name(self) -> str:
        return self.label or self.dir.name

    @property
    def student_parameters(self) -> int | None:
        """The exported student's parameter count (a LoRA run's summary counts its adapters too)."""
        exported = parameters_of_dir(str(self.student_dir)) if self.student_dir.is_dir() else None
        return exported or self.summary.get("student_parameters")

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.config, self.summary.get("world_size", 1))

    @property
    def tokens(self) -> int:
        return self.summary.get("steps", 0) * self.tokens_per_step


def read_run(run_dir: str | Path, logs: bool = False) -> Run:
    """A finished run's config, summary and lm-eval report; a directory that is not one is a one-line
    error. `logs`: its logs.jsonl must be there too (for the learning curves; a model card does without)."""
    run_dir = Path(run_dir)
    for needed in ("config.yaml", "summary.json", *(["logs.jsonl"] if logs else [])):
        if not (run_dir / needed).is_file():
            raise LLMDistillError(f"{run_dir} is not a finished run directory: no {needed}")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    # eval/ is where the report goes by default; summary["lm_eval"] is where this run wrote it
    # (eval.output_dir, relative to where the training ran).
    lm_eval = None
    for where in (run_dir / "eval", summary.get("lm_eval")):
        if where and (Path(where) / "results.json").is_file():
            lm_eval = json.loads((Path(where) / "results.json").read_text())
            break
    return Run(run_dir, config, summary, lm_eval)


def tokens_per_step(config: dict, world_size: int) -> int:
    """Training tokens per optimizer step: micro-batch x accumulation x sequence length x ranks."""
    train = config["train"]
    return train["micro_batch_size"] * train.get("grad_accum", 1) * config["data"]["seq_len"] * world_size


def learning_curves(logs_path: str | Path, step_tokens: int) -> dict[str, list[dict]]:
    """logs.jsonl as two curves: "train" ({step, tokens, loss}) and "eval" ({step, tokens, loss, ppl, bpb}).

    A step logged twice (a run resumed after a crash repeats the steps after its last checkpoint) keeps its
    last record.
    """
    train: dict[int, dict] = {}
    held_out: dict[int, dict] = {}
    for line in Path(logs_path).read_text().splitlines():
        record = json.loads(line)
        step = record["step"]
        point = {"step": step, "tokens": step * step_tokens}
        if "loss" in record:
            train[step] = {**point, "loss": record["loss"]}
        if "eval/loss" in record:
            held_out[step] = {**point, **{k[5:]: record[k] for k in ("eval/loss", "eval/ppl", "eval/bpb")}}
    return {"train": [train[s] for s in sorted(train)], "eval": [held_out[s] for s in sorted(held_out)]}


def student_lm_eval(run: Run) -> list[dict]:
    """The run's lm-eval scores, one row per task: {task, metric, higher_is_better, teacher, student,
    fraction} (teacher and fraction None when the report has no reference model).

    The student is the model of the report whose path is the run's exported student (else its first student).
    """
    report = run.lm_eval
    if not report:
        return []
    names = list(report["models"])
    student = next((n for n in names if _is_student_path(report["models"][n]["path"], run)), None)
    has_reference = "teacher" in report["models"] and names[0] == "teacher"
    if student is None:
        students = names[1:] if has_reference else names
        if not students:
            return []
        student = students[0]
    rows = []
    for task, key in report["primary"].items():
        if key is None:
            continue
        metric = key.split(",")[0]
        rows.append(
            {
                "task": task,
                "metric": metric,
                "higher_is_better": report.get("higher_is_better", {}).get(task, {}).get(metric, True),
                "teacher": report["models"]["teacher"]["metrics"].get(task, {}).get(key)
                if has_reference
                else None,
                "student": report["models"][student]["metrics"].get(task, {}).get(key),
                "fraction": report.get("fraction_of_reference", {}).get(student, {}).get(task),
            }
        )
    return rows


def _is_student_path(path: str, run: Run) -> bool:
    # The report holds the path as lm-eval was given it, maybe relative to where the training ran.
    p = Path(path)
    return p.resolve() == run.student_dir.resolve() or p.parts[-2:] == (run.dir.name, run.student_dir.name)


# ------------------------------------------------------------------------------------------ tables


def fmt(value, digits: int = 3, spread: float | None = None, signed: bool = False) -> str:
    """A number for a table cell: "—" when missing or not finite, "± spread" when given."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def fmt_int(value) -> str:
    return "—" if value is None else f"{value:,.0f}"


def markdown(header: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """A markdown table, with notes under it after a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ([""] + list(notes) if notes else []))


def _start_end(summary: dict, key: str, digits: int) -> str:
    start, end = summary.get("student_eval_start", {}).get(key), summary.get("student_eval", {}).get(key)
    return f"{fmt(start, digits)} → {fmt(end, digits)}"


def runs_table(runs: list[Run]) -> str:
    """One row per run: size, budget, held-out figures (start → end, and the teacher's), lm-eval, speed."""
    tasks: dict[str, tuple[str, bool]] = {}
    for run in runs:
        for row in student_lm_eval(run):
            tasks.setdefault(row["task"], (row["metric"], row["higher_is_better"]))
    header = [
        "run",
        "parameters",
        "steps",
        "tokens",
        "held-out loss",
        "ppl",
        "bpb",
        "teacher loss",
        "teacher ppl",
        "teacher bpb",
    ]
    header += [f"{task} ({metric} {'↑' if up else '↓'})" for task, (metric, up) in tasks.items()]
    header.append("tokens/s")
    rows = []
    for run in runs:
        s, teacher = run.summary, run.summary.get("teacher_eval") or {}
        scores = {r["task"]: r for r in student_lm_eval(run)}
        cells = [
            run.name,
            fmt_int(run.student_parameters),
            str(s.get("steps", "—")),
            fmt_int(run.tokens),
            _start_end(s, "loss", 3),
            _start_end(s, "ppl", 2),
            _start_end(s, "bpb", 3),
            fmt(teacher.get("loss")),
            fmt(teacher.get("ppl"), 2),
            fmt(teacher.get("bpb")),
        ]
        for task in tasks:
            score = scores.get(task, {})
            cell = fmt(score.get("student"), 4)
            if score.get("teacher") is not None:
                cell += f" (teacher {fmt(score['teacher'], 4)})"
            cells.append(cell)
        cells.append(fmt_int(s.get("tokens_per_s")))
        rows.append(cells)
    notes = [
        "held-out figures of the student at step 0 → at the end (loss in nats per token of the student's "
        "tokenizer: compare bpb across tokenizers); tokens = steps x tokens per step."
    ]
    limits = {run.lm_eval.get("limit") for run in runs if run.lm_eval}
    if any(limits):
        notes.append(f"lm-eval on a subset: limit {', '.join(str(x) for x in sorted(limits, key=str))}.")
    return markdown(header, rows, notes)


# ------------------------------------------------------------------------------------------ curves


@dataclass
class Curves:
    """One run's curves in a plot. Runs with the same `group` share a colour (a study's seeds of one arm);
    `label` None keeps a run out of the legend."""

    label: str | None
    points: dict[str, list[dict]]  # learning_curves(): {"train": [...], "eval": [...]}
    group: str = ""
    style: str = "-"
    marker: str = "."


# (curve, value, y label, title): what a panel of plot_curves shows.
RUN_PANELS = (
    ("train", "loss", "training loss (objective)", "training loss vs tokens"),
    ("eval", "bpb", "held-out bits per byte", "held-out bits-per-byte vs tokens (tokenizer-independent)"),
)


def plot_curves(curves: list[Curves], path: str | Path, panels=RUN_PANELS) -> Path:
    """One panel per (curve, value) against training tokens, every run in each; a PNG at `path`.

    A panel's y axis is logarithmic unless one of its values is not positive (a KL of a student that starts
    as the teacher is 0 at first): a log axis would silently drop those points."""
    import matplotlib  # imported here: only a plot needs it (~0.5 s), not a table or a card

    matplotlib.use("Agg")  # no display here or on cluster nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    # tab20's dark shades first, then its light ones: up to 20 groups get distinct colours.
    tab20 = plt.get_cmap("tab20")
    colors = [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    groups = list(dict.fromkeys(c.group or c.label for c in curves))
    for ax, (which, value, ylabel, title) in zip(axes[0], panels, strict=True):
        values = []
        for c in curves:
            points = [p for p in c.points.get(which, []) if p.get(value) is not None]
            color = colors[groups.index(c.group or c.label) % len(colors)]
            ax.plot(
                [p["tokens"] for p in points],
                [p[value] for p in points],
                c.style,
                color=color,
                label=c.label,
                marker=c.marker,
                markersize=4,
            )
            values += [p[value] for p in points]
        ax.set(
            xlabel="training tokens", ylabel=ylabel, yscale="log" if min(values, default=0) > 0 else "linear"
        )
        ax.set_title(title, fontsize=10)
    if any(c.label for c in curves):
        axes[0][-1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_runs(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[str, Path]:
    """The table of the runs (also written to out_dir/runs.md) and their curves in out_dir/curves.png."""
    runs = [read_run(d, logs=True) for d in run_dirs]
    names = [r.name for r in runs]
    # Two runs of the same name (runs/a, other/a) are told apart by their parent directory's name.
    for run in runs:
        if names.count(run.dir.name) > 1:
            run.label = f"{run.dir.parent.name}/{run.dir.name}"
    table = runs_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.md").write_text(table + "\n")
    curves = [Curves(r.name, learning_curves(r.dir / "logs.jsonl", r.tokens_per_step)) for r in runs]
    return table, plot_curves(curves, out / "curves.png")
