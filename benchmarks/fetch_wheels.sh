#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU session: downloads the wheels the GPU image lacks into .whl/
# (git-ignored), which the device tool carries (carry: [".whl"]) and gpu_check.sh installs.
# jvp-flash-attention is the public baseline of the attention benchmarks (pure Python + Triton).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "jvp-flash-attention==0.14.0"
ls -l .whl
