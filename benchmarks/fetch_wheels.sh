#!/usr/bin/env bash
# Run on a machine with package-index access before the GPU check: downloads the wheels of optional packages into
# .whl/ (git-ignored); copy that folder along with the repository and benchmarks/gpu_check.sh installs them.
# jvp-flash-attention is the public baseline of the attention benchmarks (pure Python + Triton).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "jvp-flash-attention==0.14.0"
ls -l .whl
