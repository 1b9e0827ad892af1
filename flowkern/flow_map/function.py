"""The autograd.Function behind `flowkern.flow_map.jump`.

`FlowMapJump.apply(x, u, t, s, logp, div, backend)` with x, u: [B, F] (unit feature stride), t, s: [B] (float32, or
float64 for float64 x), logp, div: [B] or None. Returns (y, logp_out), logp_out None without logp:

    h = s − t,   y = x + h·u,   ℓ' = ℓ + h·D

* backward (reverse mode), g = ∂L/∂y and g_ℓ = ∂L/∂ℓ':
      ∂L/∂x = g,  ∂L/∂u = h·g,  ∂L/∂s = Σ_f g·u + g_ℓ·D = −∂L/∂t,  ∂L/∂ℓ = g_ℓ,  ∂L/∂D = h·g_ℓ
* jvp (forward mode), with ḣ = ṡ − ṫ:
      ẏ = ẋ + h·u̇ + ḣ·u,   ℓ̇' = ℓ̇ + h·Ḋ + ḣ·D
Both are elementwise PyTorch in float32 (float64 for float64 inputs): memory-bound like the forward, and far from
the cost of the model calls around a jump.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from flowkern.flow_map import cuda_launch, torch_launch, triton_launch
from flowkern.flow_map.torch_launch import acc_dtype

_LAUNCHERS = {"torch": torch_launch, "triton": triton_launch, "cuda": cuda_launch}


def launch(backend: str, x, u, t, s, logp, div, y, logp_out) -> None:
    _LAUNCHERS[backend].jump_fwd(x, u, t, s, logp, div, y, logp_out)


def _alloc(x, logp):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    logp_out = None if logp is None else torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)
    return y, logp_out


def _row(v: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1] for broadcasting over features."""
    return v[:, None]


class FlowMapJump(torch.autograd.Function):
    @staticmethod
    def forward(x, u, t, s, logp, div, backend: str):
        y, logp_out = _alloc(x, logp)
        launch(backend, x, u, t, s, logp, div, y, logp_out)
        return y, logp_out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, u, t, s, logp, div, backend = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, t, s, div)
        ctx.save_for_forward(u, t, s, div)
        ctx.dtypes = (x.dtype, u.dtype, t.dtype, s.dtype,
                      None if logp is None else logp.dtype, None if div is None else div.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_lp):
        u, t, s, div = ctx.saved_tensors
        x_dtype, u_dtype, t_dtype, s_dtype, lp_dtype, div_dtype = ctx.dtypes
        acc = acc_dtype(x_dtype)
        need = ctx.needs_input_grad
        h = s.to(acc) - t.to(acc)  # [B]
        dx = du = dt = ds = dlp = ddiv = None
        dh = None
        if g is not None:
            if need[0]:
                dx = g.to(x_dtype)
            if need[1]:
                du = (_row(h) * g.to(acc)).to(u_dtype)
            if need[2] or need[3]:
                dh = (g.to(acc) * u.to(acc)).sum(dim=1)
        if g_lp is not None:
            if need[4]:
                dlp = g_lp.to(lp_dtype)
            if need[5]:
                ddiv = (h.to(g_lp.dtype) * g_lp).to(div_dtype)
            if (need[2] or need[3]) and div is not None:
                term = (g_lp.to(acc) * div.to(acc))
                dh = term if dh is None else dh + term
        if dh is not None:
            if need[2]:
                dt = (-dh).to(t_dtype)
            if need[3]:
                ds = dh.to(s_dtype)
        return dx, du, dt, ds, dlp, ddiv, None

    @staticmethod
    def jvp(ctx, dx, du, dt, ds, dlp, ddiv, _dbackend):
        u, t, s, div = ctx.saved_tensors
        x_dtype = ctx.dtypes[0]
        acc = acc_dtype(x_dtype)
        h = s.to(acc) - t.to(acc)  # [B]
        dh = None
        if dt is not None:
            dh = -dt.to(acc)
        if ds is not None:
            dh = ds.to(acc) if dh is None else dh + ds.to(acc)
        y_t = torch.zeros(u.shape, dtype=acc, device=u.device)
        if dx is not None:
            y_t = y_t + dx.to(acc)
        if du is not None:
            y_t = y_t + _row(h) * du.to(acc)
        if dh is not None:
            y_t = y_t + _row(dh) * u.to(acc)
        lp_t = None
        if ctx.dtypes[4] is not None:
            lacc = acc_dtype(ctx.dtypes[4])
            lp_t = torch.zeros(t.shape, dtype=lacc, device=t.device)
            if dlp is not None:
                lp_t = lp_t + dlp.to(lacc)
            if ddiv is not None:
                lp_t = lp_t + h.to(lacc) * ddiv.to(lacc)
            if dh is not None:
                lp_t = lp_t + dh.to(lacc) * div.to(lacc)
            lp_t = lp_t.to(ctx.dtypes[4])
        return y_t.to(x_dtype), lp_t
