"""The norms op family: LayerNorm, RMSNorm and adaLN modulate.

api.py: public drop-in and `*_jvp` forms (validation, dispatch); op.py: the `FusedOp`; reference.py: the PyTorch
backend; triton_launch.py: the Triton host launcher.
"""
from flowkern.ops.norms.api import layer_norm, layer_norm_jvp, modulate, modulate_jvp, rms_norm, rms_norm_jvp

__all__ = ["layer_norm", "layer_norm_jvp", "modulate", "modulate_jvp", "rms_norm", "rms_norm_jvp"]
