#!/usr/bin/env bash
# Everything a GPU session has to run, in stages that each fit a 10-minute command:
#
#   bash bench/gpu_session.sh build   # build mtlsam_fast._C (CPU + CUDA) against this machine's torch
#   bash bench/gpu_session.sh test    # GPU tests: tests/gpu, the Triton and ops suites on CUDA
#   bash bench/gpu_session.sh bench   # Triton benchmark (P = 2^26), op sweep on cuda, end-to-end steps
#   bash bench/gpu_session.sh all     # the three in order
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
  $PY -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton.py tests/test_ops.py \
    tests/test_optim_behaviour.py 2>&1 | tee "$RESULTS/test.log" | tail -30
}

bench_stage() {
  $PY bench/bench_triton_gpu.py --out "$RESULTS/triton.json" 2>&1 | tee "$RESULTS/triton.log"
  $PY -m bench --device cuda --dtypes fp32,bf16 --K 4,8,16 --P 1e7,6.7e7 --budget 0.2 --no-peers \
    --out "$RESULTS" 2>&1 | tail -40
  $PY -m bench e2e --device cuda --reps 3 --out "$RESULTS" 2>&1 | tail -20
}

stage=${1:-all}
rc=0
case "$stage" in
  build) build || rc=$? ;;
  test) test_stage || rc=$? ;;
  bench) bench_stage || rc=$? ;;
  all) { build && test_stage && bench_stage; } || rc=$? ;;
  *) echo "usage: bash bench/gpu_session.sh [build|test|bench|all]" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then  # bring back what was written, also after a failure
  tar czf "$OUT/$gpu-$stage.tgz" -C bench/results "$gpu"
fi
exit $rc
