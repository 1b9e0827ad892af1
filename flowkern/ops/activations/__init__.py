"""The activations op family: GELU (exact, tanh) and SiLU.

api.py: public drop-in and `*_jvp` forms (validation, dispatch); op.py: the `FusedOp`; reference.py: the PyTorch
backend; triton_launch.py: the Triton host launcher.
"""
from flowkern.ops.activations.api import gelu, gelu_jvp, silu, silu_jvp

__all__ = ["gelu", "gelu_jvp", "silu", "silu_jvp"]
