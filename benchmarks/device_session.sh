#!/usr/bin/env bash
# One GPU session in one call: every GPU test (kernels, sparsity evidence, exactness), then
# the benchmarks, each under its own time limit, logs and JSON under $OUT (default
# runs/device). BENCHMARKS lists which run (default generate,kernels,read_counts; also
# longctx, with LONGCTX_ARGS; profile, the per-kernel split of a draft phase and a decode
# step; loop, a draft phase and a decode step in a device loop, under XLA's default flags
# and with CUDA graphs of loop bodies; "none" for the tests alone). TESTS selects the GPU
# tests (default: every GPU test, about 300 s; "none": no tests).
#
#   SPECATTN_DATA_DIR=path/to/gutenberg bash benchmarks/device_session.sh
#
# Runs from the repository root with the machine's own python3 (jax, flax, torch installed;
# the package itself need not be: PYTHONPATH points at the checkout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TESTS_S=${TESTS_S:-480} GENERATE_S=${GENERATE_S:-200} KERNELS_S=${KERNELS_S:-110}
COUNTS_S=${COUNTS_S:-60} LONGCTX_S=${LONGCTX_S:-300} PROFILE_S=${PROFILE_S:-150}
LOOP_S=${LOOP_S:-120}
TESTS=${TESTS:-tests/kernels tests/test_sparsity_evidence.py tests/test_gpu_exactness.py \
tests/test_attention.py tests/test_prefill.py}
BENCHMARKS=${BENCHMARKS:-generate,kernels,read_counts}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'

if [[ $TESTS != none ]]; then
  echo "== GPU tests"
  # shellcheck disable=SC2086  # TESTS is a list of paths
  SPECATTN_REPORT_DIR=$OUT timeout "$TESTS_S" python3 -m pytest -q -s -m gpu $TESTS \
    -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -E "^\{'check'|passed|failed|FAILED|Error" | tail -n 30
fi

if [[ $BENCHMARKS == *generate* ]]; then
  echo "== bench_generate"
  timeout "$GENERATE_S" python3 benchmarks/bench_generate.py --out "$OUT/bench_generate.json" \
    --contexts "${CONTEXTS:-32768,16384,4096}" ${GENERATE_ARGS:-} 2>&1 | tee "$OUT/bench_generate.log" | tail -n 25
fi

if [[ $BENCHMARKS == *kernels* ]]; then
  echo "== bench_kernels"
  timeout "$KERNELS_S" python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" \
    --budget $((KERNELS_S - 40)) --sections "${KERNEL_SECTIONS:-copy,topp,attention:core}" \
    2>&1 | tee "$OUT/bench_kernels.log" | tail -n 60
fi

if [[ $BENCHMARKS == *read_counts* ]]; then
  echo "== bench_read_counts"
  timeout "$COUNTS_S" python3 benchmarks/bench_read_counts.py --out "$OUT/bench_read_counts.json" \
    2>&1 | tee "$OUT/bench_read_counts.log" | tail -n 8
fi

if [[ $BENCHMARKS == *longctx* ]]; then
  echo "== bench_longctx"
  timeout "$LONGCTX_S" python3 benchmarks/bench_longctx.py --out "$OUT/bench_longctx.json" \
    --budget $((LONGCTX_S - 20)) ${LONGCTX_ARGS:-} 2>&1 | tee "$OUT/bench_longctx.log" | tail -n 40
fi

if [[ $BENCHMARKS == *profile* ]]; then
  echo "== profile_step"
  timeout "$PROFILE_S" python3 benchmarks/profile_step.py --out "$OUT/profile_step.json" \
    2>&1 | tee "$OUT/profile_step.log" | grep -vE "^(WARNING|I1|W1)" | tail -n 70
fi

if [[ $BENCHMARKS == *loop* ]]; then
  echo "== bench_step_loop (XLA's default flags, then CUDA graphs of while and scan bodies)"
  timeout $((LOOP_S / 2)) python3 benchmarks/bench_step_loop.py --out "$OUT/step_loop.json" \
    2>&1 | tee "$OUT/step_loop.log" | grep -E "^\{|rror"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    timeout $((LOOP_S / 2)) python3 benchmarks/bench_step_loop.py \
    --out "$OUT/step_loop_graphs.json" 2>&1 | tee "$OUT/step_loop_graphs.log" | grep -E "^\{|rror"
fi
