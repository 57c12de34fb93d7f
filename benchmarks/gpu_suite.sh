#!/usr/bin/env bash
# The GPU benchmark suite in one device call (stages capped at 400 s in all, compiles included):
#   bash benchmarks/gpu_suite.sh        results in ${OUT:-benchmarks/results}/gpu_suite/
# Stages, each under its own time cap, the suite going on past a failed or timed-out one:
#   1 smoke       both kernels compiled; output and all eight gradients against the reference
#                 backend at Vim-Ti's width and an odd one, float32 and bfloat16
#   2 sweep       kernel launch candidates at Vim-Ti/S/B shapes (batch 64 L 197, batch 8 L 6085)
#   3 model       Vim-Ti / Vim-S forward and train-step img/s and peak memory, Pallas vs reference
#   4 efficiency  Vim-Ti vs DeiT-Ti at 512, 738, 1024 and 1248 px (img/s, peak memory, OOM)
# Writes suite.log (everything printed), suite.json (each stage's status and seconds, rewritten
# as each stage ends, so a cut-off run still returns what finished) and the stages' own JSON
# files. Needs jax with CUDA, flax, optax, orbax; no TensorFlow and no network: the project is
# installed without build isolation or an index (the GPU machine has setuptools), or, failing
# that, run from the tree; the suite stops at once if vim_jax.kernels does not import.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}/gpu_suite"
mkdir -p "$out"
log="$out/suite.log"
: > "$log"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1 \
  || echo "pip install failed: running from the tree" | tee -a "$log"
export PYTHONUNBUFFERED=1
# From the tree: vim_jax from the repository root, its kernels from kernels/ (what the
# install maps to vim_jax.kernels).
if ! python3 -c "import vim_jax.kernels.selective_scan" >> "$log" 2>&1; then
  mkdir -p "$out/tree/vim_jax"
  ln -sfn "$PWD/kernels" "$out/tree/vim_jax/kernels"
  for f in vim_jax/*; do ln -sfn "$PWD/$f" "$out/tree/$f"; done
  export PYTHONPATH="$out/tree:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import vim_jax.kernels.selective_scan" 2>&1 | tee -a "$log"; then
  echo "vim_jax.kernels does not import: stopping" | tee -a "$log"
  printf '{"date": "%s", "stages": [], "error": "vim_jax.kernels does not import"}\n' "$(date -u +%FT%TZ)" \
    > "$out/suite.json"
  exit 1
fi
stages=()
write_json() {
  printf '{"date": "%s", "stages": [%s]}\n' "$(date -u +%FT%TZ)" "$(IFS=,; echo "${stages[*]}")" \
    > "$out/suite.json"
}

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
  write_json
}

{
  date -u
  git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

stage smoke 60 python3 benchmarks/scan_bench.py --check
stage sweep 100 python3 benchmarks/scan_bench.py --sweep --budget 90 --repeats 5 --json "$out/sweep.jsonl"
stage model 140 bash -c "
  for cfg in 'vim_tiny_patch16_224 pallas float32 128' 'vim_tiny_patch16_224 reference float32 128' \
             'vim_tiny_patch16_224 pallas bfloat16 128' 'vim_small_patch16_224 pallas bfloat16 64'; do
    set -- \$cfg
    timeout 60 python3 benchmarks/model_bench.py --model \$1 --backend \$2 --dtype \$3 --batch \$4 \
      --repeats 5 --json '$out/model.jsonl' || true
  done"
stage efficiency 100 python3 benchmarks/efficiency.py --models vim_tiny,deit_tiny \
  --sizes 1248,1024,738,512 --train-sizes "" --out "$out"

write_json
cat "$out/suite.json" | tee -a "$log"
