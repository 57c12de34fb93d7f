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
. benchmarks/suite_stages.sh
suite_begin gpu_suite vim_jax.kernels.selective_scan "$@"

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

stage smoke 90 python3 benchmarks/scan_bench.py --check --ptxas "${tiny[@]}" --json "$out/smoke.jsonl"
stage gla 100 python3 benchmarks/gla_bench.py --check "${tiny[@]}" --json "$out/gla.jsonl" \
  --tuned-out "$VIM_JAX_GLA_TUNED"
stage sweep 110 python3 benchmarks/scan_bench.py --sweep --budget 90 --repeats 5 "${tiny[@]}" \
  --tuned-out "$VIM_JAX_SCAN_TUNED" --json "$out/sweep.jsonl"
export SUITE_MODELS="$(printf '%s\n' "${models[@]}")" SUITE_MODEL_ARGS="${model_args[*]}" SUITE_OUT="$out"
stage model 100 bash -c "$MODEL_RUNS" model_runs 55
stage efficiency 60 python3 benchmarks/efficiency.py --models vim_tiny,deit_tiny --sizes "$eff_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out"
stage vig 60 python3 benchmarks/efficiency.py --models vig_tiny,deit_tiny --sizes "$vig_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out/vig"
suite_end
