"""JVP-aware linear layer: primal and tangent through ONE weight read.

y = xWᵀ + b and ẏ = ẋWᵀ (+ xẆᵀ + ḃ when the parameters carry tangents, e.g. `torch.func.jvp` with respect to
them). The primal and tangent rows are stacked, [x; ẋ] [2M, K], and go through one GEMM (cuBLAS through
torch.matmul: W is read once for both), with the bias added to the primal rows only. Both backends run this same
code (flowkern/ops/linear/reference.py): a GEMM gains nothing from a hand-written Triton kernel here.
"""
from __future__ import annotations

from flowkern._dispatch import select_backend
from flowkern._validate import check_like, check_tensor
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern.ops._rows import check_tangent
from flowkern.ops.linear.op import LinearOp


def _op(name, x, weight, bias) -> LinearOp:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_like("weight", weight, "x", x, shape=False)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape [..., {weight.shape[1]}] (weight is [out, in] = {tuple(weight.shape)}), "
                         f"got {tuple(x.shape)}")
    if bias is not None:
        check_like("bias", bias, "x", x, shape=False)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    return LinearOp(name, select_backend(name, x.device, x.dtype))


def linear(x, weight, bias=None):
    """`F.linear(x, weight, bias)` whose forward-mode tangent shares the primal's GEMM.

    Under forward AD: y, ẏ = split([x; ẋ]·Wᵀ) + [b; 0] — one GEMM over the stacked rows, W read once — plus
    xẆᵀ + ḃ when weight/bias carry tangents. x: [..., K]; weight: [N, K]; bias: [N] or None; one dtype.
    Differentiable w.r.t. all three.

    Example:
        >>> h = flowkern.ops.linear(x, fc.weight, fc.bias)
    """
    op = _op("flowkern.ops.linear", primal(x), primal(weight), primal(bias))
    return apply_dual(op, x, weight, bias)


def linear_jvp(x, x_t, weight, bias=None, *, weight_t=None, bias_t=None):
    """(y, ẏ) of `linear` through one GEMM over [x; x_t]; weight_t, bias_t default to zero. ẏ is differentiable (reverse over forward)."""
    op = _op("flowkern.ops.linear_jvp", x, weight, bias)
    if x_t is None:
        raise TypeError("x_t must be a torch.Tensor, got None")
    for name, t, ref_name, ref in (("x_t", x_t, "x", x), ("weight_t", weight_t, "weight", weight),
                                   ("bias_t", bias_t, "bias", bias)):
        check_tangent(name, t, ref_name, ref)
    return apply_explicit(op, (x, weight, bias), (x_t, weight_t, bias_t))


def linear_prevalidated(x, weight, bias):
    """`linear` for a caller that guarantees what `linear` validates (`flowkern.nn.Linear`: x [..., K] of the
    parameters' dtype and device): dispatch only."""
    return apply_dual(LinearOp("flowkern.ops.linear", select_backend("flowkern.ops.linear", x.device, x.dtype)),
                      x, weight, bias)
