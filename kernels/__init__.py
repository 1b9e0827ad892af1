"""Triton kernels of flowkern (installed as `flowkern.kernels`).

Only `@triton.jit` functions and their autotune configs live here: no allocation, no maths on the host. Host
launchers are in `flowkern/ops/<family>/triton_launch.py` (layer ops) and `flowkern/<op>/triton_launch.py`.
Conventions (docs/ops.md): block sizes and feature flags are
`tl.constexpr`, shapes and strides never are; program ids are cast to int64 before they multiply a stride; every
dimension that can overrun is masked; each block value carries a shape comment.
"""
