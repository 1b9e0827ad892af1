"""The residual op family: the adaLN-zero gated residual.

api.py: public drop-in and `*_jvp` forms (validation, dispatch); op.py: the `FusedOp`; reference.py: the PyTorch
backend; triton_launch.py: the Triton host launcher.
"""
from flowkern.ops.residual.api import gated_residual, gated_residual_jvp

__all__ = ["gated_residual", "gated_residual_jvp"]
