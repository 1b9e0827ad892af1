"""The linear family's maths, run by both backends: y = xWᵀ + b, ẏ = [x; ẋ]·Wᵀ's tangent rows (+ xẆᵀ + ḃ), and the
backward dx = dy·W, dW = dyᵀx, db = Σ dy, on [M, K] rows."""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype


def linear_fwd(x2, weight, bias, x_t2, weight_t, bias_t, *, tangent: bool):
    """(y, ẏ) of [M, K] rows (ẏ None unless `tangent`); x_t2 None means ẋ = 0 (only the parameters move)."""
    if x_t2 is None:
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if not tangent:
            return y, None
        y_t = x2 @ weight_t.t() if weight_t is not None else torch.zeros_like(y)
    else:
        m = x2.shape[0]
        out = torch.cat([x2, x_t2]) @ weight.t()  # [2M, N]: one GEMM, one read of W
        y, y_t = out[:m], out[m:]
        if bias is not None:
            y.add_(bias)  # the primal rows only
        if weight_t is not None:
            y_t.addmm_(x2, weight_t.t())
    if bias_t is not None:
        y_t.add_(bias_t)
    return y, y_t


def linear_bwd(x2, weight, bias, dy2, *, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx [M, K], dW [N, K], db [N]) of [M, K] rows, each None unless needed; db summed in the accumulation dtype."""
    dx = dy2 @ weight if need_dx else None
    dw = dy2.t() @ x2 if need_dw else None
    db = dy2.sum(0, dtype=accumulation_dtype(dy2.dtype)).to(bias.dtype) if need_db else None
    return dx, dw, db
