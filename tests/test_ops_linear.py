"""JVP-aware linear against F.linear in float64; one GEMM for primal and tangent."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowkern
from flowkern import ops
from helpers import DTYPES, assert_close, check_against_plain, check_explicit, gradcheck_torch, randn
from conftest import backends_under_test

BACKENDS = backends_under_test()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(backend, dtype, bias):
    gen = torch.Generator().manual_seed(0)
    prim = [randn(3, 5, 37, dtype=dtype, gen=gen), randn(23, 37, dtype=dtype, gen=gen, scale=0.2)]
    if bias:
        prim.append(randn(23, dtype=dtype, gen=gen))
    tans = [randn(*p.shape, dtype=dtype, gen=gen) for p in prim]
    # K = 37 products in low precision: allow a few more roundings
    scale_tol = 1.0 if dtype == torch.float32 else 2.0
    check_against_plain(backend, ops.linear, F.linear, prim, tans, dtype, scale_tol=scale_tol)
    kwargs = lambda t: dict(weight_t=t[1], bias_t=t[2] if bias else None)  # noqa: E731
    check_explicit(backend, lambda p, t: ops.linear_jvp(p[0], t[0], *p[1:], **kwargs(t)), F.linear, prim, tans,
                   dtype, scale_tol=scale_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_tangent_of_x_only_and_of_weight_only(backend):
    gen = torch.Generator().manual_seed(1)
    x, w, b = randn(4, 9, gen=gen), randn(6, 9, gen=gen), randn(6, gen=gen)
    x_t, w_t = randn(4, 9, gen=gen), randn(6, 9, gen=gen)
    with flowkern.use_backend(backend):
        y_t = torch.func.jvp(lambda x: ops.linear(x, w, b), (x,), (x_t,))[1]
        y_tw = torch.func.jvp(lambda w: ops.linear(x, w, b), (w,), (w_t,))[1]
    assert_close(y_t, x_t.double() @ w.double().t(), torch.float32, "x tangent (no bias on the tangent rows)")
    assert_close(y_tw, x.double() @ w_t.double().t(), torch.float32, "weight tangent")


def test_one_gemm_for_primal_and_tangent():
    """The tangent rows go through the primal's GEMM: one matmul in the profile."""
    x, w, b, x_t = torch.randn(8, 16), torch.randn(12, 16), torch.randn(12), torch.randn(8, 16)
    with fwAD.dual_level():
        with torch.profiler.profile() as prof:
            out = ops.linear(fwAD.make_dual(x, x_t), w, b)
        y, y_t = fwAD.unpack_dual(out)
    gemms = [e.key for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    calls = sum(e.count for e in prof.key_averages() if e.key in gemms)
    assert calls == 1, prof.key_averages().table()
    torch.testing.assert_close(y_t, x_t @ w.t())
    torch.testing.assert_close(y, torch.addmm(b, x, w.t()))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    args = (torch.randn(2, 3, 5), torch.randn(4, 5)) + ((torch.randn(4),) if bias else ())
    gradcheck_torch(ops.linear, args)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 6)), ValueError, r"x must have shape \[\.\.\., 6\]"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(4)), ValueError, "weight must have 2 dimensions"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError, "bias must have shape"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4).half()), TypeError, "weight has dtype"),
    (lambda: ops.linear_jvp(torch.randn(3, 4), torch.randn(3, 5), torch.randn(5, 4)), ValueError,
     "x_t must have the shape of x"),
    (lambda: ops.linear_jvp(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), bias_t=torch.randn(5)),
     ValueError, "bias_t is given but bias is None"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
