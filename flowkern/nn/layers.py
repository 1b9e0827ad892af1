"""Thin nn.Modules over `flowkern.ops`: parameters and state dicts as torch.nn's, forward through the fused ops.

`Linear`, `LayerNorm` and `RMSNorm` subclass `torch.nn.Linear` / `torch.nn.LayerNorm` / `torch.nn.RMSNorm`: same
parameters, same init, same `state_dict` keys (load either way), only `forward` differs. Every forward works under
`torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward, with the tangent from the fused pass.
Autocast does not reach custom autograd.Functions, so these modules apply it themselves: a `Linear` runs in the
autocast dtype; a norm runs in x's dtype with its parameters cast to it (float32 statistics inside the kernels).
"""
from __future__ import annotations

import torch

from flowkern import ops
from flowkern._validate import check_int
from flowkern.nn._cast import autocast_dtype, cast


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
        dtype = autocast_dtype(x)
        if dtype is None:
            return ops.linear(x, self.weight, self.bias)
        return ops.linear(cast(x, dtype), cast(self.weight, dtype), cast(self.bias, dtype))


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` over the last dim through `flowkern.ops.layer_norm` (normalized_shape: one int)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(check_int("normalized_shape", normalized_shape, minimum=1), eps=eps,
                         elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, cast(self.weight, x.dtype), cast(self.bias, x.dtype), self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` over the last dim through `flowkern.ops.rms_norm`; eps=None means finfo(x.dtype).eps,
    as in torch."""

    def __init__(self, normalized_shape: int, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(check_int("normalized_shape", normalized_shape, minimum=1), eps=eps,
                         elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return ops.rms_norm(x, cast(self.weight, x.dtype), eps)


class SiLU(torch.nn.Module):
    """`flowkern.ops.silu` as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu(x)


class GELU(torch.nn.Module):
    """`flowkern.ops.gelu` as a module; approximate: 'none' (exact) or 'tanh'."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x, self.approximate)


class Modulate(torch.nn.Module):
    """adaLN: z = norm(x)·(1 + scale) + shift, the parameter-free norm fused (`flowkern.ops.modulate`).

    x: [B, ..., D]; shift, scale: [B, D] (per sample) or x's shape; cast to x's dtype. norm: 'layer' or 'rms'."""

    def __init__(self, norm: str = "layer", eps: float = 1e-6):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.norm, self.eps = norm, eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ops.modulate(x, cast(shift, x.dtype), cast(scale, x.dtype), norm=self.norm, eps=self.eps)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, eps={self.eps}"


class GatedResidual(torch.nn.Module):
    """adaLN-zero residual x + gate·y (`flowkern.ops.gated_residual`); gate and y cast to x's dtype."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ops.gated_residual(x, cast(gate, x.dtype), cast(y, x.dtype))


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
