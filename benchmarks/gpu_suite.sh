#!/usr/bin/env bash
# The GPU benchmark suite in one device call (stages capped at 520 s in all, compiles included):
#   bash benchmarks/gpu_suite.sh              results in ${OUT:-benchmarks/results}/gpu_suite/
#   bash benchmarks/gpu_suite.sh --rehearsal  the same stages on the CPU at tiny shapes in interpret
#                                             mode (CI runs it in a venv like the GPU machine's)
# Stages, each under its own time cap, the suite going on past a failed or timed-out one:
#   1 smoke       output and all eight gradients against the reference backend (segmented
#                 float32 at (2, 197, 384) reversed, bfloat16 at an odd size), both layouts of the
#                 scan kernels (tile, lanes), an eager call, a NaN check, and ptxas -v of the
#                 kernels this GPU's XLA compiled
#   2 gla         the GLA kernels (both directions in one launch) against the chunked XLA form on the
#                 GPU: outputs and gradients, then their times at ViG-T's shapes for 224 and 1024 px;
#                 the forward as one walk and as two phases, the faster written to gla_tuned.json,
#                 which stage 6 then uses ($VIM_JAX_GLA_TUNED)
#   3 sweep       spill-free launch candidates of both scan layouts (old tile, new lanes: each timed
#                 only once it reproduces the reference) at the shapes stages 4 and 5 run, winners
#                 written to tuned.json as found, which stages 4 and 5 then use ($VIM_JAX_SCAN_TUNED)
#   4 model       Vim-Ti batch 128 forward and train-step img/s and peak memory: Pallas bfloat16,
#                 Pallas float32, then the reference backend (each run under its own timeout)
#   5 efficiency  Vim-Ti vs DeiT-Ti at 1248 and 512 px (img/s, peak memory, OOM)
#   6 vig         ViG-T vs DeiT-T at 1024 px, the ViG paper's claim (4.8x faster, 10% of the memory)
# STAGES=smoke,vig (a comma-separated list) runs only those stages.
# Writes suite.log (everything printed), suite.json (each stage's status and seconds, rewritten
# as each stage ends, so a cut-off run still returns what finished) and the stages' own JSON
# files. Needs jax with CUDA, flax, optax, orbax; no TensorFlow and no network: the project is
# installed without build isolation or an index (the GPU machine has setuptools), or, failing
# that, run from the tree; the suite stops at once if vim_jax.kernels does not import.
set -uo pipefail
cd "$(dirname "$0")/.."
rehearsal=0
[ "${1:-}" = "--rehearsal" ] && rehearsal=1
out="${OUT:-benchmarks/results}/gpu_suite"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/suite.log"
: > "$log"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1 \
  || echo "pip install failed: running from the tree" | tee -a "$log"
export PYTHONUNBUFFERED=1
# From the tree: vim_jax from the repository root, its kernels from kernels/ (what the
# install maps to vim_jax.kernels).
if ! python3 -P -c "import vim_jax.kernels.selective_scan" >> "$log" 2>&1; then
  mkdir -p "$out/tree/vim_jax"
  ln -sfn "$PWD/kernels" "$out/tree/vim_jax/kernels"
  for f in vim_jax/*; do ln -sfn "$PWD/$f" "$out/tree/$f"; done
  export PYTHONPATH="$out/tree:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -P -c "import vim_jax.kernels.selective_scan" 2>&1 | tee -a "$log"; then
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

stage() {  # stage NAME SECONDS COMMAND...  (a rehearsal gets 3x the seconds: interpret mode on a CPU)
  local name=$1 cap=$(( $2 * (rehearsal ? 3 : 1) )); shift 2
  case ",${STAGES:-$name}," in *",$name,"*) ;; *) return 0 ;; esac
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
  cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

if [ "$rehearsal" = 1 ]; then
  tiny=(--tiny); model_args=(--img-size 32 --depth 1 --batch 2 --repeats 1); eff_sizes=64,32
  vig_sizes=64; eff_args=(--depth 1 --batch 1 --repeats 1); models=("vim_tiny_patch16_224 pallas bfloat16")
else
  tiny=(); model_args=(--batch 128 --repeats 5); eff_sizes=1248,512; vig_sizes=1024
  eff_args=(--run-timeout 45)
  models=("vim_tiny_patch16_224 pallas bfloat16" "vim_tiny_patch16_224 pallas float32"
          "vim_tiny_patch16_224 reference float32")
fi
export VIM_JAX_SCAN_TUNED="$out/tuned.json" VIM_JAX_GLA_TUNED="$out/gla_tuned.json"
echo '{}' > "$VIM_JAX_SCAN_TUNED"
echo '{}' > "$VIM_JAX_GLA_TUNED"
suite_t0=$SECONDS

stage smoke 90 python3 benchmarks/scan_bench.py --check --ptxas "${tiny[@]}" --json "$out/smoke.jsonl"
stage gla 100 python3 benchmarks/gla_bench.py --check "${tiny[@]}" --json "$out/gla.jsonl" \
  --tuned-out "$VIM_JAX_GLA_TUNED"
stage sweep 110 python3 benchmarks/scan_bench.py --sweep --budget 90 --repeats 5 "${tiny[@]}" \
  --tuned-out "$VIM_JAX_SCAN_TUNED" --json "$out/sweep.jsonl"
# Each model run under its own timeout, inside the stage's (stage runs a command, not a function).
export SUITE_MODELS="$(printf '%s\n' "${models[@]}")" SUITE_MODEL_ARGS="${model_args[*]}" SUITE_OUT="$out"
stage model 100 bash -c '
  rc=0
  while read -r name backend dtype; do
    [ -n "$name" ] || continue
    timeout --foreground --kill-after=5 55 python3 benchmarks/model_bench.py --model "$name" --backend "$backend" \
      --dtype "$dtype" $SUITE_MODEL_ARGS --json "$SUITE_OUT/model.jsonl" < /dev/null \
      || { rc=1; echo "model run $name $backend $dtype failed or timed out (exit $?)"; }
  done <<< "$SUITE_MODELS"
  exit $rc'
stage efficiency 60 python3 benchmarks/efficiency.py --models vim_tiny,deit_tiny --sizes "$eff_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out"
stage vig 60 python3 benchmarks/efficiency.py --models vig_tiny,deit_tiny --sizes "$vig_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out/vig"
write_json
cat "$out/suite.json" | tee -a "$log"
