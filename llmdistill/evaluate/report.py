"""The report of an evaluation: results.json, a markdown table, PNG plots, and TensorBoard scalars.

A report is the dict `evaluate_models` returns: {"tasks", "backend", "limit", "models": {name: {"metrics":
{task: {"metric,filter": value}}, "parameters", "tokens_per_s", ...}}, "higher_is_better", "primary",
"fraction_of_reference"}. The first model is the reference (the teacher).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmdistill.evaluate.task_data import LOCAL_TAG, LOCAL_TASKS

# The metric the table shows for a task, first one present wins (lm-eval reports "metric,filter" keys).
PRIMARY_METRICS = ("bits_per_byte", "acc_norm", "acc", "exact_match", "f1", "word_perplexity")
PREFERRED_FILTERS = ("none", "strict-match", "flexible-extract")


def primary_metrics(report: dict) -> dict[str, str | None]:
    """{task: the "metric,filter" key the table and plots show}, for every reported task."""
    return {t: _primary_metric(t, report) for t in _reported_tasks(report)}


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


def fractions_of_reference(report: dict) -> dict[str, dict[str, float | None]]:
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
