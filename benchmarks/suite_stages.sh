# Sourced by benchmarks/gpu_suite.sh and benchmarks/tpu_suite.sh: what both suites do around
# their stages. Usage, in the suite: suite_begin NAME "MODULE[,MODULE]" "$@"; then stage ... per
# stage; then suite_end. Sets $rehearsal (1 with --rehearsal) and $out (the results folder).
set -o pipefail  # a stage's or the import check's status is its command's, not tee's

suite_begin() {  # suite_begin NAME MODULES ARGS...: the results folder, the install, the import check
  local name=$1 modules=$2; shift 2
  rehearsal=0
  [ "${1:-}" = "--rehearsal" ] && rehearsal=1
  export SUITE_REHEARSAL=$rehearsal
  out="${OUT:-benchmarks/results}/$name"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  log="$out/suite.log"
  : > "$log"
  stages=()
  python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1 \
    || echo "pip install failed: running from the tree" | tee -a "$log"
  export PYTHONUNBUFFERED=1
  # From the tree: vim_jax from the repository root, its kernels from kernels/ (what the
  # install maps to vim_jax.kernels).
  if ! python3 -P -c "import $modules" >> "$log" 2>&1; then
    mkdir -p "$out/tree/vim_jax"
    ln -sfn "$PWD/kernels" "$out/tree/vim_jax/kernels"
    for f in vim_jax/*; do ln -sfn "$PWD/$f" "$out/tree/$f"; done
    export PYTHONPATH="$out/tree${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -P -c "import $modules" 2>&1 | tee -a "$log"; then
    echo "$modules does not import: stopping" | tee -a "$log"
    printf '{"date": "%s", "stages": [], "error": "%s does not import"}\n' "$(date -u +%FT%TZ)" "$modules" \
      > "$out/suite.json"
    exit 1
  fi
  {
    date -u
    cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  } 2>&1 | tee -a "$log"
}

write_json() {  # suite.json: each stage's status and seconds so far
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

# The model stage's command: each model run under its own timeout, inside the stage's (a stage
# runs a command, not a function): stage model CAP bash -c "$MODEL_RUNS" model_runs RUN_CAP (a
# rehearsal triples RUN_CAP, as it does every stage's cap), with
# lines "MODEL BACKEND [DTYPE]" (default bfloat16) in $SUITE_MODELS and model_bench's options in
# $SUITE_MODEL_ARGS; results appended to $SUITE_OUT/model.jsonl.
MODEL_RUNS='
  rc=0
  while read -r name backend dtype; do
    [ -n "$name" ] || continue
    timeout --foreground --kill-after=5 "$(( $1 * (SUITE_REHEARSAL ? 3 : 1) ))" python3 benchmarks/model_bench.py \
      --model "$name" --backend "$backend" --dtype "${dtype:-bfloat16}" $SUITE_MODEL_ARGS \
      --json "$SUITE_OUT/model.jsonl" < /dev/null \
      || { status=$?; rc=1; echo "model run $name $backend ${dtype:-bfloat16} failed or timed out (exit $status)"; }
  done <<< "$SUITE_MODELS"
  exit $rc'

suite_end() {
  write_json
  cat "$out/suite.json" | tee -a "$log"
}
