#!/usr/bin/env bash
# The distillation inner loop on one GPU: ours (JAX) and the PyTorch reference
# (benchmarks/reference_torch.py) side by side, in one call, through distill_memory.py.
#
#   OUT=/tmp/gpu benchmarks/distill_gpu.sh
#
# Needs one python (PYTHON, default python3) with jax[cuda], flax, optax and torch. Runs by
# importance and writes each run's JSON as soon as it is measured ($OUT/<run>.json, the
# distill_memory.py format) and the whole log ($OUT/log.txt), so a call cut short keeps what it
# measured; BUDGET_S (default 560) bounds the whole script.
# PLATFORM / PRESET override the platform and the model (PLATFORM=cpu PRESET=nf_tiny: a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill_gpu}
PY=${PYTHON:-python3}
PLATFORM=${PLATFORM:-gpu}
PRESET=${PRESET:-nf_resnet26_64}
DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
# XLA:GPU (jax 0.11.2) aborted compiling our student's meta-gradient in its Triton GEMM fusion
# pass; distill_memory.py's GPU children (like the CLI) run with it off (utils/hostenv.py).

bench() { # run name, then distill_memory.py arguments
  local name=$1 left
  shift
  left=$((DEADLINE - $(date +%s)))
  if ((left < 40)); then
    echo "=== skip $name: ${left} s left"
    return 1
  fi
  echo "=== $name ($(date +%T), ${left} s left)"
  timeout -k 5 "$left" "$PY" benchmarks/distill_memory.py --platform "$PLATFORM" \
    --timeout "$((left < 300 ? left : 300))" --json "$OUT/$name.json" "$@"
}

ok() { # run name, mode, steps: did that point measure?
  "$PY" -c "import json,sys; p=json.load(open('$OUT/$1.json'))['$2']['$3']; sys.exit('error' in p)"
}

if [[ $PLATFORM == gpu ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
fi
"$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"

# Both sides on a seconds-long model first: the GPU paths work and compute the same function.
smoke=(--preset nf_tiny --modes remat --steps 2 --iters 2 --no-flops --reference-python "$PY")
bench smoke "${smoke[@]}"
ok smoke remat 2 || exit 1

big=(--preset "$PRESET" --no-flops --reference-python "$PY" --no-reference-check)
# float32 on both sides (JAX's GPU default and torch's default convolutions would use TF32).
bench fp32_s5 "${big[@]}" --modes remat,unroll --steps 5 --iters 10
bench fp32_s40 "${big[@]}" --modes remat --steps 40 --iters 3
# TensorFloat-32 on both sides.
bench tf32_s5 "${big[@]}" --precision tensorfloat32 --modes remat,unroll --steps 5 --iters 10
# Ours with bfloat16 matmul operands (model matmul_dtype; the reference has no such mode).
bench bf16_s5 --preset "$PRESET" --no-flops --matmul-dtype bfloat16 --modes remat,unroll \
  --steps 5 --iters 10
# The same-function check on the big model, tesla's time, and the reference's 5 steps again.
bench check_s5 --preset "$PRESET" --no-flops --reference-python "$PY" --modes tesla --steps 5 \
  --iters 10
echo "=== done ($(date +%T))"
