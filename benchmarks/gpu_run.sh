#!/bin/bash
# One device-tool call's worth of GPU work, in stages, each under a time guard, logs under $OUT.
#   bash benchmarks/gpu_run.sh STAGE[,STAGE...] [SECONDS]     (default budget 560 s)
# Stages: info, cayley (Cayley kernel sweep + comparison with XLA), tests (native kernel tests), layers (layer_bench --quick, all impls, permutation sweep, Cayley),
#         layers_tf32 (headline case with TF32 Cayley products), e2e1b (Llama-1B train_bench),
#         xq (Llama-8B XQ, then xq34b), xq34b (Llama-34B-class XQ mem), e2e8b (Llama-8B POET-X mem/fast),
#         shapes (fast/mem layers, POET-X vs weight-centric, at the headline, Llama-1B and Llama-8B shapes; Cayley
#         maps of 32 … 11008 blocks), e2e13b (Llama-13B POET-X mem), curves (300-step llama_20m loss curves,
#         Pallas vs XLA), scope_tests (shared Cayley maps and weight compute, natively), cayley_bf16 (the Cayley
#         map at every product precision, 32 … 11008 blocks), sweep_bf16 (Cayley tiles for bf16 products),
#         layers_bf16 (layers with bf16 Cayley products), profile_layers (the 4096² layer's device time by
#         source location, CUDA graphs off), chunk_tests (native tests of the chunked-index kernels), chunk_layers
#         (layers with perm_chunk 64: transposing vs chunked token-major kernels; 16 and 256 at 4096²),
#         profile_chunk (the 4096² layer on the chunked kernels, by source location), sweep_chunk (tiles of the
#         chunked kernels, then the headline layers at the table's tiles), loop_tests (native tests of the
#         backward token-loop kernels), sweep_loop (their tiles against the separate kernels, then layers),
#         e2e1b_loop (Llama-1B, AdamW vs POET-X fast, c=64).
# ttr: time to result of the llama_60m quality config (issue 22): POET and AdamW rows alone, then a warm-cache rerun.
# hf: the transformers round trip of the Hugging Face export/import (tests/test_hf_transformers.py; torch and
#     transformers are on the GPU box, not on CI).
# Environment: E2E_METHODS / E2E8_METHODS / E2E13_METHODS (train_bench --methods), E2E_OVERRIDES, E2E_PROFILE
#              (non-empty: e2e1b also prints each method's device time by source; traces in runs/prof), GPU_TESTS,
#              CURVE_RUNS (loss_curves --runs), CURVE_TIMEOUT (seconds per run), CURVE_STEPS, CURVE_ARGS (more
#              loss_curves flags, e.g. --no-noise-run).
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"   # runs/ is git-ignored
BUDGET=${2:-560}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
guard() { local l; l=$(left); [ "$l" -gt 20 ] && echo $(( $1 < l ? $1 : l )) || echo 0; }
run() {  # run NAME MAXSECONDS CMD...
  local name=$1 max=$2; shift 2
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
    tests) run tests 330 python -m pytest -q -m gpu ${GPU_TESTS:-tests/pallas}
           tail -3 "$OUT/tests.log" ;;
    layers) run layers 330 python benchmarks/layer_bench.py --quick --impls xla,xla_f,pallas_f,pallas --perm-sweep \
              --out "$OUT/layers.jsonl"
            grep -E "best|GB/s|x dense|blocks:|/ xla" "$OUT/layers.log" | head -60 ;;
    cayley) run cayley 150 python benchmarks/layer_bench.py --sweep --sweep-kernels cayley --no-layers \
              --out "$OUT/cayley.jsonl"
            grep -E "cayley |blocks:|/ xla" "$OUT/cayley.log" | head -40 ;;
    final_layers) run final_layers 230 python benchmarks/layer_bench.py --cases 16384x4096x4096x256,16384x4096x11008x256 \
              --impls xla,pallas_f --cayley-precision default --perms --out "$OUT/layers.jsonl"
            grep -E "x dense|blocks:|/ xla|GB/s|MISMATCH" "$OUT/final_layers.log" | head -40 ;;
    layers_tf32) run layers_tf32 150 python benchmarks/layer_bench.py --cases 16384x4096x4096x256,2048x4096x4096x256 \
              --impls xla,xla_f,pallas_f --cayley-precision default --no-cayley --out "$OUT/layers.jsonl"
            grep -E "x dense" "$OUT/layers_tf32.log" ;;
    e2e1b) run e2e1b 540 python benchmarks/train_bench.py --config configs/llama_1b.yaml --batch 8 --seq 1024 --steps 5 \
              --timeout 150 --methods "${E2E_METHODS:-adamw,poet_fast,poet_fast@pallas/features}" --out "$OUT/e2e.jsonl" \
              ${E2E_PROFILE:+--profile runs/prof} ${E2E_OVERRIDES:-}
           tail -14 "$OUT/e2e1b.log" ;;
    xq) run xq8b 250 python benchmarks/train_bench.py --config configs/llama_8b.yaml --batch 1 --seq 1024 --steps 5 \
              --timeout 120 --methods poet_xq_mem,poet_xq --out "$OUT/e2e.jsonl"
        tail -10 "$OUT/xq8b.log" ;&   # falls through: xq is xq8b, then the xq34b stage
    xq34b) run xq34b 300 python benchmarks/train_bench.py --config configs/llama_34b.yaml --batch 1 --seq 1024 --steps 3 \
              --timeout 290 --methods poet_xq_mem --out "$OUT/e2e.jsonl"
        tail -10 "$OUT/xq34b.log" ;;
    e2e8b) run e2e8b 300 python benchmarks/train_bench.py --config configs/llama_8b.yaml --batch 1 --seq 1024 --steps 5 \
              --timeout 140 --methods "${E2E8_METHODS:-poet_mem,poet_fast}" --out "$OUT/e2e.jsonl" ${E2E_OVERRIDES:-}
           tail -10 "$OUT/e2e8b.log" ;;
    shapes) run shapes 300 python benchmarks/layer_bench.py --impls pallas_f,weight --cayley-precision default \
              --cases 16384x4096x4096x256,16384x4096x11008x256,8192x2048x2048x256,8192x2048x5632x256,8192x5632x2048x256,1024x4096x4096x256,1024x4096x14336x256 \
              --cayley-blocks 32,154,3696,11008 --out "$OUT/layers.jsonl"
            grep -E "x dense|blocks:|/ xla|MISMATCH|FAILED" "$OUT/shapes.log" | head -60 ;;
    scope_tests) run scope_tests 120 python -m pytest -q tests/test_cayley_scope.py tests/test_compute.py
           tail -3 "$OUT/scope_tests.log" ;;
    e2e13b) run e2e13b 200 python benchmarks/train_bench.py --config configs/llama_13b.yaml --batch 1 --seq 1024 --steps 5 \
              --timeout 190 --methods "${E2E13_METHODS:-poet_mem}" --out "$OUT/e2e.jsonl" ${E2E_OVERRIDES:-}
           tail -8 "$OUT/e2e13b.log" ;;
    curves) run curves 560 python benchmarks/loss_curves.py --config configs/llama_20m.yaml --steps ${CURVE_STEPS:-300} \
              --out "$OUT/curves" ${CURVE_ARGS:-} \
              --timeout ${CURVE_TIMEOUT:-240} --runs "${CURVE_RUNS:-xla:optimizer.impl=xla,pallas:optimizer.impl=pallas}" \
              logging.diagnostics_interval=0 train.eval_batches=5
            tail -8 "$OUT/curves.log" ;;
    cayley_bf16) run cayley_bf16 200 python benchmarks/layer_bench.py --no-layers --cayley-blocks 32,154,3696,11008 \
              --out "$OUT/cayley.jsonl"
            grep -E "blocks:|/ " "$OUT/cayley_bf16.log" | head -30 ;;
    sweep_bf16) run sweep_bf16 150 python benchmarks/layer_bench.py --sweep --sweep-kernels cayley --no-layers --no-cayley \
              --sweep-cayley-blocks 154,3696 --sweep-cayley-precision bf16 --out "$OUT/cayley.jsonl"
            grep -E "cayley|TABLE" "$OUT/sweep_bf16.log" | tail -16 ;;
    profile_layers) XLA_FLAGS=--xla_gpu_enable_command_buffer= run profile_layers 150 python benchmarks/layer_bench.py \
              --cases 16384x4096x4096x256 --impls pallas_f --cayley-precision bf16 --no-cayley --repeats 7 --inner 20 \
              --profile runs/lprof --out "$OUT/layers.jsonl"
            grep -E "x dense|device time|  [0-9. ]+ ms " "$OUT/profile_layers.log" | head -60 ;;
    layers_bf16) run layers_bf16 200 python benchmarks/layer_bench.py --impls pallas_f,weight --cayley-precision bf16 \
              --cases 16384x4096x4096x256,16384x4096x11008x256,8192x2048x2048x256 --no-cayley --out "$OUT/layers.jsonl"
            grep -E "x dense|MISMATCH|FAILED" "$OUT/layers_bf16.log" | head -30 ;;
    chunk_tests) run chunk_tests 150 python -m pytest -q -m gpu tests/pallas/test_block_matmul_kernel.py \
              tests/pallas/test_layer_impl.py
           tail -3 "$OUT/chunk_tests.log" ;;
    chunk_layers) run chunk_layers 260 python benchmarks/layer_bench.py --impls pallas_f,pallas --perm-chunk 64 \
              --cases 16384x4096x4096x256,16384x4096x11008x256,8192x2048x2048x256 --cayley-precision bf16 --no-cayley \
              --out "$OUT/layers.jsonl"
            grep -E "x dense|MISMATCH|FAILED" "$OUT/chunk_layers.log" | head -30
            for c in 16 256; do
              run chunk_layers_c$c 90 python benchmarks/layer_bench.py --impls pallas_f,pallas,pallas_g --perm-chunk $c \
                --cases 16384x4096x4096x256 --variants fast --cayley-precision bf16 --no-cayley --out "$OUT/layers.jsonl"
              grep -E "x dense|MISMATCH|FAILED" "$OUT/chunk_layers_c$c.log" | head -8
            done ;;
    sweep_chunk) run sweep_chunk 300 python benchmarks/layer_bench.py --sweep --sweep-chunk 64 --no-cayley \
              --sweep-kernels rotate_fwd,rotate_bwd,reduce --perm-chunk 64 --impls pallas_f,pallas \
              --cases 16384x4096x4096x256,16384x4096x11008x256,8192x2048x2048x256 --cayley-precision bf16 --out "$OUT/sweep_chunk.jsonl"
            grep -E "chunked|x dense|MISMATCH|FAILED" "$OUT/sweep_chunk.log" | head -80 ;;
    profile_chunk) XLA_FLAGS=--xla_gpu_enable_command_buffer= run profile_chunk 150 python benchmarks/layer_bench.py \
              --cases 16384x4096x4096x256 --impls pallas --perm-chunk 64 --cayley-precision bf16 --no-cayley \
              --profile runs/lprof --out "$OUT/layers.jsonl"
            grep -E "x dense|device time|  [0-9. ]+ ms " "$OUT/profile_chunk.log" | head -60 ;;
    loop_tests) run loop_tests 150 python -m pytest -q -m gpu tests/pallas/test_block_matmul_kernel.py -k "loop or chunked"
           tail -3 "$OUT/loop_tests.log" ;;
    sweep_loop) run sweep_loop 300 python benchmarks/layer_bench.py --sweep --sweep-chunk 64 --no-cayley \
              --sweep-kernels loop_bwd --perm-chunk 64 --impls pallas \
              --cases 16384x4096x4096x256,16384x4096x11008x256,8192x2048x2048x256,8192x2048x5632x256 \
              --cayley-precision bf16 --out "$OUT/sweep_loop.jsonl"
            grep -E "chunked|replaces|x dense|MISMATCH|FAILED" "$OUT/sweep_loop.log" | head -80 ;;
    e2e1b_loop) run e2e1b_loop 400 python benchmarks/train_bench.py --config configs/llama_1b.yaml --batch 8 --seq 1024 \
              --steps 5 --timeout 150 --out "$OUT/e2e.jsonl" \
              --methods "${E2E_METHODS:-adamw,poet_fast+optimizer.perm_chunk=64}" optimizer.cayley_precision=bf16
           tail -8 "$OUT/e2e1b_loop.log" ;;
    ttr) # time to result (issue 22): the llama_60m quality config alone on the GPU, POET then AdamW, each on a
         # fresh compilation cache, then the POET run again on its now warm cache up to its first step.
         # Needs .gutenberg and its prepared shards (data/cache/gutenberg-*) carried.
         Q="python train.py --config configs/quality/gutenberg_60m.yaml out_dir=runs/ttr"
         P="optimizer.name=poet optimizer.block_size=256 optimizer.poet_lr=1e-3"
         rm -rf runs/ttr
         run ttr_poet ${TTR_LIMIT:-260} $Q $P train.compilation_cache=runs/ttr/cache_poet name=poet
         run ttr_adamw ${TTR_LIMIT:-260} $Q optimizer.name=adamw optimizer.lr=1e-3 train.compilation_cache=runs/ttr/cache_adamw name=adamw
         run ttr_warm 90 $Q $P train.compilation_cache=runs/ttr/cache_poet name=poet_warm train.stop_after=1
         python benchmarks/ttr_report.py runs/ttr/poet runs/ttr/adamw runs/ttr/poet_warm | tee "$OUT/ttr.txt" ;;
    hf) run hf 200 python -m pytest -q -s -rs tests/test_hf_transformers.py
        tail -12 "$OUT/hf.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "== done at $(( $(date +%s) - T0 )) s"
