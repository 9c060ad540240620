"""Print, as shell assignments, what the Slurm scripts need from a config: `eval "$(python runinfo.py ARGS)"`.

ARGS are what the trainer gets (`--config X key=value ...`), so the job scripts find the same run directory
and teacher as the run itself, with one source of truth (llmdistill.config) and no YAML parsing in bash.
By default only the config module is imported: this runs on the batch node before the heavy processes start.

`--serve HOST PORT` (teacher.sbatch) also prints SERVE_ARGV and SERVE_ENV, bash arrays with the vLLM server
command for the config's teacher (llmdistill.teachers.vllm_serve.serve_command: top_k, max length, dtype and
teacher.serve.args all come from the config), listening on HOST:PORT.
"""

import shlex
import sys

from llmdistill.config import LLMDistillError, load_config


def _array(name: str, items: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(i) for i in items)})"


def main(argv: list[str]) -> None:
    config, overrides, serve = None, [], None
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config = next(args, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--serve":
            serve = (next(args), next(args))
        else:
            overrides.append(arg)
    try:
        cfg = load_config(config, overrides)
    except LLMDistillError as err:
        sys.exit(f"{config}: {err}")  # one line on stderr, exit status 1: the job scripts stop on it
    values = {
        "RUN_DIR": str(cfg.run.dir.resolve()),
        "RUN_NAME": cfg.run.name,
        "TEACHER_SOURCE": cfg.teacher.source,
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    if serve is not None:
        import torch

        from llmdistill.teachers.vllm_serve import serve_command

        host, port = serve
        cfg.teacher.serve.port = int(port)
        command, env = serve_command(cfg, sys.executable, torch.cuda.is_available(), host)
        print(_array("SERVE_ARGV", command))
        print(_array("SERVE_ENV", [f"{k}={v}" for k, v in env.items()]))


if __name__ == "__main__":
    main(sys.argv[1:])
