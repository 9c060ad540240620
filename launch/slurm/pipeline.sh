#!/bin/bash
# Submit the whole job as a Slurm dependency chain: derive -> (serve teacher) -> train -> eval.
#
#   launch/slurm/pipeline.sh [key=value ...]          # overrides for the training job
#   TRAIN_CONFIG=configs/tiny/vllm_server.yaml launch/slurm/pipeline.sh   # with a vLLM teacher job
#
# Environment (all optional):
#   DERIVE_CONFIG  derivation config (default configs/tiny/derive.yaml; empty: no derive job)
#   TRAIN_CONFIG   training config (default configs/tiny/distill.yaml); when it reads a vLLM teacher server
#                  (teacher.server.urls) or a student rollout server (teacher.on_policy.server.urls), a
#                  server.sbatch job serves each and the trainer waits for their URLs
#   EVAL_CONFIG    evaluation config (default configs/tiny/eval.yaml; empty: no eval job)
#   DERIVE_ARGS, EVAL_ARGS   key=value overrides for those two jobs (word-split)
#   SBATCH_ARGS    extra sbatch options for every job (e.g. "--partition=gpu --account=me")
#   DERIVE_SBATCH_ARGS, TEACHER_SBATCH_ARGS, STUDENT_SBATCH_ARGS, TRAIN_SBATCH_ARGS, EVAL_SBATCH_ARGS
#                  per job (word-split; TEACHER_ and STUDENT_ for the server jobs)
#   LLMDISTILL_PYTHON  interpreter for every job (default: .venv/bin/python if present, else python3)
#   DRY_RUN=1      print the sbatch commands instead of submitting them
#
# Prints one line per job, "<stage> <job id>", and the job logs go to each run directory's slurm/ folder.
# Every dependency is `afterok` (the trainer on a server: `after`, i.e. once the server job has started)
# with --kill-on-invalid-dep, so a failed stage cancels the rest instead of leaving them pending forever.
# Derive and eval are single-task jobs; train.sbatch and server.sbatch say how they use their allocation.
set -euo pipefail
# Failures inside $(...) (a bad config, a rejected sbatch) must stop the submission, not yield an empty id.
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
REPO=$PWD

DERIVE_CONFIG=${DERIVE_CONFIG-configs/tiny/derive.yaml}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/tiny/distill.yaml}
EVAL_CONFIG=${EVAL_CONFIG-configs/tiny/eval.yaml}
if [[ -z ${LLMDISTILL_PYTHON:-} ]]; then
  LLMDISTILL_PYTHON=python3
  if [[ -x .venv/bin/python ]]; then LLMDISTILL_PYTHON=$REPO/.venv/bin/python; fi
fi
export LLMDISTILL_PYTHON LLMDISTILL_REPO=$REPO
read -r -a common <<<"${SBATCH_ARGS:-}"
read -r -a derive_args <<<"${DERIVE_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"

run_dir() { # CONFIG [overrides...] -> the run directory the config resolves to
  local info RUN_DIR
  info=$("$LLMDISTILL_PYTHON" launch/slurm/runinfo.py --config "$@")
  eval "$(grep '^RUN_DIR=' <<<"$info")"
  echo "$RUN_DIR"
}

submit() { # STAGE EXTRA_ARGS_STRING sbatch-arguments... -> prints the job id
  local stage=$1 extra
  read -r -a extra <<<"$2"
  shift 2
  local cmd=(sbatch --parsable --kill-on-invalid-dep=yes "${common[@]}" "${extra[@]}" "$@")
  if [[ -n ${DRY_RUN:-} ]]; then
    echo "[$stage] $ ${cmd[*]}" >&2
    # A placeholder id per stage (this runs in a subshell: a counter would not survive).
    case $stage in derive) echo 1001 ;; teacher) echo 1002 ;; student) echo 1003 ;; train) echo 1004 ;; *) echo 1005 ;; esac
  else
    "${cmd[@]}" | cut -d';' -f1
  fi
}

# Resolve every config first: a bad one stops the submission before any job is queued.
derive_dir='' eval_dir=''
if [[ -n $DERIVE_CONFIG ]]; then derive_dir=$(run_dir "$DERIVE_CONFIG" "${derive_args[@]}"); fi
if [[ -n $EVAL_CONFIG ]]; then eval_dir=$(run_dir "$EVAL_CONFIG" "${eval_args[@]}"); fi
info=$("$LLMDISTILL_PYTHON" launch/slurm/runinfo.py --config "$TRAIN_CONFIG" "$@")
eval "$info"  # RUN_DIR, TEACHER_SERVER, STUDENT_SERVER of the training run
if [[ -z ${DRY_RUN:-} ]]; then
  mkdir -p "$RUN_DIR/slurm" ${derive_dir:+"$derive_dir/slurm"} ${eval_dir:+"$eval_dir/slurm"}
fi

after_derive=()
if [[ -n $DERIVE_CONFIG ]]; then
  derive=$(submit derive "${DERIVE_SBATCH_ARGS:-}" --job-name=llmdistill-derive --ntasks=1 \
    --output="$derive_dir/slurm/%x-%j.out" \
    --wrap="$(printf '%q ' "$LLMDISTILL_PYTHON" launch/derive.py \
      --config "$DERIVE_CONFIG" "${derive_args[@]}")")
  echo "derive $derive"
  after_derive=(--dependency="afterok:$derive")
fi

# Batch output next to the job's own log in the run directory, not in the submit directory.
train_out=--output=$RUN_DIR/slurm/%x-%j.out
train_deps=${after_derive[0]:-}
servers=''
for role in teacher student; do
  wanted=TEACHER_SERVER sbatch_args=${TEACHER_SBATCH_ARGS:-}
  if [[ $role == student ]]; then wanted=STUDENT_SERVER sbatch_args=${STUDENT_SBATCH_ARGS:-}; fi
  if [[ ${!wanted} == 1 ]]; then
    server=$(submit "$role" "$sbatch_args" "${after_derive[@]}" "$train_out" --job-name="llmdistill-$role" \
      launch/slurm/server.sbatch "$role" --config "$TRAIN_CONFIG" "$@")
    echo "$role $server"
    servers+=${servers:+:}$server
  fi
done
train_env=ALL
if [[ -n $servers ]]; then
  if [[ -n $train_deps ]]; then train_deps+=",after:$servers"; else train_deps=--dependency=after:$servers; fi
  train_env=ALL,LLMDISTILL_SERVER_JOBS=$servers
fi
train_args=(--export="$train_env" "$train_out")
if [[ -n $train_deps ]]; then train_args+=("$train_deps"); fi
train=$(submit train "${TRAIN_SBATCH_ARGS:-}" "${train_args[@]}" \
  launch/slurm/train.sbatch --config "$TRAIN_CONFIG" "$@")
echo "train $train"

if [[ -n $EVAL_CONFIG ]]; then
  eval_job=$(submit eval "${EVAL_SBATCH_ARGS:-}" --job-name=llmdistill-eval --ntasks=1 \
    --dependency="afterok:$train" --output="$eval_dir/slurm/%x-%j.out" \
    --wrap="$(printf '%q ' "$LLMDISTILL_PYTHON" launch/eval.py --config "$EVAL_CONFIG" "${eval_args[@]}")")
  echo "eval $eval_job"
fi
