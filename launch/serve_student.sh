#!/usr/bin/env bash
# Start the vLLM server holding a copy of the student for on-policy rollouts
# (teacher.on_policy.generator: vllm_server), wait until it is healthy, print its URL and PID.
#
#   launch/serve_student.sh configs/tiny/on_policy_vllm_server.yaml [key=value ...]
#
# A shim onto `llmdistill serve-student`: the server listens on the port of teacher.on_policy.server.urls[0],
# starts with dummy weights and takes the trainer's every sync_every steps (vLLM dev mode: keep it on a
# trusted network). Stop it with `kill $(cat <pid file>)`.
# Environment: PYTHON (default .venv/bin/python or python3), SERVE_HOST (127.0.0.1), SERVE_DIR (where
# student_server.{url,pid,log} go; default runs/<run.name>), SERVE_TIMEOUT (seconds to wait, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
config=$1
shift
args=(serve-student --config "$config" --host "${SERVE_HOST:-127.0.0.1}" --timeout "${SERVE_TIMEOUT:-600}")
[[ -n ${SERVE_DIR:-} ]] && args+=(--dir "$SERVE_DIR")
exec "$PYTHON" -m llmdistill.cli "${args[@]}" "$@"
