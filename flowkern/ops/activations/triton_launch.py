"""Triton host launcher of the activations family (kernels/activations.py): allocate, grid, launch. No maths.

Same signature as `flowkern.ops.activations.reference`.
"""
from __future__ import annotations

import torch
import triton

from flowkern._fused import kernel_module
from flowkern.ops._launch import placeholder

ACTIVATION_BLOCK = 1024


def _act(kern, kind: str) -> int:
    return {"silu": kern.ACT_SILU, "gelu": kern.ACT_GELU, "gelu_tanh": kern.ACT_GELU_TANH}[kind]


def activation(x, v, *, kind: str, write_y: bool = True):
    kern = kernel_module("activations")
    act = _act(kern, kind)
    y = torch.empty_like(x) if write_y else None
    yv = torch.empty_like(v) if v is not None else None
    n = x.numel()
    if n == 0:
        return y, yv
    kern.activation_kernel[(triton.cdiv(n, ACTIVATION_BLOCK),)](
        x, placeholder(v, x), placeholder(y, x), placeholder(yv, x), n,
        ACT=act, WRITE_Y=write_y, HAS_V=v is not None, BLOCK=ACTIVATION_BLOCK, num_warps=4,
    )
    return y, yv


def curvature(x, v, g, *, kind: str):
    kern = kernel_module("activations")
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        kern.curvature_kernel[(triton.cdiv(n, ACTIVATION_BLOCK),)](x, v, g, out, n, ACT=_act(kern, kind),
                                                                  BLOCK=ACTIVATION_BLOCK, num_warps=4)
    return out
