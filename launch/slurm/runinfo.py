"""Print, as shell assignments, what the Slurm scripts need from a config: `eval "$(python runinfo.py ARGS)"`.

ARGS are what the trainer gets (`--config X key=value ...`), so the job scripts find the same run directory
and teacher as the run itself, with one source of truth (llmdistill.config) and no YAML parsing in bash.
By default only the config module is imported: this runs on the batch node before the heavy processes start.

TEACHER_SERVER / STUDENT_SERVER (1 or 0): whether the run reads a vLLM teacher server / a student rollout
server (TeacherConfig.reads_teacher_server / reads_student_server).

`--serve ROLE HOST PORT` (server.sbatch) also prints SERVE_ARGV and SERVE_ENV, bash arrays with the vLLM
server command for the config's teacher (ROLE teacher: llmdistill.teachers.vllm_serve.serve_command, top_k,
max length, dtype and teacher.serve.args from the config) or student (ROLE student:
llmdistill.cli.prepare_student_server, which writes the student's config and tokenizer into the run
directory), listening on HOST:PORT.
"""

import contextlib
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
            serve = (next(args), next(args), next(args))
        else:
            overrides.append(arg)
    # Library output on stdout (DeepSpeed's logger, say) goes to stderr: the job scripts eval stdout.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            cfg = load_config(config, overrides)
        except LLMDistillError as err:
            sys.exit(f"{config}: {err}")  # one line on stderr, exit status 1: the job scripts stop on it
        values = {
            "RUN_DIR": str(cfg.run.dir.resolve()),
            "RUN_NAME": cfg.run.name,
            "TEACHER_SOURCE": cfg.teacher.source,
            "TEACHER_SERVER": str(int(cfg.teacher.reads_teacher_server)),
            "STUDENT_SERVER": str(int(cfg.teacher.reads_student_server)),
        }
        lines = [f"{key}={shlex.quote(value)}" for key, value in values.items()]
        if serve is not None:
            lines.append(_serve(cfg, *serve))
    print("\n".join(lines))


def _serve(cfg, role: str, host: str, port: str) -> str:
    import torch

    gpu = torch.cuda.is_available()
    try:
        if role == "teacher":
            from llmdistill.teachers.vllm_serve import serve_command

            cfg.teacher.serve.port = int(port)
            command, env = serve_command(cfg, sys.executable, gpu, host)
        elif role == "student":
            from llmdistill.cli import prepare_student_server

            cfg.teacher.on_policy.server.urls = [f"http://{host}:{port}"]
            command, env = prepare_student_server(cfg, cfg.run.dir.resolve(), sys.executable, gpu, host)
        else:
            sys.exit(f"--serve: the role is teacher or student, not {role!r}")
    except LLMDistillError as err:
        sys.exit(f"{role} server: {err}")
    return "\n".join(
        [_array("SERVE_ARGV", command), _array("SERVE_ENV", [f"{k}={v}" for k, v in env.items()])]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
