"""Triton kernels of attention and its fused forward-mode tangent: fwd (O, Ȯ, LSE), bwd (dQ, dK, dV), the shared
masked-score tile (scores), and the autotune candidate lists (configs)."""
