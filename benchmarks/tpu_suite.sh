#!/usr/bin/env bash
# The TPU benchmark suite in one run on a TPU VM (stages capped at 1140 s in all, compiles included):
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
. benchmarks/suite_stages.sh
suite_begin tpu_suite vim_jax.kernels.gla_tpu,vim_jax.kernels.selective_scan_tpu "$@"

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
export SUITE_MODELS="$(printf '%s\n' "${models[@]}")" SUITE_MODEL_ARGS="${model_args[*]}" SUITE_OUT="$out"
stage model 210 bash -c "$MODEL_RUNS" model_runs 50
stage efficiency 400 python3 benchmarks/efficiency.py --models vim_tiny,deit_tiny --sizes "$eff_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out"
stage vig 260 python3 benchmarks/efficiency.py --models vig_tiny,deit_tiny --sizes "$vig_sizes" \
  --train-sizes "" "${eff_args[@]}" --out "$out/vig"
suite_end
