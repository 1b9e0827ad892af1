"""The time_embedding op family: the sinusoidal time-pair embedding.

api.py: public drop-in and `*_jvp` forms (validation, dispatch); op.py: the `FusedOp`; reference.py: the PyTorch
backend; triton_launch.py: the Triton host launcher.
"""
from flowkern.ops.time_embedding.api import time_embedding, time_embedding_jvp

__all__ = ["time_embedding", "time_embedding_jvp"]
