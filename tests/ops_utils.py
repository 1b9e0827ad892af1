"""Shared checks of the fused ops (tests/test_ops_*.py) against plain-PyTorch float64 layers written in the tests."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

import flowkern

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# error bound relative to max(1, max |expected|): a few roundings of the output dtype, float32 maths
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what: str, *, scale_tol: float = 1.0) -> None:
    assert actual is not None, f"{what}: got None"
    expected = expected.double()
    tol = TOL[dtype] * scale_tol
    atol = tol * max(1.0, expected.abs().max().item()) if expected.numel() else tol
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def check_against_plain(backend, fused, plain, primals, tangents, dtype, *, scale_tol: float = 1.0,
                        out_dtype=None) -> None:
    """fused(*primals) vs plain(*primals in float64): outputs, tangents (torch.func.jvp and forward_ad of the fused
    op against torch.func.jvp of the plain one) and gradients (autograd), on `backend`."""
    p64 = [p.double() for p in primals]
    t64 = [t.double() for t in tangents]
    y_ref, yt_ref = torch.func.jvp(plain, tuple(p64), tuple(t64))
    out_dtype = out_dtype or dtype
    with flowkern.use_backend(backend):
        y = fused(*primals)
        assert y.dtype == out_dtype, f"output dtype {y.dtype}, expected {out_dtype}"
        assert y.shape == y_ref.shape
        assert_close(y, y_ref, dtype, "output", scale_tol=scale_tol)

        y1, yt1 = torch.func.jvp(fused, tuple(primals), tuple(tangents))
        assert_close(y1, y_ref, dtype, "torch.func.jvp output", scale_tol=scale_tol)
        assert yt1.dtype == out_dtype
        assert_close(yt1, yt_ref, dtype, "torch.func.jvp tangent", scale_tol=scale_tol)

        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            yt2 = fwAD.unpack_dual(fused(*duals)).tangent
        assert_close(yt2, yt_ref, dtype, "forward_ad tangent", scale_tol=scale_tol)

        leaves = [p.detach().clone().requires_grad_() for p in primals]
        gen = torch.Generator().manual_seed(7)
        g = randn(*y_ref.shape, dtype=out_dtype, gen=gen)
        grads = torch.autograd.grad(fused(*leaves), leaves, g)
    leaves64 = [p.detach().clone().requires_grad_() for p in p64]
    grads_ref = torch.autograd.grad(plain(*leaves64), leaves64, g.double())
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == primals[i].dtype
        coarser = primals[i].dtype if TOL[primals[i].dtype] > TOL[dtype] else dtype  # gradients come back in it
        assert_close(a, b, coarser, f"gradient of input {i}", scale_tol=scale_tol)


def check_explicit(backend, explicit, plain, primals, tangents, dtype, *, scale_tol: float = 1.0) -> None:
    """explicit(...) -> (y, y_t) vs torch.func.jvp of the plain float64 layer. `explicit(primals, tangents)`."""
    y_ref, yt_ref = torch.func.jvp(plain, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    with flowkern.use_backend(backend):
        y, y_t = explicit(primals, tangents)
    assert_close(y, y_ref, dtype, "explicit output", scale_tol=scale_tol)
    assert_close(y_t, yt_ref, dtype, "explicit tangent", scale_tol=scale_tol)


def gradcheck_torch(fn, primals) -> None:
    """float64 gradcheck, backward and forward mode, on the PyTorch backend."""
    leaves = tuple(p.double().detach().requires_grad_() for p in primals)
    with flowkern.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_backward_ad=True)
