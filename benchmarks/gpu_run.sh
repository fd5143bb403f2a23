#!/bin/bash
# One device-tool call's worth of GPU work, in stages, each under a time guard, logs under $OUT.
#   bash benchmarks/gpu_run.sh STAGE[,STAGE...] [SECONDS]     (default budget 560 s)
# Stages and the variables that parameterize them (defaults in brackets):
#   info     the GPU, jax and flax versions
#   tests    pytest $TESTS                        [-m gpu tests/pallas]; the HF round trip: TESTS=tests/test_hf_transformers.py
#   layers   layer_bench.py $LAYER_ARGS           [--quick --impls xla,pallas_f]
#   sweep    layer_bench.py --sweep $SWEEP_ARGS   [--sweep-kernels cayley --no-layers]: tiles, printed as a TABLE literal
#   e2e      train_bench.py on $E2E_CONFIG        [configs/llama_1b.yaml], --batch $E2E_BATCH [8] --seq 1024
#            --steps 5, --methods $E2E_METHODS    [adamw,poet_fast], then $E2E_OVERRIDES (key=value ...)
#   profile  layer_bench.py on one case by source location, CUDA graphs off: $PROFILE_ARGS
#            [--cases 16384x4096x4096x256 --impls pallas_f --no-cayley]
#   quality  time to result of $QUALITY_CONFIG    [configs/quality/gutenberg_60m.yaml]: POET ($QUALITY_POET), then
#            AdamW ($QUALITY_ADAMW), each alone on a fresh compilation cache, then POET again on its warm cache;
#            benchmarks/ttr_report.py compares them. Needs .gutenberg and its prepared shards (data/cache/.gutenberg-*)
#            carried. $QUALITY_OVERRIDES go to every run.
# STAGE_LIMIT caps one stage's seconds (default: per stage below).
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"   # runs/ is git-ignored
BUDGET=${2:-560}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
guard() { local l; l=$(left); [ "$l" -gt 20 ] && echo $(( $1 < l ? $1 : l )) || echo 0; }
run() {  # run NAME MAXSECONDS CMD...
  local name=$1 max=${STAGE_LIMIT:-$2}; shift 2
  local t; t=$(guard "$max")
  if [ "$t" -le 0 ]; then echo "== $name skipped (no time left)"; return; fi
  echo "== $name (limit $t s, at $(( $(date +%s) - T0 )) s)"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? after $(( $(date +%s) - T0 )) s"
}
for stage in ${1//,/ }; do
  case $stage in
    info) nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
          python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
          cat "$OUT/gpu.txt" ;;
    tests) run tests 330 python -m pytest -q -rs ${TESTS:--m gpu tests/pallas}
           tail -5 "$OUT/tests.log" ;;
    layers) run layers 330 python benchmarks/layer_bench.py ${LAYER_ARGS:---quick --impls xla,pallas_f} \
              --out "$OUT/layers.jsonl"
            grep -E "x dense|blocks:|/ xla|MISMATCH|FAILED" "$OUT/layers.log" | head -60 ;;
    sweep) run sweep 300 python benchmarks/layer_bench.py --sweep ${SWEEP_ARGS:---sweep-kernels cayley --no-layers} \
              --out "$OUT/sweep.jsonl"
           grep -E "best|TABLE|x dense|MISMATCH" "$OUT/sweep.log" | head -60 ;;
    e2e) run e2e 540 python benchmarks/train_bench.py --config "${E2E_CONFIG:-configs/llama_1b.yaml}" --batch "${E2E_BATCH:-8}" \
              --seq 1024 --steps 5 --timeout 150 --methods "${E2E_METHODS:-adamw,poet_fast}" --out "$OUT/e2e.jsonl" \
              ${E2E_OVERRIDES:-}
         tail -14 "$OUT/e2e.log" ;;
    profile) XLA_FLAGS=--xla_gpu_enable_command_buffer= run profile 150 python benchmarks/layer_bench.py \
              ${PROFILE_ARGS:---cases 16384x4096x4096x256 --impls pallas_f --no-cayley} --repeats 7 --inner 20 \
              --profile runs/lprof --out "$OUT/layers.jsonl"
             grep -E "x dense|device time|  [0-9. ]+ ms " "$OUT/profile.log" | head -60 ;;
    quality) Q="python train.py --config ${QUALITY_CONFIG:-configs/quality/gutenberg_60m.yaml} out_dir=runs/ttr"
             POET=${QUALITY_POET:-optimizer.name=poet poet.block_size=256 optimizer.poet_lr=1e-3}
             ADAMW=${QUALITY_ADAMW:-optimizer.name=adamw optimizer.lr=1e-3}
             rm -rf runs/ttr
             run quality_poet 260 $Q $POET ${QUALITY_OVERRIDES:-} train.compilation_cache=runs/ttr/cache_poet name=poet
             run quality_adamw 260 $Q $ADAMW ${QUALITY_OVERRIDES:-} train.compilation_cache=runs/ttr/cache_adamw name=adamw
             run quality_warm 200 $Q $POET ${QUALITY_OVERRIDES:-} train.compilation_cache=runs/ttr/cache_poet \
               name=poet_warm
             python benchmarks/ttr_report.py runs/ttr/poet runs/ttr/adamw runs/ttr/poet_warm | tee "$OUT/quality.txt" ;;
    *) echo "unknown stage $stage (stages: info, tests, layers, sweep, e2e, profile, quality)" ;;
  esac
done
echo "== done at $(( $(date +%s) - T0 )) s"
