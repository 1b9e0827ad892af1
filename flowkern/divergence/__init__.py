"""Per-sample divergence div fn(x) = tr(∂fn/∂x) in forward mode: `divergence(fn, x, ...)` (docs/estimators.md).

Layout: `api.py` (the public function and its batched JVPs), `probes.py` (probe generation and the reduction, per
backend), `op.py` (the fused probe·(J·probe) reduction on the op contract), `reference.py` / `triton_launch.py` /
`cuda_launch.py` (the backends).
"""
from flowkern.divergence.api import BATCHING, METHODS, batched_jvp, divergence

__all__ = ["BATCHING", "METHODS", "batched_jvp", "divergence"]
