"""The fused op behind `flowkern.flow_map.jump`, on the shared contract (`flowkern._fused`).

Inputs (x, u, t, s, logp, div) with x, u: [B, F] (unit feature stride), t, s: [B] (float32, or float64 for float64
x), logp, div: [B] or None; outputs (y, ℓ'), ℓ' None without logp (docs/conventions.md):

    h = s − t,   y = x + h·u,   ℓ' = ℓ + h·D

* backward (reverse mode), g = ∂L/∂y and g_ℓ = ∂L/∂ℓ':
      ∂L/∂x = g,  ∂L/∂u = h·g,  ∂L/∂s = Σ_f g·u + g_ℓ·D = −∂L/∂t,  ∂L/∂ℓ = g_ℓ,  ∂L/∂D = h·g_ℓ
* tangent (forward mode), with ḣ = ṡ − ṫ:
      ẏ = ẋ + h·u̇ + ḣ·u,   ℓ̇' = ℓ̇ + h·Ḋ + ḣ·D
Both are elementwise PyTorch in the accumulation dtype: memory-bound like the forward, and far from the cost of the
model calls around a jump. Neither reads x or ℓ, which are not saved (a sampler may overwrite them).
"""
from __future__ import annotations

from dataclasses import dataclass

from flowkern._fused import FusedOp
from flowkern._precision import accumulation_dtype
from flowkern.flow_map import cuda_launch, reference, triton_launch

LAUNCHERS = {"torch": reference, "triton": triton_launch, "cuda": cuda_launch}


def _sum(*terms):
    """The sum of the terms that are not None (None if all are)."""
    present = [term for term in terms if term is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def _rate(t_t, s_t, acc):
    """ḣ = ṡ − ṫ (None when both are)."""
    return _sum(None if t_t is None else -t_t.to(acc), None if s_t is None else s_t.to(acc))


@dataclass(frozen=True)
class JumpOp(FusedOp):
    name: str
    backend: str
    n_inputs = 6
    n_outputs = 2
    native_autograd_on_torch = False  # the same rule (and dtypes of the gradients) on every backend

    def forward(self, inputs, tangents):
        y, logp_out = LAUNCHERS[self.backend].jump_fwd(*inputs)
        return (y, logp_out), None if tangents is None else self.tangent(inputs, tangents), ()

    def saved_inputs(self, inputs):
        x, u, t, s, logp, div = inputs
        return None, u, t, s, None, div

    def tangent(self, inputs, tangents):
        _, u, t, s, _, div = inputs
        x_t, u_t, t_t, s_t, lp_t, div_t = tangents
        acc = accumulation_dtype(u.dtype)
        h = s.to(acc) - t.to(acc)  # [B]
        dh = _rate(t_t, s_t, acc)
        y_t = _sum(None if x_t is None else x_t.to(acc), None if u_t is None else h[:, None] * u_t.to(acc),
                   None if dh is None else dh[:, None] * u.to(acc))
        y_t = (u.new_zeros(u.shape, dtype=acc) if y_t is None else y_t).to(u.dtype)
        if div is None:
            return y_t, None
        lacc = accumulation_dtype(div.dtype)
        logp_t = _sum(None if lp_t is None else lp_t.to(lacc), None if div_t is None else h.to(lacc) * div_t.to(lacc),
                      None if dh is None else dh.to(lacc) * div.to(lacc))
        return y_t, (div.new_zeros(div.shape, dtype=lacc) if logp_t is None else logp_t).to(div.dtype)

    def backward(self, inputs, aux, dy, needs):
        _, u, t, s, _, div = inputs
        g, g_lp = dy
        acc = accumulation_dtype(u.dtype)
        h = s.to(acc) - t.to(acc)  # [B]
        need_h = needs[2] or needs[3]
        dx = g if g is not None and needs[0] else None
        du = (h[:, None] * g.to(acc)).to(u.dtype) if g is not None and needs[1] else None
        dlp = g_lp if g_lp is not None and needs[4] else None
        ddiv = (h.to(g_lp.dtype) * g_lp).to(div.dtype) if g_lp is not None and needs[5] else None
        dh = None
        if need_h:
            dh = _sum(None if g is None else (g.to(acc) * u.to(acc)).sum(dim=1),
                      None if g_lp is None or div is None else g_lp.to(acc) * div.to(acc))
        dt = (-dh).to(t.dtype) if dh is not None and needs[2] else None
        ds = dh.to(s.dtype) if dh is not None and needs[3] else None
        return dx, du, dt, ds, dlp, ddiv
