#!/usr/bin/env bash
# The TPU benchmark suite in one run on a TPU VM (stages capped at 720 s in all, compiles included):
#   bash benchmarks/tpu_suite.sh              results in ${OUT:-benchmarks/results}/tpu_suite/
#   bash benchmarks/tpu_suite.sh --rehearsal  the same stages on the CPU at tiny shapes, the TPU kernels
#                                             in TPU interpret mode (CI runs it)
# No TPU has been lent to this project: this suite has only been rehearsed. Stages, each under its own
# time cap, the suite going on past a failed or timed-out one:
#   1 smoke       both mixers' Mosaic kernels (backend "pallas") against their XLA forms on the device:
#                 outputs and every gradient, float32 and bfloat16, both directions, a NaN check
#   2 mixers      kernel vs XLA-form times, forward and forward + backward, bfloat16, at the Ti models'
#                 shapes at 224 px (batch 128) and at 1248 px (Vim-Ti) / 1024 px (ViG-T)
#   3 model       Vim-Ti and ViG-T forward and train-step img/s and peak memory at batch 128, bfloat16:
#                 the kernels ("auto"), then the XLA forms (each run under its own timeout)
#   4 efficiency  Vim-Ti vs DeiT-Ti at 1248, 1024 and 512 px (img/s, peak memory, OOM)
#   5 vig         ViG-T vs DeiT-Ti at 1024 and 512 px
# STAGES=smoke,vig (a comma-separated list) runs only those stages.
# Writes suite.log (everything printed), suite.json (each stage's status and seconds, rewritten as each
# stage ends, so a cut-off run still returns what finished) and the stages' own files. Needs jax with
# libtpu, flax, optax; installs the project from the tree without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
rehearsal=0
[ "${1:-}" = "--rehearsal" ] && rehearsal=1
out="${OUT:-benchmarks/results}/tpu_suite"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/suite.log"
: > "$log"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1 \
  || echo "pip install failed: running from the tree" | tee -a "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -P -c "import vim_jax.kernels.gla_tpu, vim_jax.kernels.selective_scan_tpu" 2>&1 | tee -a "$log"; then
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
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

if [ "$rehearsal" = 1 ]; then
  # remat none: TPU interpret mode runs kernels through effectful callbacks, which remat refuses.
  tiny=(--tiny --repeats 1)
  model_args=(--img-size 32 --depth 1 --batch 2 --repeats 1 --remat none --tpu-kernels-on-cpu)
  eff_sizes=64,32; vig_sizes=64; eff_args=(--depth 1 --batch 1 --repeats 1)
  models=("vim_tiny_patch16_224 pallas" "vig_tiny_patch16_224 pallas")
else
  tiny=(); model_args=(--batch 128 --repeats 5); eff_sizes=1248,1024,512; vig_sizes=1024,512
  eff_args=(--run-timeout 60)
  models=("vim_tiny_patch16_224 auto" "vig_tiny_patch16_224 auto" "vim_tiny_patch16_224 reference"
          "vig_tiny_patch16_224 chunked")
fi

stage smoke 120 python3 benchmarks/tpu_bench.py --check "${tiny[@]}" --json "$out/smoke.jsonl"
stage mixers 150 python3 benchmarks/tpu_bench.py --time "${tiny[@]}" --json "$out/mixers.jsonl"
# Each model run under its own timeout, inside the stage's (stage runs a command, not a function).
export SUITE_MODELS="$(printf '%s\n' "${models[@]}")" SUITE_MODEL_ARGS="${model_args[*]}" SUITE_OUT="$out"
stage model 210 bash -c '
  rc=0
  while read -r name backend; do
    [ -n "$name" ] || continue
    timeout --foreground --kill-after=5 50 python3 benchmarks/model_bench.py --model "$name" --backend "$backend" \
      --dtype bfloat16 $SUITE_MODEL_ARGS --json "$SUITE_OUT/model.jsonl" < /dev/null \
      || { rc=1; echo "model run $name $backend failed or timed out (exit $?)"; }
  done <<< "$SUITE_MODELS"
  exit $rc'
stage efficiency 150 python3 benchmarks/efficiency.py --models vim_tiny,deit_tiny --sizes "$eff_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out"
stage vig 90 python3 benchmarks/efficiency.py --models vig_tiny,deit_tiny --sizes "$vig_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out/vig"
write_json
cat "$out/suite.json" | tee -a "$log"
