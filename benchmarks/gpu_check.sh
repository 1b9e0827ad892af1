#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with a CUDA GPU:
#   bash benchmarks/fetch_wheels.sh      (once, on a machine with package-index access: optional baseline wheels)
#   bash benchmarks/gpu_check.sh         (installs .whl/*.whl when that folder is present)
# 1. GPU correctness: the test suite on the GPU (compiled Triton; FLOWKERN_AUTOTUNE=0 so each shape compiles once)
#    and the autotuned kernels at benchmark-like shapes; 2. the benchmarks (autotuned); 3. a short table last.
# Logs, the benchmark JSON and the table go to $OUT (default /tmp/flowkern-gpu). About 10 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flowkern-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
if compgen -G ".whl/*.whl" >/dev/null; then  # optional packages the machine lacks, from fetch_wheels.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  date $(date -u +%F)"
} | tee "$OUT/gpu.txt"

echo "== 1. correctness on the GPU"
FLOWKERN_AUTOTUNE=0 timeout 270 python3 -m pytest tests -q -p no:cacheprovider -m "not slow" \
  --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 120 python3 benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/correctness.log"

echo "== 2. benchmarks"
timeout 240 python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  -k "${FLOWKERN_BENCH_FILTER:-not causal}" 2>&1 | tee "$OUT/bench.log" | tail -3

echo "== 3. table"
python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/table.md"
