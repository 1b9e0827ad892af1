"""layer_norm, rms_norm and adaLN modulate against F.layer_norm / F.rms_norm in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from flowkern import ops
from flowkern.ops.norms import op as norms_op
from flowkern.ops.norms import reference as norms_reference
from helpers import DTYPES, assert_close, check_against_plain, check_explicit, gradcheck_torch, randn
from conftest import TRITON_RUNS, backends_under_test

BACKENDS = backends_under_test()


def plain_layer_norm(eps):
    def f(x, w=None, b=None):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    return f


def plain_rms_norm(eps):
    def f(x, w=None):
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    return f


def plain_modulate(norm, eps):
    def f(x, shift, scale):
        d = x.shape[-1]
        xn = F.layer_norm(x, (d,), eps=eps) if norm == "layer" else F.rms_norm(x, (d,), eps=eps)
        if shift.shape != x.shape:  # per sample [B, D] over x [B, ..., D]
            view = (x.shape[0],) + (1,) * (x.dim() - 2) + (d,)
            shift, scale = shift.reshape(view), scale.reshape(view)
        return xn * (1 + scale) + shift

    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm(backend, dtype, affine):
    gen = torch.Generator().manual_seed(0)
    x = randn(2, 5, 37, dtype=dtype, gen=gen) * 2 + 0.5
    prim = [x] + ([randn(37, dtype=dtype, gen=gen), randn(37, dtype=dtype, gen=gen)] if affine else [])
    tans = [randn(*p.shape, dtype=dtype, gen=gen) for p in prim]
    check_against_plain(backend, lambda *a: ops.layer_norm(*a, eps=1e-5), plain_layer_norm(1e-5), prim, tans, dtype)
    check_explicit(backend, lambda p, t: ops.layer_norm_jvp(p[0], t[0], *p[1:], eps=1e-5,
                                                            **(dict(weight_t=t[1], bias_t=t[2]) if affine else {})),
                   plain_layer_norm(1e-5), prim, tans, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm(backend, dtype, affine):
    gen = torch.Generator().manual_seed(1)
    x = randn(3, 2, 45, dtype=dtype, gen=gen)
    prim = [x] + ([randn(45, dtype=dtype, gen=gen)] if affine else [])
    tans = [randn(*p.shape, dtype=dtype, gen=gen) for p in prim]
    check_against_plain(backend, lambda *a: ops.rms_norm(*a, eps=1e-6), plain_rms_norm(1e-6), prim, tans, dtype)
    check_explicit(backend, lambda p, t: ops.rms_norm_jvp(p[0], t[0], *p[1:], eps=1e-6,
                                                          **(dict(weight_t=t[1]) if affine else {})),
                   plain_rms_norm(1e-6), prim, tans, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_modulate(backend, dtype, norm, per_token):
    gen = torch.Generator().manual_seed(2)
    x = randn(2, 4, 33, dtype=dtype, gen=gen)
    cond_shape = x.shape if per_token else (2, 33)
    prim = [x, randn(*cond_shape, dtype=dtype, gen=gen), randn(*cond_shape, dtype=dtype, gen=gen, scale=0.5)]
    tans = [randn(*p.shape, dtype=dtype, gen=gen) for p in prim]
    plain = plain_modulate(norm, 1e-6)
    check_against_plain(backend, lambda x, sh, sc: ops.modulate(x, sh, sc, norm=norm), plain, prim, tans, dtype)
    check_explicit(backend, lambda p, t: ops.modulate_jvp(*p, *t, norm=norm), plain, prim, tans, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulate_time_tangent_only(backend):
    """DiT's case: only shift/scale (functions of time) move; x_t = 0 is materialised where missing."""
    gen = torch.Generator().manual_seed(3)
    x, sh, sc = randn(2, 9, 24, gen=gen), randn(2, 24, gen=gen), randn(2, 24, gen=gen)
    sh_t, sc_t = randn(2, 24, gen=gen), randn(2, 24, gen=gen)
    ref = torch.func.jvp(lambda a, b: plain_modulate("layer", 1e-6)(x.double(), a, b), (sh.double(), sc.double()),
                         (sh_t.double(), sc_t.double()))
    with flowkern.use_backend(backend):
        out = torch.func.jvp(lambda a, b: ops.modulate(x, a, b), (sh, sc), (sh_t, sc_t))
    assert_close(out[0], ref[0], torch.float32, "output")
    assert_close(out[1], ref[1], torch.float32, "tangent")


@pytest.mark.parametrize("fn,args", [
    (ops.layer_norm, lambda: (torch.randn(3, 4), torch.randn(4), torch.randn(4))),
    (ops.rms_norm, lambda: (torch.randn(3, 4), torch.randn(4))),
    (ops.modulate, lambda: (torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4))),
    (lambda x, sh, sc: ops.modulate(x, sh, sc, norm="rms"), lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                                                      torch.randn(2, 3, 4))),
], ids=["layer_norm", "rms_norm", "modulate", "modulate_rms_per_token"])
def test_gradcheck_float64(fn, args):
    gradcheck_torch(fn, args())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_fused_pass_under_jvp(backend, monkeypatch):
    """Under torch.func.jvp the tangent is served from the forward's kernel pass: one launch, not two."""
    calls = []
    module = norms_op.BACKENDS[backend]
    real = module.norm_fwd
    monkeypatch.setattr(module, "norm_fwd", lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    x, w = torch.randn(4, 19), torch.randn(19)
    with flowkern.use_backend(backend):
        torch.func.jvp(lambda x: ops.layer_norm(x, w), (x,), (torch.randn(4, 19),))
    assert calls == [True]


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
@pytest.mark.interpreter
@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 9), d=st.integers(1, 70), rms=st.booleans())
def test_norm_shapes_hypothesis(rows, d, rms):
    gen = torch.Generator().manual_seed(rows * 100 + d)
    x, x_t, w = randn(rows, d, gen=gen), randn(rows, d, gen=gen), randn(d, gen=gen)
    fn, plain = (ops.rms_norm_jvp, plain_rms_norm(1e-6)) if rms else (ops.layer_norm_jvp, plain_layer_norm(1e-5))
    eps = 1e-6 if rms else 1e-5
    y_ref, yt_ref = torch.func.jvp(lambda x: plain(x, w.double()), (x.double(),), (x_t.double(),))
    with flowkern.use_backend("triton"):
        y, y_t = fn(x, x_t, w, eps=eps)
    assert_close(y, y_ref, torch.float32, "output", scale_tol=3)
    assert_close(y_t, yt_ref, torch.float32, "tangent", scale_tol=3)


def test_reference_matches_backend_module():
    x = torch.randn(4, 10, dtype=torch.float64)
    y, _, mean, rstd = norms_reference.norm_fwd(x, None, None, None, None, None, is_rms=False, one_plus=False,
                                                group=4, eps=1e-5)
    torch.testing.assert_close(flowkern.ops.reference.layer_norm(x), y)
    torch.testing.assert_close(mean, x.mean(-1))


def test_tangent_output_is_differentiable():
    x = torch.randn(3, 8, requires_grad=True)
    x_t = torch.randn(3, 8)
    y, y_t = ops.layer_norm_jvp(x, x_t)
    g = torch.randn(3, 8)
    (y_t * g).sum().backward(retain_graph=True)

    def plain(a):  # written out: F.layer_norm's own second derivative of its tangent is wrong (torch 2.13)
        ac = a - a.mean(-1, keepdim=True)
        return ac / torch.sqrt((ac * ac).mean(-1, keepdim=True) + 1e-5)

    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad((torch.func.jvp(plain, (x64,), (x_t.double(),))[1] * g.double()).sum(), x64)
    torch.testing.assert_close(x.grad, ref.float(), rtol=1e-4, atol=1e-5)
    x.grad = None
    y.sum().backward()  # the primal differentiates
    assert x.grad is not None


def test_outputs_allow_inplace():
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = ops.layer_norm(x)
    y.mul_(2)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.layer_norm([1.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.layer_norm(torch.ones(3, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    (lambda: ops.layer_norm(torch.randn(3, 4), torch.randn(5)), ValueError, "weight must have shape"),
    (lambda: ops.layer_norm(torch.randn(3, 4), torch.randn(4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (lambda: ops.layer_norm(torch.randn(3, 4), eps=float("nan")), ValueError, "eps must be finite"),
    (lambda: ops.layer_norm(torch.randn(3, 4), eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda: ops.layer_norm(torch.randn(3, 4), eps="1e-5"), TypeError, "eps must be a real number"),
    (lambda: ops.layer_norm(torch.randn(3, 0)), ValueError, "no empty"),
    (lambda: ops.layer_norm(torch.randn(3, 4), torch.randn(4), torch.randn(3, 4)), ValueError,
     "weight and bias must have the same shape|bias must have shape"),
    (lambda: ops.rms_norm(torch.randn(3, 4), torch.randn(4, 1)), ValueError, "weight must have shape"),
    (lambda: ops.modulate(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(3, 4)), ValueError,
     "must have shape"),
    (lambda: ops.modulate(torch.randn(2, 3, 4), torch.randn(2, 4), None), TypeError, "scale must be a torch.Tensor"),
    (lambda: ops.modulate(torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), norm="batch"), ValueError,
     "norm must be one of"),
    (lambda: ops.layer_norm_jvp(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "x_t must have the shape of x"),
    (lambda: ops.layer_norm_jvp(torch.randn(3, 4), None), TypeError, "x_t must be a torch.Tensor"),
    (lambda: ops.layer_norm_jvp(torch.randn(3, 4), torch.randn(3, 4), weight_t=torch.randn(4)), ValueError,
     "weight_t is given but weight is None"),
    (lambda: ops.modulate_jvp(torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4),
                              torch.randn(2, 4).half()), TypeError, "shift_t has dtype"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_triton_backend_refuses_float64():
    if not TRITON_RUNS:
        pytest.skip("needs Triton (GPU or interpreter)")
    with flowkern.use_backend("triton"), pytest.raises(ValueError, match="backend 'triton' cannot serve"):
        ops.layer_norm(torch.randn(2, 3, dtype=torch.float64))


def test_wide_rows_leave_triton():
    """Rows wider than one Triton block: auto picks the reference, a Triton request names the reason."""
    x = torch.randn(1, 32769)
    ops.layer_norm(x)  # auto: never fails for lack of a backend
    if TRITON_RUNS:
        with flowkern.use_backend("triton"), pytest.raises(ValueError, match="up to 32768 features"):
            ops.layer_norm(x)


@pytest.mark.parametrize("one_plus,group", [(False, 6), (True, 3), (True, 1)], ids=["shared", "per_sample", "per_row"])
def test_reference_primal_path_matches_its_tangent_path(one_plus, group):
    """Without a tangent the reference runs torch.native_layer_norm; with one, its own composite: same y, mean,
    rstd (float64), and y against F.layer_norm·w + b."""
    gen = torch.Generator().manual_seed(group)
    x = torch.randn(6, 10, dtype=torch.float64, generator=gen)
    w, b = (torch.randn(6 // group, 10, dtype=torch.float64, generator=gen) for _ in range(2))
    kw = dict(is_rms=False, one_plus=one_plus, group=group, eps=1e-5)
    y, y_t, mean, rstd = norms_reference.norm_fwd(x, w, b, None, None, None, **kw)
    y2, _, mean2, rstd2 = norms_reference.norm_fwd(x, w, b, torch.zeros_like(x), None, None, **kw)
    assert y_t is None
    for a, e in ((y, y2), (mean, mean2), (rstd, rstd2)):
        torch.testing.assert_close(a, e, atol=1e-13, rtol=1e-13)
    w_rows, b_rows = w.repeat_interleave(group, 0), b.repeat_interleave(group, 0)
    expected = F.layer_norm(x, (10,), eps=1e-5) * ((1 + w_rows) if one_plus else w_rows) + b_rows
    torch.testing.assert_close(y, expected, atol=1e-13, rtol=1e-13)
