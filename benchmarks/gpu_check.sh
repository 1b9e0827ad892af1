#!/usr/bin/env bash
# The one script a session with a GPU lease runs (device tool), from the repository root:
#   bash benchmarks/gpu_check.sh
# 1. GPU correctness: the test suite on the GPU (compiled Triton, FLOWKERN_AUTOTUNE=0 so each shape compiles once),
#    plus an autotuned check at the benchmark shapes; 2. the benchmarks (autotuned); 3. a short table last.
# Logs and the benchmark JSON go to $OUT (the device tool brings them back). Budget: about 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flowkern-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried for packages the GPU image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/gpu.txt"

echo "== 1. correctness on the GPU"
FLOWKERN_AUTOTUNE=0 timeout 240 python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
timeout 120 python3 benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/correctness.log"

echo "== 2. benchmarks"
timeout 300 python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  -k "${FLOWKERN_BENCH_FILTER:-not causal}" 2>&1 | tee "$OUT/bench.log" | tail -3

echo "== 3. table"
python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/table.md"
