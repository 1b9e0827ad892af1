"""Thin nn.Modules over `flowkern.ops`: parameters and state dicts as torch.nn's, forward through the fused ops.

`Linear`, `LayerNorm` and `RMSNorm` subclass `torch.nn.Linear` / `torch.nn.LayerNorm` / `torch.nn.RMSNorm`: same
parameters, same init, same `state_dict` keys (load either way), only `forward` differs. Every forward works under
`torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward, with the tangent from the fused pass.
Autocast does not reach custom autograd.Functions, so these modules apply it themselves: a `Linear` runs in the
autocast dtype; a norm runs in x's dtype with its parameters cast to it (float32 statistics inside the kernels).
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

from flowkern import ops
from flowkern._validate import check_finite_scalar, check_int
from flowkern.nn._cast import autocast_dtype, cast
from flowkern.nn._plain import in_plain_pass, inputs_ok, per_row_ok, runs_plain
from flowkern.ops.activations.api import activation_prevalidated
from flowkern.ops.linear.api import linear_prevalidated
from flowkern.ops.norms.api import modulate_prevalidated
from flowkern.ops.residual.api import gated_residual_prevalidated
from flowkern.ops.norms.reference import native_modulate
from flowkern.ops.residual.reference import native_gated_residual


class Linear(torch.nn.Linear):
    """`torch.nn.Linear` through `flowkern.ops.linear` ([x; ẋ] in one GEMM under forward AD).

    zero_init=True zeroes weight and bias (adaLN-zero modulation, output heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, zero_init: bool = False,
                 device=None, dtype=None):
        super().__init__(check_int("in_features", in_features, minimum=1),
                         check_int("out_features", out_features, minimum=1), bias=bias, device=device, dtype=dtype)
        if zero_init:
            torch.nn.init.zeros_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return F.linear(x, self.weight, self.bias)
        dtype = autocast_dtype(x)
        if dtype is None:
            if inputs_ok(x, self.weight, self.bias, features=self.in_features):
                if runs_plain(x, self.weight, self.bias):
                    return F.linear(x, self.weight, self.bias)
                return linear_prevalidated(x, self.weight, self.bias)
            return ops.linear(x, self.weight, self.bias)
        return ops.linear(cast(x, dtype), cast(self.weight, dtype), cast(self.bias, dtype))


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` over the last dim through `flowkern.ops.layer_norm` (normalized_shape: one int)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(check_int("normalized_shape", normalized_shape, minimum=1), eps=eps,
                         elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight, bias = cast(self.weight, x.dtype), cast(self.bias, x.dtype)
        if inputs_ok(x, weight, bias, features=self.normalized_shape[0]) and runs_plain(x, weight, bias):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return ops.layer_norm(x, weight, bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` over the last dim through `flowkern.ops.rms_norm`; eps=None means finfo(x.dtype).eps,
    as in torch."""

    def __init__(self, normalized_shape: int, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(check_int("normalized_shape", normalized_shape, minimum=1), eps=eps,
                         elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        weight = cast(self.weight, x.dtype)
        if inputs_ok(x, weight, features=self.normalized_shape[0]) and runs_plain(x, weight):
            return F.rms_norm(x, self.normalized_shape, weight, eps)
        return ops.rms_norm(x, weight, eps)


class SiLU(torch.nn.Module):
    """`flowkern.ops.silu` as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return F.silu(x)
        if inputs_ok(x):
            return F.silu(x) if runs_plain(x) else activation_prevalidated(x, "silu")
        return ops.silu(x)


class GELU(torch.nn.Module):
    """`flowkern.ops.gelu` as a module; approximate: 'none' (exact) or 'tanh'."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return F.gelu(x, approximate=self.approximate)
        if inputs_ok(x):
            if runs_plain(x):
                return F.gelu(x, approximate=self.approximate)
            return activation_prevalidated(x, "gelu" if self.approximate == "none" else "gelu_tanh")
        return ops.gelu(x, self.approximate)


class Modulate(torch.nn.Module):
    """adaLN: z = norm(x)·(1 + scale) + shift, the parameter-free norm fused (`flowkern.ops.modulate`).

    x: [B, ..., D]; shift, scale: [B, D] (per sample) or x's shape; cast to x's dtype. norm: 'layer' or 'rms'."""

    def __init__(self, norm: str = "layer", eps: float = 1e-6):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        eps = check_finite_scalar("eps", eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.norm, self.eps = norm, eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return native_modulate(x, shift, scale, is_rms=self.norm == "rms", eps=self.eps)
        shift, scale = cast(shift, x.dtype), cast(scale, x.dtype)
        if inputs_ok(x, shift, scale) and shift.shape == scale.shape and per_row_ok(shift, x, shared_ok=False):
            if runs_plain(x, shift, scale):
                return native_modulate(x, shift, scale, is_rms=self.norm == "rms", eps=self.eps)
            return modulate_prevalidated(x, shift, scale, is_rms=self.norm == "rms", eps=self.eps)
        return ops.modulate(x, shift, scale, norm=self.norm, eps=self.eps)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, eps={self.eps}"


class GatedResidual(torch.nn.Module):
    """adaLN-zero residual x + gate·y (`flowkern.ops.gated_residual`); gate and y cast to x's dtype."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if in_plain_pass():
            return native_gated_residual(x, gate, y)
        gate, y = cast(gate, x.dtype), cast(y, x.dtype)
        if inputs_ok(x, gate, y) and y.shape == x.shape and per_row_ok(gate, x, shared_ok=True):
            if runs_plain(x, gate, y):
                return native_gated_residual(x, gate, y)
            return gated_residual_prevalidated(x, gate, y)
        return ops.gated_residual(x, gate, y)


class AdaLNModulation(torch.nn.Module):
    """The adaLN(-zero) projection of a conditioning vector: silu(c) → Linear(cond_dim → chunks·dim) → chunks.

    Zero-initialised (adaLN-zero): at init every shift, scale and gate is 0, so each gated block is the identity.
    forward(c [B, cond_dim]) -> tuple of `chunks` tensors [B, dim]."""

    def __init__(self, cond_dim: int, dim: int, chunks: int, *, zero_init: bool = True):
        super().__init__()
        self.chunks = check_int("chunks", chunks, minimum=1)
        self.act = SiLU()
        self.proj = Linear(cond_dim, self.chunks * check_int("dim", dim, minimum=1), zero_init=zero_init)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(self.act(c)).chunk(self.chunks, dim=-1)
