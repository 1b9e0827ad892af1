"""Fused JVP-aware layer ops: norms, adaLN modulate, gated residual, activations, time embedding, linear.

Every op has a drop-in form that works under `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward
(the forward-mode tangent comes from the same fused pass as the output) and an explicit `*_jvp` form taking and
returning (primal, tangent) pairs; both outputs of a `*_jvp` form are differentiable. Tangents of parameters
(γ, β, shift, scale, gate, W, b) are supported. `flowkern.ops.reference` holds the pure-PyTorch versions.

One package per op family (norms, activations, residual, time_embedding, linear), each laid out alike: api.py (the
public functions), op.py (the `FusedOp`), reference.py (the PyTorch backend), triton_launch.py (the Triton host
launcher). Shared row layout: flowkern/ops/_rows.py; shared launch helpers: flowkern/ops/_launch.py.
"""
from flowkern.ops.activations import gelu, gelu_jvp, silu, silu_jvp
from flowkern.ops.linear import linear, linear_jvp
from flowkern.ops.norms import layer_norm, layer_norm_jvp, modulate, modulate_jvp, rms_norm, rms_norm_jvp
from flowkern.ops.residual import gated_residual, gated_residual_jvp
from flowkern.ops.time_embedding import time_embedding, time_embedding_jvp

__all__ = [
    "gated_residual", "gated_residual_jvp", "gelu", "gelu_jvp", "layer_norm", "layer_norm_jvp", "linear",
    "linear_jvp", "modulate", "modulate_jvp", "rms_norm", "rms_norm_jvp", "silu", "silu_jvp", "time_embedding",
    "time_embedding_jvp",
]

from flowkern.ops import reference  # noqa: E402,F401 - reads __all__ above
