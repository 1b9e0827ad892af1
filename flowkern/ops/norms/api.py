"""LayerNorm, RMSNorm and adaLN `modulate` (norm fused with the modulation), forward and tangent in one pass.

Drop-in forms (`layer_norm`, `rms_norm`, `modulate`) work under `torch.func.jvp`, `torch.autograd.forward_ad`
and ordinary backward, with the forward-mode tangent from the same kernel pass as the output; explicit forms
(`*_jvp`) take and return (primal, tangent) pairs. Tangents of the parameters (γ, β, shift, scale) are supported
(under `torch.func.jvp` with respect to parameters too): ẏ = P(ẋ)·w + x̂·ẇ + ḃ.
"""
from __future__ import annotations

from flowkern._validate import check_finite_scalar
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern.ops._rows import check_tangent, param_group, row_layout, select_row_backend
from flowkern.ops.norms.op import NormOp

NORMS = ("layer", "rms")


def _norm_op(op: str, x, w, b, eps, *, is_rms: bool, one_plus: bool, w_name: str, b_name: str,
             per_sample: bool) -> NormOp:
    layout = row_layout("x", x)
    eps = check_finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    groups = {}
    for name, p in ((w_name, w), (b_name, b)):
        if p is not None:
            groups[name] = param_group(name, p, "x", x, shared_ok=not per_sample, per_sample_ok=per_sample)
    if len(set(groups.values())) > 1:
        raise ValueError(f"{w_name} and {b_name} must have the same shape, got {tuple(w.shape)} and {tuple(b.shape)}")
    group = next(iter(groups.values()), layout.rows)
    backend = select_row_backend(op, x, layout.n_cols)
    return NormOp(op, backend, is_rms, one_plus, eps, group)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """`F.layer_norm(x, (D,), weight, bias, eps)` over the last dim, with a fused forward-mode rule.

    y = x̂·γ + β with x̂ = (x − mean)/√(var + ε) (biased variance); ẏ = γ·r(ẋ − mean(ẋ) − x̂·mean(x̂⊙ẋ)) + x̂·γ̇ + β̇.
    x: [..., D] float16/bfloat16/float32 (float64 on the PyTorch backend); weight, bias: [D] or None, x's dtype.
    Differentiable w.r.t. x, weight, bias; under forward AD the tangent comes from the same kernel pass.

    Example:
        >>> y = flowkern.ops.layer_norm(x, ln.weight, ln.bias, 1e-6)
    """
    xp, wp, bp = (primal(t) for t in (x, weight, bias))
    op = _norm_op("flowkern.ops.layer_norm", xp, wp, bp, eps, is_rms=False, one_plus=False, w_name="weight",
                  b_name="bias", per_sample=False)
    return apply_dual(op, x, weight, bias)


def layer_norm_jvp(x, x_t, weight=None, bias=None, eps=1e-5, *, weight_t=None, bias_t=None):
    """(y, ẏ) of `layer_norm` from one fused pass; tangents weight_t, bias_t default to zero. ẏ is differentiable (reverse over forward)."""
    op = _norm_op("flowkern.ops.layer_norm_jvp", x, weight, bias, eps, is_rms=False, one_plus=False,
                  w_name="weight", b_name="bias", per_sample=False)
    _check_tangents(("x_t", x_t, "x", x), ("weight_t", weight_t, "weight", weight), ("bias_t", bias_t, "bias", bias))
    return apply_explicit(op, (x, weight, bias), (x_t, weight_t, bias_t))


def rms_norm(x, weight=None, eps=1e-6):
    """RMSNorm over the last dim, `F.rms_norm(x, (D,), weight, eps)`, with a fused forward-mode rule.

    y = γ·x·r, r = 1/√(mean(x²) + ε); ẏ = γ·r(ẋ − x̂·mean(x̂⊙ẋ)) + x̂·γ̇. Shapes and dtypes as `layer_norm`.
    """
    xp, wp = primal(x), primal(weight)
    op = _norm_op("flowkern.ops.rms_norm", xp, wp, None, eps, is_rms=True, one_plus=False, w_name="weight",
                  b_name="bias", per_sample=False)
    return apply_dual(op, x, weight, None)


def rms_norm_jvp(x, x_t, weight=None, eps=1e-6, *, weight_t=None):
    """(y, ẏ) of `rms_norm` from one fused pass; weight_t defaults to zero. ẏ is differentiable (reverse over forward)."""
    op = _norm_op("flowkern.ops.rms_norm_jvp", x, weight, None, eps, is_rms=True, one_plus=False, w_name="weight",
                  b_name="bias", per_sample=False)
    _check_tangents(("x_t", x_t, "x", x), ("weight_t", weight_t, "weight", weight))
    return apply_explicit(op, (x, weight, None), (x_t, weight_t, None))


def _modulate_op(op, x, shift, scale, norm, eps):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    for name, p in (("shift", shift), ("scale", scale)):
        if p is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    return _norm_op(op, x, scale, shift, eps, is_rms=norm == "rms", one_plus=True, w_name="scale",
                    b_name="shift", per_sample=True)


def modulate(x, shift, scale, *, norm="layer", eps=1e-6):
    """adaLN modulation fused with a parameter-free norm: z = norm(x)·(1 + scale) + shift.

    ż = x̂̇·(1 + scale) + x̂·ṡcale + ṡhift with x̂̇ = P(ẋ) (docs/layers.md).
    x: [B, ..., D]; shift, scale: [B, D] (per sample, broadcast over the tokens) or the shape of x. norm: 'layer'
    (DiT: LayerNorm without affine) or 'rms'. Differentiable w.r.t. x, shift, scale.

    Example:
        >>> h = flowkern.ops.modulate(x, shift_msa, scale_msa)          # x [B, N, D], shift/scale [B, D]
    """
    xp, sp, cp = (primal(t) for t in (x, shift, scale))
    op = _modulate_op("flowkern.ops.modulate", xp, sp, cp, norm, eps)
    return apply_dual(op, x, scale, shift)


def modulate_jvp(x, shift, scale, x_t, shift_t=None, scale_t=None, *, norm="layer", eps=1e-6):
    """(z, ż) of `modulate` from one fused pass; shift_t, scale_t default to zero. ż is differentiable (reverse over forward)."""
    op = _modulate_op("flowkern.ops.modulate_jvp", x, shift, scale, norm, eps)
    _check_tangents(("x_t", x_t, "x", x), ("shift_t", shift_t, "shift", shift), ("scale_t", scale_t, "scale", scale))
    return apply_explicit(op, (x, scale, shift), (x_t, scale_t, shift_t))


def _check_tangents(*entries) -> None:
    name, x_t, _, x = entries[0]
    if x_t is None:
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    for name, t, ref_name, ref in entries:
        check_tangent(name, t, ref_name, ref)


def modulate_prevalidated(x, shift, scale, *, is_rms: bool, eps: float):
    """`modulate` for a caller that guarantees what `modulate` validates (`flowkern.nn.Modulate`: shift and scale
    of one shape, [B, D] or x's, x's dtype and device; eps a number >= 0): dispatch only."""
    d = x.shape[-1]
    rows = x.numel() // d
    group = 1 if shift.shape == x.shape else rows // x.shape[0]
    op = NormOp("flowkern.ops.modulate", select_row_backend("flowkern.ops.modulate", x, d), is_rms, True, eps, group)
    return apply_dual(op, x, scale, shift)
