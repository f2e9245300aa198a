#!/usr/bin/env bash
# One GPU session: environment, GPU tests, GPU benchmarks. Run from a clean snapshot of the repo
# (see benchmarks/gpu/README.md); writes logs and JSON under $OUT (default ./gpu-out).
#
# The backward strategies at the training shape in one short call (about 4 minutes):
#   TEST_K="gather or auto or full_padded or memory or deterministic" BENCH_ARGS="--suites training" \
#     DIAG=1 COMPARE=1 bash benchmarks/gpu/run_gpu.sh
# DIAG=1 adds benchmarks/gpu/diagnose_backward.py (GPU-busy vs host time per step, D1024 and D768 ->
# $OUT/diag_{1024,768}.json), COMPARE=1 benchmarks/gpu/compare_default.py (the default vs
# late-interaction-kernels, 5 interleaved rounds, plus both captured in CUDA graphs -> $OUT/compare_default.json).
# SWEEP_WORKSPACE=1 adds the "gemm" workspace-cap sweep (benchmarks/gpu/sweep_workspace.py ->
# $OUT/workspace_sweep.json; SWEEP_CAPS overrides the caps, default 4-64 MiB).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SNAP=${SNAP:-.gpusnap}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
cd "$SNAP"
# source tree without an installed package: kernels/ is aladin_fast.kernels (setup.py's package_dir)
[ -d aladin_fast/kernels ] || cp -r kernels aladin_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton, aladin_fast; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0), 'aladin_fast', aladin_fast.__file__)" | tee "$OUT/versions.txt"
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_BUDGET=${BENCH_BUDGET:-200}
# TEST_FILES / TEST_K pick tests (e.g. TEST_K="backward or memory"), TEST_WORKERS the xdist processes
TEST_FILES=${TEST_FILES:-tests/test_gpu.py}
timeout "$TEST_TIMEOUT" python3 -m pytest $TEST_FILES -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" -rfE -s \
  ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -n 80 > "$OUT/gpu_tests.log"
echo "gpu tests exit: ${PIPESTATUS[0]}" >> "$OUT/gpu_tests.log"
timeout $((BENCH_BUDGET + 150)) python3 benchmarks/gpu/bench_gpu.py --out "$OUT/gpu_bench.json" --budget-s "$BENCH_BUDGET" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log" | tail -n 70
if [ -n "${SWEEP_WORKSPACE:-}" ]; then
  timeout 300 python3 benchmarks/gpu/sweep_workspace.py --out "$OUT/workspace_sweep.json" \
    --caps "${SWEEP_CAPS:-4,8,16,32,64}" 2>&1 | tee "$OUT/workspace_sweep.log" | tail -n 60
fi
if [ -n "${DIAG:-}" ]; then
  for d in 1024 768; do
    timeout 120 python3 benchmarks/gpu/diagnose_backward.py --dim $d --out "$OUT/diag_$d.json" \
      --aggregations MrSw,MwSr,symm --configs "${DIAG_CONFIGS:-auto,gather,dense,segmented,lik}" > "$OUT/diag_$d.log" 2>&1
  done
fi
if [ -n "${COMPARE:-}" ]; then
  timeout 180 python3 benchmarks/gpu/compare_default.py --rounds 5 --graphs --out "$OUT/compare_default.json" 2>&1 \
    | tee "$OUT/compare_default.log" | tail -n 16
fi
cat "$OUT/gpu_tests.log" | tail -n 25
