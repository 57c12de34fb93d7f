#!/usr/bin/env bash
# The GPU benchmark suite in one command, for the device tool:
#   bash benchmarks/gpu_suite.sh            (results in ${OUT:-benchmarks/results}/gpu_<device>.txt)
# Runs the scan benchmark, the model benchmarks with the Pallas backend and the Vim vs DeiT sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
python -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
dev=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
log="$out_dir/gpu_${dev}.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python benchmarks/scan_bench.py
  for model in vim_tiny_patch16_224 vim_small_patch16_224 vim_base_patch16_224; do
    python benchmarks/cpu_model.py --model "$model" --batch 64 --backend pallas
  done
  python benchmarks/efficiency.py --models vim_tiny,deit_tiny,vim_small,deit_small --out "$out_dir"
} 2>&1 | tee "$log"
