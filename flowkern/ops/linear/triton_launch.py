"""The linear family on the Triton backend: the same GEMMs as `flowkern.ops.linear.reference` (cuBLAS through
torch.matmul on CUDA; a hand-written kernel gains nothing for a GEMM)."""
from flowkern.ops.linear.reference import linear_bwd, linear_fwd

__all__ = ["linear_bwd", "linear_fwd"]
