"""Real vLLM servers for the integration tests, started by the launch/ scripts a user runs and stopped by
their PID: the teacher's (launch/serve_teacher.sh) and the student's rollout server
(launch/serve_student.sh)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import QUICK, REPO, free_port

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class Server:
    """The teacher's vLLM server; stop() signals its PID and waits until it is gone. start() again brings it
    back on the same port."""

    role, config = "teacher", "configs/tiny/vllm_server.yaml"

    def __init__(self, tmp: Path):
        self.tmp, self.port, self.pid = tmp, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def overrides(self) -> list[str]:
        return [
            f"teacher.serve.port={self.port}",
            f"teacher.server.urls=[{self.url}]",
            "teacher.server.top_k=20",
        ]

    def start(self) -> None:
        env = dict(os.environ, **ENV, SERVE_DIR=str(self.tmp), PYTHON=sys.executable)
        cmd = ["bash", str(REPO / f"launch/serve_{self.role}.sh"), self.config, *QUICK]
        try:
            out = subprocess.run(
                [*cmd, *self.overrides()], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
        finally:
            pid_file = self.tmp / f"{self.role}_server.pid"
            self.pid = int(pid_file.read_text()) if pid_file.exists() else None
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == self.url

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(150):
                time.sleep(0.2)
                os.kill(self.pid, 0)
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = None


class StudentServer(Server):
    """The student's rollout server for teacher.on_policy.generator=vllm_server (the QUICK student)."""

    role, config = "student", "configs/tiny/on_policy_vllm_server.yaml"

    def overrides(self) -> list[str]:
        return [f"teacher.on_policy.server.urls=[{self.url}]"]
