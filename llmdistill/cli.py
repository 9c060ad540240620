"""`llmdistill train|build-teacher|demo|eval|warm ...`: thin commands over the library; imports stay lazy."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llmdistill.config import LLMDistillError, load_config

REPO = Path(__file__).resolve().parent.parent


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=50")


def cmd_train(args) -> None:
    from llmdistill.train import train

    train(load_config(args.config, args.overrides))


def cmd_build_teacher(args) -> None:
    from llmdistill.tools.build_teacher import build_teacher

    build_teacher(args.config, args.overrides)


def cmd_derive(args) -> None:
    """Derive a student from the teacher by pruning (the `derive` section of the config)."""
    import torch
    from transformers.utils import logging as hf_logging

    from llmdistill.derive import derive_student

    hf_logging.disable_progress_bar()  # per-call "Loading weights" bars would bury the line that matters
    out = derive_student(load_config(args.config, args.overrides))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"derived student written to {out} (scores in {out / 'derivation.json'})")


def cmd_eval(args) -> None:
    """Benchmark teacher vs students with lm-eval (the `eval` section of the config)."""
    from llmdistill.evaluate import markdown_table, run_eval

    report = run_eval(load_config(args.config, args.overrides))
    print(markdown_table(report))
    print(f"\nreport: {report['output_dir']}")


def cmd_warm(args) -> None:
    """Build DeepSpeed's JIT ops once (its shared-memory comm op takes ~80 s the first time)."""
    from llmdistill.distributed import init_distributed

    init_distributed("auto")
    print("deepspeed ready")


def cmd_demo(args) -> None:
    """The main job on the embedded default: derive a student by pruning, distil it on 2 DeepSpeed ranks,
    report."""
    cfg = load_config(args.config, args.overrides)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    derive = [sys.executable, str(REPO / "launch" / "derive.py"), "--config", args.derive_config]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    train = [
        launcher,
        "--num_gpus",
        str(args.ranks),
        str(REPO / "launch" / "train.py"),
        "--config",
        args.config,
    ]
    for what, cmd in (("derivation", derive), ("training", [*train, *args.overrides])):
        print("$", " ".join(cmd), flush=True)
        if subprocess.call(cmd, env=env) != 0:
            raise LLMDistillError(f"the demo's {what} failed (see its output above)")
    print_summary(json.loads((cfg.run.dir / "summary.json").read_text()))
    _demo_eval(cfg)


def _demo_eval(cfg) -> None:
    """The teacher vs the exported student on the local lm-eval tasks, on a subset so the demo stays short."""
    from llmdistill.config import EvalConfig
    from llmdistill.evaluate import markdown_table, run_eval

    if not (cfg.run.dir / "student" / "config.json").exists():
        return
    cfg.eval = cfg.eval or EvalConfig(limit=100, max_length=512)
    print("\nlm-eval: teacher vs student (local code tasks)", flush=True)
    print(markdown_table(run_eval(cfg)))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmdistill")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="distil (or pretrain) a student under DeepSpeed")
    _config_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("derive", help="derive a student from the teacher by pruning")
    _config_args(p)
    p.set_defaults(fn=cmd_derive)
    p = sub.add_parser("build-teacher", help="rebuild the embedded tiny teacher from its recipe")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny" / "teacher.yaml"))
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_build_teacher)
    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--config", default=str(REPO / "configs" / "tiny" / "distill.yaml"))
    p.add_argument("--derive-config", default=str(REPO / "configs" / "tiny" / "derive.yaml"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("eval", help="benchmark teacher vs students with lm-eval")
    _config_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("warm", help="build DeepSpeed's JIT ops once")
    p.set_defaults(fn=cmd_warm)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except LLMDistillError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
