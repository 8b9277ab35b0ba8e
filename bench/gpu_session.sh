#!/usr/bin/env bash
# Everything a GPU session has to run, in stages that each fit a 10-minute command:
#
#   bash bench/gpu_session.sh build   # build mtlsam_fast._C (CPU + CUDA) against this machine's torch
#   bash bench/gpu_session.sh test    # GPU tests: tests/gpu, the Triton and ops suites on CUDA
#   bash bench/gpu_session.sh bench   # Triton benchmark (P = 2^26), op sweep on cuda, end-to-end steps
#   bash bench/gpu_session.sh all     # the three in order
#   bash bench/gpu_session.sh build test   # several stages in one command (the machine stays warm
#                                          # only ~30 s between commands, and a fresh one rebuilds)
#
# The bench stage in parts: triton, sweep, e2e. DEADLINE=540 bash bench/gpu_session.sh ... bounds
# the whole command (each stage gets what is left). The test stage runs the whole suite (the CUDA device
# joins every device-parametrized test), with pytest-xdist workers when it is installed.
#
# Results go to bench/results/<gpu>/ (e.g. bench/results/NVIDIA_H100_80GB_HBM3/): test.log,
# triton.json, triton.log, ops.json / summary.md / ... (python -m bench), e2e.json / e2e.txt. Commit
# them with the device named. When $OUT is set (the device tool), each stage also packs that folder
# into $OUT/<gpu>-<stage>.tgz, one file to bring back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').replace('/', '_'))")
RESULTS=bench/results/$gpu
mkdir -p "$RESULTS"
echo "GPU: $gpu   results: $RESULTS"

build() {
  # an H100/H200 needs sm_90 only (faster build); ninja builds incrementally on a warm machine
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace 2>&1 | tail -5
  $PY -c "import mtlsam_fast._C as C; assert C.has_cuda(), 'CUDA kernels missing'; print('extension:', C.__file__)"
}

test_stage() {
  local workers=()
  $PY -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m pytest -q -p no:cacheprovider "${workers[@]}" \
    --durations=10 tests 2>&1 | tee "$RESULTS/test.log" | tail -40
}

bench_triton() {
  $PY bench/bench_triton_gpu.py --out "$RESULTS/triton.json" 2>&1 | tee "$RESULTS/triton.log"
}

bench_sweep() {
  $PY -m bench --device cuda --dtypes fp32,bf16 --K 4,8,16 --P 1e7,6.7e7 --budget 0.2 --no-peers \
    --out "$RESULTS" 2>&1 | tail -40
}

bench_e2e() {
  $PY -m bench e2e --device cuda --reps 3 --out "$RESULTS" 2>&1 | tail -20
}

[ $# -eq 0 ] && set -- all
rc=0
for stage in "$@"; do
  if [ -n "${DEADLINE:-}" ] && [ -z "${_GPU_STAGE_CHILD:-}" ]; then
    # DEADLINE=<seconds>: every stage runs under `timeout` for what is left of it, so a command
    # limit never loses the results of the stages that finished
    left=$((DEADLINE - SECONDS))
    if [ "$left" -le 15 ]; then echo "stage $stage skipped: deadline"; rc=124; continue; fi
    # (the child reports its own failure; only the deadline is news here)
    _GPU_STAGE_CHILD=1 timeout "$left" bash "$0" "$stage" || { rc=$?; [ $rc -eq 124 ] && echo "stage $stage: deadline"; }
  else
    case "$stage" in
      build) build ;;
      test) test_stage ;;
      triton) bench_triton ;;
      sweep) bench_sweep ;;
      e2e) bench_e2e ;;
      bench) bench_triton && bench_sweep && bench_e2e ;;
      all) build && test_stage && bench_triton && bench_sweep && bench_e2e ;;
      *) echo "usage: bash bench/gpu_session.sh [build|test|bench|triton|sweep|e2e|all]..." >&2; exit 2 ;;
    esac || { rc=$?; echo "stage $stage failed (rc $rc)"; }
  fi
  if [ -n "${OUT:-}" ]; then  # bring back what was written after every stage, also after a failure
    tar czf "$OUT/$gpu-results.tgz" -C bench/results "$gpu"
  fi
done
exit $rc
