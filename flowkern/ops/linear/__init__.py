"""The linear op family: the JVP-aware linear layer.

api.py: public drop-in and `*_jvp` forms (validation, dispatch); op.py: the `FusedOp`; reference.py: the PyTorch
backend; triton_launch.py: the Triton host launcher.
"""
from flowkern.ops.linear.api import linear, linear_jvp

__all__ = ["linear", "linear_jvp"]
