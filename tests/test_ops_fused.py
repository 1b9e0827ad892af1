"""The shared fused-op machinery (flowkern/ops/_fused.py): chains of ops under torch.func.jvp, the non-served jvp
path, parameter tangents and non-contiguous inputs."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowkern
from flowkern import ops
from helpers import assert_close, randn
from conftest import TRITON_RUNS, backends_under_test

BACKENDS = backends_under_test()


def block(lin, ln, gelu, modulate, gres, temb):
    """A tiny adaLN block from the given layer functions."""

    def f(x, t, s, w1, b1, w2, g):
        e = temb(t, s).to(x.dtype)  # [B, 8]
        cond = lin(e, w2, None)  # [B, 3·D]
        shift, scale, gate = cond.chunk(3, dim=-1)
        h = gelu(lin(modulate(x, shift, scale), w1, b1))
        return gres(x, gate, ln(h, g))

    return f


def plain_temb(t, s):
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(2, dtype=torch.float64)
                      / 2)
    return torch.cat([g(tau.double()[:, None] * freqs) for tau in (t, s) for g in (torch.cos, torch.sin)], -1)


FUSED = block(ops.linear, lambda h, g: ops.layer_norm(h, g), lambda h: ops.gelu(h, approximate="tanh"),
              ops.modulate, ops.gated_residual, lambda t, s: ops.time_embedding(t, s, 4))
PLAIN = block(F.linear, lambda h, g: F.layer_norm(h, (h.shape[-1],), g, eps=1e-5),
              lambda h: F.gelu(h, approximate="tanh"),
              lambda x, sh, sc: F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + sc[:, None]) + sh[:, None],
              lambda x, g, y: x + g[:, None] * y, plain_temb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_under_func_jvp_with_parameter_tangents(backend):
    gen = torch.Generator().manual_seed(0)
    d = 12
    prim = [randn(2, 5, d, gen=gen), torch.rand(2, generator=gen), torch.rand(2, generator=gen),
            randn(d, d, gen=gen, scale=0.3), randn(d, gen=gen), randn(3 * d, 8, gen=gen, scale=0.3),
            randn(d, gen=gen)]
    tans = [randn(*p.shape, gen=gen) for p in prim]
    y_ref, yt_ref = torch.func.jvp(PLAIN, tuple(p.double() for p in prim), tuple(t.double() for t in tans))
    with flowkern.use_backend(backend):
        y, y_t = torch.func.jvp(FUSED, tuple(prim), tuple(tans))
        leaves = [p.clone().requires_grad_() for p in prim]
        grads = torch.autograd.grad(FUSED(*leaves).square().sum(), leaves)
    assert_close(y, y_ref, torch.float32, "output", scale_tol=3)
    assert_close(y_t, yt_ref, torch.float32, "tangent", scale_tol=3)
    leaves64 = [p.double().requires_grad_() for p in prim]
    for a, b in zip(grads, torch.autograd.grad(PLAIN(*leaves64).square().sum(), leaves64)):
        assert_close(a, b, torch.float32, "gradient", scale_tol=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unserved_jvp_path(backend):
    """Tangents that reach the Function only through forward AD (not passed explicitly): jvp() runs one fused
    pass for them."""
    from flowkern._fused import FusedFunction
    from flowkern.ops.norms.op import NormOp

    x, v = torch.randn(3, 10), torch.randn(3, 10)
    ref = torch.func.jvp(lambda x: F.layer_norm(x.double(), (10,)), (x,), (v,))[1]
    op = NormOp("test", backend, False, False, 1e-5, 3)
    with flowkern.use_backend(backend), fwAD.dual_level():
        y = FusedFunction.apply(op, False, fwAD.make_dual(x, v), None, None, None, None, None)[0]
        tangent = fwAD.unpack_dual(y).tangent
    assert_close(tangent, ref, torch.float32, "forward-AD tangent")


def test_explicit_form_on_dual_inputs_raises():
    x, x_t, v = torch.randn(3, 10), torch.randn(3, 10), torch.randn(3, 10)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="call the drop-in op there"):
        ops.layer_norm_jvp(fwAD.make_dual(x, v), x_t)


def test_second_order_forward_mode_is_refused():
    x, x_t = torch.randn(3, 10), torch.randn(3, 10)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="second-order"):
        ops.layer_norm_jvp(x, fwAD.make_dual(x_t, torch.randn(3, 10)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    gen = torch.Generator().manual_seed(1)
    x = randn(24, 4, 3, gen=gen).permute(1, 2, 0)  # [4, 3, 24], last dim strided
    x_t = randn(4, 3, 24, gen=gen)[:, :, :]
    sh, sc = randn(8, 24, gen=gen)[::2], randn(8, 24, gen=gen)[::2]
    ref = torch.func.jvp(lambda x: F.layer_norm(x, (24,), eps=1e-6) * (1 + sc.double()[:, None])
                         + sh.double()[:, None], (x.double(),), (x_t.double(),))
    with flowkern.use_backend(backend):
        out = torch.func.jvp(lambda x: ops.modulate(x, sh, sc), (x,), (x_t,))
    assert_close(out[0], ref[0], torch.float32, "output")
    assert_close(out[1], ref[1], torch.float32, "tangent")


def test_no_tangent_no_tangent_work():
    """Without forward AD the kernels run without their tangent half."""
    from flowkern.ops.activations import reference as torch_launch

    calls = []
    real = torch_launch.activation

    def spy(x, v, **kw):
        calls.append(v is None)
        return real(x, v, **kw)

    torch_launch.activation = spy
    try:
        with flowkern.use_backend("torch"):
            ops.silu(torch.randn(4))
    finally:
        torch_launch.activation = real
    assert calls == [True]


def test_torch_backend_without_tangent_is_plain_autograd():
    """No tangent to serve on the PyTorch backend: no custom Function node (its per-call overhead was ~10x a small
    layer's maths on CPU); outputs, gradients and vmap match stock PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    w2, g = torch.randn(48, 8, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    t, s = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    params = [p.requires_grad_() for p in (w1, b1, w2, g)]
    with flowkern.use_backend("torch"):
        y = FUSED(x, t, s, *params)
        assert "FusedFunction" not in type(y.grad_fn).__name__
        grads = torch.autograd.grad(y.square().sum(), (x, *params))
        batched = torch.vmap(lambda xi: FUSED(xi[None], t[:1], s[:1], *params))(x.detach())
    y_ref = PLAIN(x, t, s, *params)
    assert_close(y, y_ref, torch.float64, "output")
    for a, b in zip(grads, torch.autograd.grad(y_ref.square().sum(), (x, *params))):
        assert_close(a, b, torch.float64, "gradient")
    assert_close(batched[:, 0], PLAIN(x.detach(), t[:1].expand(6), s[:1].expand(6), *params), torch.float64,
                 "vmap")


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
@pytest.mark.interpreter
@pytest.mark.parametrize("programs", [1, 3, 5])
def test_backward_partial_sums_over_chunks(programs, monkeypatch):
    """Few backward programs: each walks several rows of its group (the last chunk partial) and the host adds the
    partial parameter gradients."""
    from flowkern.ops import _launch

    monkeypatch.setattr(_launch, "BWD_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(programs)
    x, y = randn(2, 7, 13, gen=gen), randn(2, 7, 13, gen=gen)
    w, b, sh, sc, gate = (randn(*s, gen=gen) for s in ((13,), (13,), (2, 13), (2, 13), (2, 13)))
    g = randn(2, 7, 13, gen=gen)

    def fused(x, y, w, b, sh, sc, gate):
        return ops.gated_residual(ops.layer_norm(x, w, b), gate, ops.modulate(y, sh, sc))

    def plain(x, y, w, b, sh, sc, gate):
        m = F.layer_norm(y, (13,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None]
        return F.layer_norm(x, (13,), w, b) + gate[:, None] * m

    leaves = [p.clone().requires_grad_() for p in (x, y, w, b, sh, sc, gate)]
    with flowkern.use_backend("triton"):
        grads = torch.autograd.grad(fused(*leaves), leaves, g)
    leaves64 = [p.double().requires_grad_() for p in (x, y, w, b, sh, sc, gate)]
    for i, (a, ref) in enumerate(zip(grads, torch.autograd.grad(plain(*leaves64), leaves64, g.double()))):
        assert_close(a, ref, torch.float32, f"gradient {i}")


def test_served_tangent_is_stop_gradient_and_a_gradient_through_it_raises():
    x = torch.randn(5, requires_grad=True)
    y, y_t = torch.func.jvp(ops.silu, (x,), (torch.randn(5),))
    assert y.requires_grad
    y.sum().backward()  # through the primal it works
    with pytest.raises(RuntimeError, match="stop-gradient"):
        y_t.sum().backward()
    w = torch.randn(5)
    with pytest.raises(RuntimeError, match="stop-gradient"):  # never a silently zero gradient through the tangent
        torch.func.grad(lambda w: torch.func.jvp(lambda v: ops.silu(v * w), (x.detach(),), (w,))[1].sum())(w)
    with torch.no_grad():
        _, y_t = torch.func.jvp(ops.gelu, (x,), (torch.randn(5),))
    assert not y_t.requires_grad


@pytest.mark.filterwarnings("error")
def test_no_warning_without_grad():
    x = torch.randn(5)
    torch.func.jvp(ops.gelu, (x,), (torch.randn(5),))
