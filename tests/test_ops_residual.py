"""gated_residual x + gate·y against plain broadcasting in float64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkern
from flowkern import ops
from helpers import DTYPES, check_against_plain, check_explicit, gradcheck_torch, randn
from conftest import TRITON_RUNS, backends_under_test

BACKENDS = backends_under_test()
GATES = {"per_sample": (3, 29), "shared": (29,), "per_token": (3, 4, 29)}


def plain_gated_residual(x, gate, y):
    if gate.dim() == 2 and x.dim() == 3:
        gate = gate[:, None, :]
    return x + gate * y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate_kind", list(GATES))
def test_gated_residual(backend, dtype, gate_kind):
    gen = torch.Generator().manual_seed(0)
    prim = [randn(3, 4, 29, dtype=dtype, gen=gen), randn(*GATES[gate_kind], dtype=dtype, gen=gen),
            randn(3, 4, 29, dtype=dtype, gen=gen)]
    tans = [randn(*p.shape, dtype=dtype, gen=gen) for p in prim]
    check_against_plain(backend, ops.gated_residual, plain_gated_residual, prim, tans, dtype)
    check_explicit(backend, lambda p, t: ops.gated_residual_jvp(*p, *t), plain_gated_residual, prim, tans, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_explicit_missing_tangents(backend):
    """gate_t, y_t default to zero: ȯut = ẋ."""
    import flowkern

    x, g, y, x_t = torch.randn(2, 3, 7), torch.randn(2, 7), torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    with flowkern.use_backend(backend):
        out, out_t = ops.gated_residual_jvp(x, g, y, x_t)
    torch.testing.assert_close(out, x + g[:, None] * y)
    torch.testing.assert_close(out_t, x_t)


def test_gradcheck_float64():
    gradcheck_torch(ops.gated_residual, (torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 3, 5)))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.gated_residual(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(2, 3, 4)), ValueError,
     "gate must have shape"),
    (lambda: ops.gated_residual(torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 3, 5)), ValueError,
     "y must have the shape of x"),
    (lambda: ops.gated_residual(torch.randn(2, 3, 4), torch.randn(2, 4).double(), torch.randn(2, 3, 4)), TypeError,
     "gate has dtype"),
    (lambda: ops.gated_residual(torch.randn(2, 3, 4), 1.0, torch.randn(2, 3, 4)), TypeError,
     "gate must be a torch.Tensor"),
    (lambda: ops.gated_residual_jvp(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), None), TypeError,
     "x_t must be a torch.Tensor"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
@pytest.mark.interpreter
@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 6), d=st.integers(1, 40), per_sample=st.booleans())
def test_gated_residual_and_modulate_shapes_hypothesis(batch, tokens, d, per_sample):
    import flowkern
    import torch.nn.functional as F
    from helpers import assert_close

    gen = torch.Generator().manual_seed(batch * 1000 + tokens * 50 + d)
    x, y, x_t, y_t = (randn(batch, tokens, d, gen=gen) for _ in range(4))
    cshape = (batch, d) if per_sample else (batch, tokens, d)
    g, g_t, sh, sc = (randn(*cshape, gen=gen) for _ in range(4))
    view = (lambda c: c[:, None]) if per_sample else (lambda c: c)  # noqa: E731
    ref = torch.func.jvp(lambda x, g, y: x + view(g) * y, (x.double(), g.double(), y.double()),
                         (x_t.double(), g_t.double(), y_t.double()))
    ref_m = torch.func.jvp(lambda x: F.layer_norm(x, (d,), eps=1e-6) * (1 + view(sc.double())) + view(sh.double()),
                           (x.double(),), (x_t.double(),))
    with flowkern.use_backend("triton"):
        out = ops.gated_residual_jvp(x, g, y, x_t, g_t, y_t)
        out_m = ops.modulate_jvp(x, sh, sc, x_t)
    for a, b, what in ((out[0], ref[0], "residual"), (out[1], ref[1], "residual tangent"),
                       (out_m[0], ref_m[0], "modulate")):
        assert_close(a, b, torch.float32, what, scale_tol=3)
    # A layer norm over very few features is ill-conditioned (1/σ amplifies float32 rounding): bound the tangent's
    # error by a multiple of PyTorch's own float32 error on the same inputs, as the attention tests do.
    own = torch.func.jvp(lambda x: F.layer_norm(x, (d,), eps=1e-6) * (1 + view(sc)) + view(sh), (x,), (x_t,))[1]
    own_err = (own.double() - ref_m[1]).abs().max().item()
    err = (out_m[1].double() - ref_m[1]).abs().max().item()
    assert err <= max(4 * own_err, 9e-5 * max(1.0, ref_m[1].abs().max().item())), f"modulate tangent: {err:.3g}"


@pytest.mark.parametrize("gate_shape", [(3, 8), (8,), (3, 4, 8)], ids=["per_sample", "shared", "per_token"])
def test_native_gated_residual_matches_the_reference_backend(gate_shape):
    """The native form the modules use without a tangent: x + gate·y against the reference backend's rows maths."""
    from flowkern.ops.residual import reference

    gen = torch.Generator().manual_seed(len(gate_shape))
    x, y = (torch.randn(3, 4, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    gate = torch.randn(gate_shape, dtype=torch.float64, generator=gen)
    expected = x + (gate[:, None] if gate_shape == (3, 8) else gate) * y
    torch.testing.assert_close(reference.native_gated_residual(x, gate, y), expected, atol=1e-14, rtol=1e-14)
    with flowkern.use_backend("torch"):
        torch.testing.assert_close(flowkern.ops.gated_residual(x, gate, y), expected, atol=1e-14, rtol=1e-14)
