"""Fused JVP-aware layer ops: norms, adaLN modulate, gated residual, activations, time embedding, linear.

Every op has a drop-in form that works under `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward
(the forward-mode tangent comes from the same fused pass as the output) and an explicit `*_jvp` form taking and
returning (primal, tangent) pairs.
"""
from flowkern.ops.norms import layer_norm, layer_norm_jvp, modulate, modulate_jvp, rms_norm, rms_norm_jvp

__all__ = ["layer_norm", "layer_norm_jvp", "modulate", "modulate_jvp", "rms_norm", "rms_norm_jvp"]
