"""PyTorch backend of the activations family: y = f(x) and f'(x)·v elementwise, in the accumulation dtype.

Same signature as `flowkern.ops.activations.triton_launch` (formulas in kernels/activations.py). An input already in
its accumulation dtype (float32/float64) runs PyTorch's native kernels: `F.silu` / `F.gelu` for f(x) (one op for
autograd to differentiate) and `aten.silu_backward` / `aten.gelu_backward` for f'(x)·v (one elementwise pass where
the composite formula takes ten). Lower precisions are computed in float32 by the formulas below.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowkern._precision import accumulation_dtype

_NATIVE = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
# f'(x)·v: the native backward kernels, with v in the place of the incoming gradient
_NATIVE_JVP = {"silu": torch.ops.aten.silu_backward, "gelu": torch.ops.aten.gelu_backward,
               "gelu_tanh": lambda v, x: torch.ops.aten.gelu_backward(v, x, approximate="tanh")}


def _act_and_grad(x, kind: str):
    if kind == "silu":
        sig = torch.sigmoid(x)
        return x * sig, sig * (1 + x * (1 - sig))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)
    th = torch.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + th), 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 0.134145 * x * x)


def activation(x, v, *, kind: str, write_y: bool = True):
    """(f(x) if write_y else None, f'(x)·v if v is not None else None)."""
    acc = accumulation_dtype(x.dtype)
    if x.dtype == acc and (v is None or v.dtype == acc):
        return (_NATIVE[kind](x) if write_y else None), (_NATIVE_JVP[kind](v, x) if v is not None else None)
    f, df = _act_and_grad(x.to(acc), kind)
    y = f.to(x.dtype) if write_y else None
    yv = (df * v.to(acc)).to(v.dtype) if v is not None else None
    return y, yv


def _second_derivative(x, kind: str):
    """f''(x) (formulas in kernels/activations.py)."""
    if kind == "silu":
        sig = torch.sigmoid(x)
        return sig * (1 - sig) * (2 + x * (1 - 2 * sig))
    if kind == "gelu":
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (2 - x * x)
    c = math.sqrt(2 / math.pi)
    th = torch.tanh(c * (x + 0.044715 * x ** 3))
    du = c * (1 + 0.134145 * x * x)
    return (1 - th * th) * (du + 0.5 * x * (c * 0.26829 * x - 2 * th * du * du))


def curvature(x, v, g, *, kind: str):
    """f''(x)·v·g: the mixed term of reverse over forward (the gradient of ⟨g, f'(x)·v⟩ in x)."""
    acc = accumulation_dtype(x.dtype)
    return (_second_derivative(x.to(acc), kind) * v.to(acc) * g.to(acc)).to(x.dtype)
