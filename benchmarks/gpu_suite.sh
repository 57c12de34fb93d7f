#!/usr/bin/env bash
# The GPU benchmark suite in one device call (at most 8 minutes on an H100, compiles included):
#   bash benchmarks/gpu_suite.sh        results in ${OUT:-benchmarks/results}/gpu_suite/
# Stages, each under its own time cap, the suite going on past a failed or timed-out one:
#   1 smoke       both kernels compiled; output and all eight gradients against the reference
#                 backend at Vim-Ti's width and an odd one, float32 and bfloat16
#   2 sweep       kernel launch candidates at Vim-Ti/S/B shapes (batch 64 L 197, batch 8 L 6085)
#   3 model       Vim-Ti / Vim-S forward and train-step img/s and peak memory, Pallas vs reference
#   4 efficiency  Vim-Ti vs DeiT-Ti at 512, 738, 1024 and 1248 px (img/s, peak memory, OOM)
# Writes suite.log (everything printed), suite.json (each stage's status and seconds) and the
# stages' own JSON files. Needs jax with CUDA, flax, optax, orbax; no TensorFlow.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}/gpu_suite"
mkdir -p "$out"
log="$out/suite.log"
: > "$log"
python -m pip install -q --no-deps -e . >> "$log" 2>&1 || echo "pip install -e . failed" | tee -a "$log"
export PYTHONUNBUFFERED=1
stages=()

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  local t0=$SECONDS rc
  echo "=== stage $name (cap ${cap}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local status=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
  echo "=== stage $name: $status after $((SECONDS - t0)) s" | tee -a "$log"
  stages+=("{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - t0))}")
}

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

stage smoke 80 python benchmarks/scan_bench.py --check
stage sweep 110 python benchmarks/scan_bench.py --sweep --budget 90 --repeats 5 --json "$out/sweep.jsonl"
stage model 150 bash -c "
  for cfg in 'vim_tiny_patch16_224 pallas float32 128' 'vim_tiny_patch16_224 reference float32 128' \
             'vim_tiny_patch16_224 pallas bfloat16 128' 'vim_small_patch16_224 pallas bfloat16 64'; do
    set -- \$cfg
    python benchmarks/model_bench.py --model \$1 --backend \$2 --dtype \$3 --batch \$4 --repeats 5 \
      --json '$out/model.jsonl' || true
  done"
stage efficiency 120 python benchmarks/efficiency.py --models vim_tiny,deit_tiny \
  --sizes 1248,1024,738,512 --train-sizes "" --out "$out"

printf '{"date": "%s", "stages": [%s]}\n' "$(date -u +%FT%TZ)" "$(IFS=,; echo "${stages[*]}")" \
  > "$out/suite.json"
cat "$out/suite.json" | tee -a "$log"
