"""The proof table: every distillation arm against training from scratch, at an equal token budget.

    python evals/study.py --config configs/tiny/study.yaml [--smoke] [--output DIR] [--arms A,B]

The study YAML is this script's own (it is not a training config): a `study` section with `base_config`,
`base_overrides`, `arms: [{name, group, config, overrides}]`, `seeds`, the repeat rule for close arms and the
lm-eval subset, and a `smoke` section that replaces any of those for the quick test version. Each arm/seed is
one training subprocess (deepspeed, `ranks` ranks) writing its own run directory under `<output>/arms/`; a run
whose summary.json already exists is reused, so an interrupted study continues where it stopped.

Writes `<output>/results.json`, `<output>/table.md` and `<output>/curves.png`, and prints the table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from the checkout: its llmdistill, not an installed one

from llmdistill.models import SHAPE_KEYS as CHECKPOINT_SHAPE_KEYS  # noqa: E402
from llmdistill.report import Curves, fmt, learning_curves, markdown, plot_curves, tokens_per_step  # noqa: E402

TEACHER_DIR = REPO / "llmdistill" / "embedded" / "teacher"
CHAT_TEACHER_DIR = REPO / "llmdistill" / "embedded" / "chat_teacher"
# Arms of this group train on chat data (answer-only held-out loss): they compare with the chat teacher and
# the first chat arm, not with the code arms.
CHAT_GROUP = "chat"
# A random-init twin of the derived student needs its shape (what a checkpoint checks) and what the shape
# leaves to defaults that the derived config may have changed.
SHAPE_KEYS = (
    *CHECKPOINT_SHAPE_KEYS,
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
DERIVED_SHAPE_PLACEHOLDER = "@derived_shape"


def load_study(path: str, smoke: bool) -> dict:
    raw = yaml.safe_load(Path(path).read_text())
    study = dict(raw["study"])
    if smoke:
        # The smoke section replaces whole keys (arms, overrides, eval subset), never merges inside them.
        study.update(raw.get("smoke", {}))
    return study


def override_args(overrides: dict) -> list[str]:
    """{dotted.key: value} -> ["dotted.key=<YAML flow>"], the form launch/train.py parses."""
    args = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        args.append(f"{key}={text}")
    return args


def derived_shape(derived_dir: Path) -> dict:
    config = json.loads((derived_dir / "config.json").read_text())
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def resolve_placeholders(overrides: dict, derived_dir: Path) -> dict:
    """The scratch arm says `student.config: @derived_shape`: the derived student's shape, random init."""
    return {
        k: (derived_shape(derived_dir) if v == DERIVED_SHAPE_PLACEHOLDER else v) for k, v in overrides.items()
    }


def run_logged(cmd: list[str], log_path: Path, env: dict) -> float:
    """Run a subprocess with its output in log_path; return its wall time. A failure names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(
            f"{' '.join(cmd[:4])}... failed ({proc.returncode}); see {log_path}:\n" + "\n".join(tail)
        )
    return seconds


def child_env(ranks: int) -> dict:
    env = dict(os.environ)
    # 2 ranks on a 2-core CPU: one thread each, otherwise they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def prepare(study: dict, output: Path, env: dict) -> None:
    """Build what the arms depend on (the derived student, the vLLM teacher cache) when it is missing."""
    arms = {arm["name"] for arm in study["arms"]}
    for step in study.get("prepare", []):
        if (REPO / step["creates"]).exists():
            continue
        if "needed_by" in step and not arms & set(step["needed_by"]):
            continue  # --arms left out every arm that reads it
        print(f"[study] preparing {step['creates']}: {' '.join(step['command'])}", flush=True)
        cmd = [sys.executable if c == "python" else c for c in step["command"]]
        try:
            run_logged(cmd, output / "logs" / f"prepare-{Path(step['creates']).parent.name}.log", env)
        except RuntimeError as err:
            # e.g. no vLLM here: the arms that need it then fail on their own and are listed as missing.
            print(f"[study] preparing {step['creates']} FAILED: {err}", flush=True)


def train_command(study: dict, arm: dict, seed: int, run_dir: Path) -> list[str]:
    derived_dir = REPO / study["derived_dir"]
    overrides = {
        **study.get("base_overrides", {}),
        **resolve_placeholders(arm.get("overrides", {}), derived_dir),
        "run.name": run_dir.name,
        "run.output_dir": str(run_dir.parent),
        "run.seed": seed,
    }
    launcher = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(study.get("ranks", 2)), "--master_port", str(study.get("master_port", 29517)),
    ]  # fmt: skip
    config = arm.get("config", study["base_config"])
    return [*launcher, "launch/train.py", "--config", config, *override_args(overrides)]


def run_arm(study: dict, arm: dict, seed: int, output: Path, env: dict) -> dict:
    run_dir = output / "arms" / f"{arm['name']}-s{seed}"
    summary_path = run_dir / "summary.json"
    wall_path = run_dir / "study_wall_seconds.json"
    if summary_path.exists() and wall_path.exists():
        print(f"[study] {run_dir.name}: reusing the finished run", flush=True)
        wall = json.loads(wall_path.read_text())["seconds"]
    else:
        print(f"[study] {run_dir.name}: training", flush=True)
        wall = run_logged(
            train_command(study, arm, seed, run_dir), output / "logs" / f"{run_dir.name}.log", env
        )
        wall_path.write_text(json.dumps({"seconds": wall}))
    summary = json.loads(summary_path.read_text())
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    step_tokens = tokens_per_step(resolved, summary["world_size"])
    return {
        "arm": arm["name"],
        "group": arm.get("group", ""),
        "seed": seed,
        "run_dir": str(run_dir),
        "wall_seconds": wall,
        "summary": summary,
        # The held-out evaluations: {step, tokens, loss, ppl, bpb} per point.
        "curve": learning_curves(run_dir / "logs.jsonl", step_tokens)["eval"],
        "tokens_per_step": step_tokens,
    }


def close_arms(runs: list[dict], margin: float) -> list[str]:
    """Arms whose first-seed held-out bpb is within `margin` of another arm's: they get the extra seeds."""
    first = {}
    for r in runs:
        first.setdefault(r["arm"], r["summary"]["student_eval"]["bpb"])
    return [
        a
        for a, bpb in first.items()
        if any(abs(bpb - other) < margin for b, other in first.items() if b != a)
    ]


def mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and half the range over seeds (None with one seed): the figure a rerun should land within."""
    mean = statistics.fmean(values)
    return mean, ((max(values) - min(values)) / 2 if len(values) > 1 else None)


def run_lm_eval(study: dict, runs: list[dict], output: Path) -> dict | None:
    """lm-eval on the teacher and each arm's first-seed student, on the local code tasks (subset: `limit`)."""
    settings = study.get("lm_eval")
    if not settings:
        return None
    from llmdistill.evaluate import evaluate_models

    models = {"teacher": str(TEACHER_DIR)}
    if any(r["group"] == CHAT_GROUP for r in runs):
        models["chat-teacher"] = str(CHAT_TEACHER_DIR)
    for r in runs:
        models.setdefault(r["arm"], r["summary"]["student_dir"])
    print(f"[study] lm-eval on {len(models)} models, limit {settings.get('limit')}", flush=True)
    return evaluate_models(
        models,
        settings["tasks"],
        limit=settings.get("limit"),
        max_length=512,
        batch_size=settings.get("batch_size", 8),
        output_dir=output / "lm-eval",
    )


def teacher_figures(runs: list[dict], chat: bool = False) -> dict:
    """The teacher's held-out loss/bpb, from any arm that had the in-process teacher (same eval batches); with
    `chat`, the chat teacher's on the held-out instructions, from the chat arms."""
    for r in runs:
        if r["summary"].get("teacher_eval") and (r["group"] == CHAT_GROUP) == chat:
            return r["summary"]["teacher_eval"]
    return {}


def _teacher_lm_eval(lm_report: dict | None, model: str) -> dict:
    if not lm_report or model not in lm_report["models"]:
        return {}
    return {
        task: {"metric": key, "value": lm_report["models"][model]["metrics"].get(task, {}).get(key)}
        for task, key in lm_report["primary"].items()
    }


def aggregate(study: dict, runs: list[dict], lm_report: dict | None) -> dict:
    teachers = {False: teacher_figures(runs), True: teacher_figures(runs, chat=True)}
    arms_by_name = {a["name"]: a for a in study["arms"]}
    rows = []
    baselines = {}  # per kind of data (code, chat): the first arm's (bpb, loss)
    for name, arm in arms_by_name.items():
        arm_runs = [r for r in runs if r["arm"] == name]
        if not arm_runs:
            continue
        chat = arm.get("group") == CHAT_GROUP
        teacher = teachers[chat]
        loss, loss_spread = mean_and_spread([r["summary"]["student_eval"]["loss"] for r in arm_runs])
        bpb, bpb_spread = mean_and_spread([r["summary"]["student_eval"]["bpb"] for r in arm_runs])
        # Loss in nats/token compares only between students that share the teacher's tokenizer.
        same_tokenizer = arm.get("group") != "tokenizer"
        # The first arm is the baseline (arm 1: scratch CE; the first chat arm for chat arms); gains are
        # measured against it.
        scratch_bpb, scratch_loss = baselines.setdefault(chat, (bpb, loss))
        row = {
            "arm": name,
            "group": arm.get("group", ""),
            "chat": chat,
            "what": arm.get("what", ""),
            "seeds": [r["seed"] for r in arm_runs],
            "loss": loss,
            "loss_spread": loss_spread,
            "bpb": bpb,
            "bpb_spread": bpb_spread,
            "same_tokenizer": same_tokenizer,
            "recovery_bpb": teacher["bpb"] / bpb if teacher else None,
            "recovery_loss": teacher["loss"] / loss if teacher and same_tokenizer else None,
            "gain_bpb": scratch_bpb - bpb,
            "gain_loss": scratch_loss - loss if same_tokenizer else None,
            "train_seconds": statistics.fmean(r["summary"]["train_seconds"] for r in arm_runs),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in arm_runs),
            "tokens_per_s": statistics.fmean(r["summary"]["tokens_per_s"] for r in arm_runs),
            "train_tokens": arm_runs[0]["summary"]["steps"] * arm_runs[0]["tokens_per_step"],
            "parameters": arm_runs[0]["summary"]["student_parameters"],
            "lm_eval": {},
        }
        if lm_report and name in lm_report["models"]:
            for task, key in lm_report["primary"].items():
                row["lm_eval"][task] = {
                    "metric": key,
                    "value": lm_report["models"][name]["metrics"].get(task, {}).get(key),
                    "recovery": lm_report["fraction_of_reference"].get(name, {}).get(task),
                }
        rows.append(row)
    out = {"teacher": {**teachers[False], "lm_eval": _teacher_lm_eval(lm_report, "teacher")}, "rows": rows}
    if any(row["chat"] for row in rows):
        out["chat_teacher"] = {**teachers[True], "lm_eval": _teacher_lm_eval(lm_report, "chat-teacher")}
    return out


def markdown_table(results: dict) -> str:
    tasks = list(results["teacher"].get("lm_eval", {}))
    short = {t: t.replace("llmdistill_code_", "").replace("llmdistill_", "") for t in tasks}
    header = [
        "arm",
        "seeds",
        "held-out loss",
        "bpb",
        "recovery (bpb)",
        "gain vs scratch (bpb)",
        "Δloss vs scratch",
    ]
    header += [
        f"lm-eval {short[t]} ({results['teacher']['lm_eval'][t]['metric'].split(',')[0]})" for t in tasks
    ]
    header += ["train s", "wall s", "tokens/s"]
    all_rows = results["rows"]
    teachers = [("teacher", results["teacher"], [r for r in all_rows if not r["chat"]])]
    if "chat_teacher" in results:
        teachers.append(("chat teacher ²", results["chat_teacher"], [r for r in all_rows if r["chat"]]))
    rows = []
    for label, teacher, teacher_rows in teachers:
        cells = [label, "—", fmt(teacher.get("loss")), fmt(teacher.get("bpb")), "100%", "—", "—"]
        cells += [fmt(teacher["lm_eval"].get(t, {}).get("value")) for t in tasks] + ["—", "—", "—"]
        rows.append(cells)
        rows.extend(_arm_cells(row, tasks) for row in teacher_rows)
    notes = []
    if any(not row["same_tokenizer"] for row in all_rows):
        notes.append("¹ nats per token of the student's own tokenizer: compare bpb across tokenizers.")
    if "chat_teacher" in results:
        notes.append(
            "² chat arms: answer-only held-out loss on the embedded instruction set (validation split), "
            "recovery vs the chat teacher, gains vs the first chat arm; lm-eval % vs the base teacher."
        )
    if tasks:
        notes.append(
            f"lm-eval: first {results.get('lm_eval_limit') or 'all'} examples per task, first seed only."
        )
    return markdown(header, rows, notes)


def _arm_cells(row: dict, tasks: list[str]) -> list[str]:
    cells = [
        row["arm"],
        ",".join(str(s) for s in row["seeds"]),
        fmt(row["loss"], spread=row["loss_spread"]) + ("" if row["same_tokenizer"] else " ¹"),
        fmt(row["bpb"], spread=row["bpb_spread"]),
        f"{100 * row['recovery_bpb']:.1f}%" if row["recovery_bpb"] else "—",
        fmt(row["gain_bpb"], signed=True),
        fmt(row["gain_loss"], signed=True),
    ]
    for t in tasks:
        entry = row["lm_eval"].get(t, {})
        value, recovery = entry.get("value"), entry.get("recovery")
        cells.append(fmt(value) + (f" ({100 * recovery:.0f}%)" if recovery is not None else ""))
    cells += [f"{row['train_seconds']:.0f}", f"{row['wall_seconds']:.0f}", f"{row['tokens_per_s']:.0f}"]
    return cells


# Held-out loss and bits per byte against training tokens, one colour per arm.
STUDY_PANELS = (
    (
        "eval",
        "loss",
        "held-out loss (nats/token, student tokenizer)",
        "held-out loss vs tokens (dotted: extra seeds)",
    ),
    ("eval", "bpb", "held-out bits per byte", "held-out bits-per-byte vs tokens (tokenizer-independent)"),
)
GROUP_MARKERS = {"tokenizer": "x", "topk": "s", "baseline": "o"}


def plot_arms(runs: list[dict], path: Path) -> None:
    """Every run's held-out curves: an arm's first seed solid and in the legend, its extra seeds dotted."""
    curves = []
    for r in runs:
        first_seed = r["seed"] == min(x["seed"] for x in runs if x["arm"] == r["arm"])
        curves.append(
            Curves(
                label=r["arm"] if first_seed else None,
                points={"eval": r["curve"]},
                group=r["arm"],
                style="-" if first_seed else ":",
                marker=GROUP_MARKERS.get(r.get("group", ""), "."),
            )
        )
    plot_curves(curves, path, STUDY_PANELS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the study YAML (configs/tiny/study.yaml)")
    parser.add_argument("--smoke", action="store_true", help="the quick version: the YAML's `smoke` section")
    parser.add_argument("--output", help="study directory (default: the YAML's study.output)")
    parser.add_argument(
        "--master-port", type=int, help="the ranks' rendezvous port (default: study.master_port)"
    )
    parser.add_argument("--arms", help="comma-separated arm names to run (default: all of the YAML's)")
    args = parser.parse_args(argv)
    study = load_study(args.config, args.smoke)
    if args.arms:
        names = args.arms.split(",")
        unknown = sorted(set(names) - {arm["name"] for arm in study["arms"]})
        if unknown:
            parser.error(f"--arms: {unknown} are not arms of {args.config}")
        study["arms"] = [arm for arm in study["arms"] if arm["name"] in names]
    if args.master_port:
        study["master_port"] = args.master_port
    output = Path(args.output or study["output"])
    if not output.is_absolute():
        output = REPO / output
    output.mkdir(parents=True, exist_ok=True)
    env = child_env(study.get("ranks", 2))
    started = time.perf_counter()
    prepare(study, output, env)

    runs, failed = [], []

    def attempt(arm: dict, seed: int) -> None:
        # One broken arm must not cost the other arms' results: it is recorded and named in the output.
        try:
            runs.append(run_arm(study, arm, seed, output, env))
        except (RuntimeError, FileNotFoundError) as err:
            print(f"[study] {arm['name']}-s{seed} FAILED: {err}", flush=True)
            failed.append({"arm": arm["name"], "seed": seed, "error": str(err)[-2000:]})

    for arm in study["arms"]:
        for seed in study.get("seeds", [0]):
            attempt(arm, seed)
    repeat = study.get("repeat_close")
    repeated = []
    if repeat:
        # Extra seeds only where an arm's bpb is within the margin of another's: there noise could flip the
        # ranking, and seeds elsewhere would spend minutes confirming a gap nobody doubts.
        repeated = close_arms(runs, repeat["margin"])
        for arm in study["arms"]:
            if arm["name"] in repeated:
                for seed in repeat["seeds"]:
                    attempt(arm, seed)

    lm_started = time.perf_counter()
    lm_report = run_lm_eval(study, runs, output)
    lm_seconds = time.perf_counter() - lm_started
    results = aggregate(study, runs, lm_report)
    results.update(
        {
            "config": args.config,
            "smoke": args.smoke,
            "machine": {"cpu_count": os.cpu_count(), "ranks": study.get("ranks", 2)},
            "lm_eval_limit": (study.get("lm_eval") or {}).get("limit"),
            "repeated_arms": repeated,
            "failed": failed,
            "study_seconds": time.perf_counter() - started,
            # What the whole study costs from scratch, reused runs included (this invocation may have reused).
            "compute_seconds": sum(r["wall_seconds"] for r in runs) + lm_seconds,
            "runs": runs,
        }
    )
    table = markdown_table(results)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "table.md").write_text(table + "\n")
    plot_arms(runs, output / "curves.png")
    print(table)
    for f in failed:
        print(f"[study] missing: {f['arm']} seed {f['seed']} failed (see results.json)")
    print(
        f"\n[study] {len(runs)} runs; {results['compute_seconds'] / 60:.1f} min of training + lm-eval in all "
        f"({results['study_seconds']:.0f} s this invocation); "
        f"results.json, table.md, curves.png in {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
