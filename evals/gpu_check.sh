#!/usr/bin/env bash
# The GPU figures of README "Speed", in one run on a borrowed GPU machine with no network:
#   bash evals/gpu_check.sh            # logs go to $OUT (default /tmp/gpu-check)
# The machine's image has torch, transformers, peft and Triton but not all of our packages: they travel as
# wheels in .whl/ (pydantic, pydantic-core, annotated-types, typing-inspection, hjson, datasets, dill,
# multiprocess, liger-kernel, and DeepSpeed's sdist, built there with its ops off), as
# ../shared/notes/gpu.md describes. Fill .whl/ (git-ignored through .git/info/exclude) on a machine with
# PyPI, for the image's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types typing-inspection hjson datasets==5.2.0 dill multiprocess liger-kernel
#   pip download --no-deps --no-binary=:all: --no-build-isolation -d .whl deepspeed==0.19.8
# Each step has its own time limit (STEP_SECONDS, SET_SECONDS, LOSS_SECONDS), so one that fails or hangs still
# leaves the others' figures; the whole run should take under 11 minutes (the last, on an H200, took 9).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

log="$OUT/check.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$log" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" >>"$log"; exit 1; }
# DeepSpeed builds from its sdist on the CPU while the kernel tests use the GPU.
(DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target /tmp/site .whl/deepspeed-*.tar.gz >/tmp/deepspeed-install.log 2>&1; echo $? >/tmp/deepspeed.rc) &

# The kernels compiled for this GPU (the interpreted cases run in CI; the image's Triton 3.6 interpreter
# cannot run them).
echo "== tests/test_kernels.py on CUDA" >>"$log"
timeout 90 python3 -m pytest -q -p no:cacheprovider -k "cuda or bf16" tests/test_kernels.py >>"$log" 2>&1
echo "pytest exit $?" >>"$log"
wait
echo "== deepspeed install exit $(cat /tmp/deepspeed.rc)" >>"$log"
tail -5 /tmp/deepspeed-install.log >>"$log"

# In order of what README still lacks, each step under its own limit so a cut leaves the earlier figures:
# 1. the step, CE and KD, with the trainer's defaults (each mode spent ~50 s building its trainer on an H200;
#    its JSON line now says where: "setup_phases"). PROFILE=1 adds each variant's operator table (README's
#    account of the CE gap came from one); off by default, so the time goes to the ratios.
extra=()
[ -n "${PROFILE:-}" ] && extra+=(--profile "$OUT/profile")
step=(python3 evals/bench_step.py --shape llama-1b --device cuda --dtype bfloat16 --batch 8 --seq-len 2048
    --warmup 3 --rounds 4)
timeout "${STEP_SECONDS:-300}" "${step[@]}" --modes "${STEP_MODES:-ce,kd}" "${extra[@]}" \
    >"$OUT/bench_step.log" 2>&1
echo "bench_step exit $?" >>"$OUT/bench_step.log"

# 2. CE with a speed option (STEP_SET=KEY=VALUE, one config override) against the same plain loop; by
#    default DeepSpeed's bf16 master weights, like for like with the plain loop's bf16 weights. STEP_SET=none
#    skips it.
bf16_masters='deepspeed.extra={bf16: {bf16_master_weights_and_grads: true, bf16_optimizer_states: true}}'
set_option=${STEP_SET:-$bf16_masters}
if [ "$set_option" != none ]; then
    timeout "${SET_SECONDS:-150}" "${step[@]}" --modes ce --set "$set_option" >"$OUT/bench_step_set.log" 2>&1
    echo "bench_step --set exit $?" >>"$OUT/bench_step_set.log"
fi

# 3. The losses where README has no GPU figure yet: jsd at the largest shape, and the top-k teacher's
#    kernels (the "topk" and "topk-torch" columns) beside fkl and jsd. LOSS_ARGS replaces the shape.
read -r -a loss_args <<<"${LOSS_ARGS:---tokens 16384 --hidden 4096 --vocab 151936 --dtype bfloat16}"
timeout "${LOSS_SECONDS:-180}" python3 evals/bench_losses.py "${loss_args[@]}" --losses fkl,jsd --repeats 3 \
    >"$OUT/bench_losses.log" 2>&1
echo "bench_losses exit $?" >>"$OUT/bench_losses.log"
