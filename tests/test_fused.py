"""The op contract (flowkern/_fused.py): several outputs, saved outputs, the vmap hook, the differentiable tangent of
every op family (reverse over forward), the signature-free `apply`, the environment read once (flowkern/_config.py); and the layer ops
through it: chains of ops under torch.func.jvp, the non-served jvp path, parameter tangents, non-contiguous
inputs."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowkern
import flowkern.flow_map as fm
from flowkern import _config, ops
from flowkern._fused import FusedOp, apply_dual, apply_explicit, fold_vmapped
from conftest import DEVICE, TRITON_RUNS, backends_under_test
from helpers import assert_close, randn


@dataclass(frozen=True)
class SquareAndCube(FusedOp):
    """y = (x², x³) with y_t = (2x·ẋ, 3x²·ẋ); backward reads the saved outputs (x² and x³)."""

    name: str = "test.square_and_cube"
    backend: str = "triton"  # never the native-autograd shortcut
    n_outputs = 2
    saves_outputs = True

    def forward(self, inputs, tangents):
        (x,) = inputs
        y = (x * x, x * x * x)
        y_t = None if tangents is None else (2 * x * tangents[0], 3 * x * x * tangents[0])
        return y, y_t, ()

    def backward(self, inputs, aux, dy, needs):
        (x,) = inputs
        square, cube = aux  # the saved primal outputs
        g2, g3 = dy
        grad = torch.zeros_like(x)
        if g2 is not None:
            grad = grad + 2 * (square / x) * g2
        if g3 is not None:
            grad = grad + 3 * (cube / x) * g3
        return (grad,)

    def fold_batch(self, size, in_dims, args):
        return self, [fold_vmapped(a, d, size) for a, d in zip(args, in_dims)], args[0].shape[in_dims[0] + 1]


X = torch.tensor([[0.5, -1.5, 2.0], [1.25, 3.0, -0.75]], dtype=torch.float64)


def test_several_outputs_gradients_and_saved_outputs():
    x = X.clone().requires_grad_()
    square, cube = apply_dual(SquareAndCube(), x)
    assert torch.equal(square, X ** 2) and torch.equal(cube, X ** 3)
    (square.sum() + 2 * cube.sum()).backward()
    torch.testing.assert_close(x.grad, 2 * X + 6 * X ** 2)
    x.grad = None
    apply_dual(SquareAndCube(), x)[1].sum().backward()  # a gradient for one output only
    torch.testing.assert_close(x.grad, 3 * X ** 2)


def test_several_outputs_served_and_explicit_tangents():
    v = torch.full_like(X, 0.5)
    (square, cube), (square_t, cube_t) = torch.func.jvp(lambda x: apply_dual(SquareAndCube(), x), (X,), (v,))
    torch.testing.assert_close(square_t, X)
    torch.testing.assert_close(cube_t, 1.5 * X ** 2)
    (square, cube), (square_t, cube_t) = apply_explicit(SquareAndCube(), (X,), (v,))
    torch.testing.assert_close(cube, X ** 3)
    torch.testing.assert_close(cube_t, 1.5 * X ** 2)


def test_vmap_hook_folds_the_vmapped_dim():
    xs = torch.stack([X, -2 * X])  # [V=2, B=2, 3]
    square, cube = torch.func.vmap(lambda x: apply_dual(SquareAndCube(), x))(xs)
    torch.testing.assert_close(cube, xs ** 3)
    _, (_, cube_t) = torch.func.vmap(lambda x: torch.func.jvp(lambda y: apply_dual(SquareAndCube(), y), (x,),
                                                                (torch.ones_like(x),)))(xs)
    torch.testing.assert_close(cube_t, 3 * xs ** 2)


def test_an_op_without_a_vmap_rule_refuses_vmap():
    @dataclass(frozen=True)
    class NoRule(SquareAndCube):
        fold_batch = FusedOp.fold_batch

    with pytest.raises(NotImplementedError, match="no vmap rule"):
        torch.func.vmap(lambda x: apply_dual(NoRule(), x))(torch.stack([X, X]))


def _attention(x):
    return flowkern.attention(x, x, x)


def _jump(x):
    return fm.jump(x, torch.sin(x), 0.25, 0.75)  # a tangent that depends on x: ẋ + 0.5·cos(x)·ẋ


def _layer(x):
    return ops.silu(x)


FAMILIES = [pytest.param(_attention, id="attention"), pytest.param(_jump, id="jump"),
            pytest.param(_layer, id="layer_op")]


def _plain_family(fn):
    """The float64 plain twin of a FAMILIES entry."""
    from flowkern.testing import math_attention

    return {_attention: lambda x: math_attention(x, x, x), _jump: lambda x: x + 0.5 * torch.sin(x),
            _layer: lambda x: x * torch.sigmoid(x)}[fn]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("fn", FAMILIES)
def test_backward_through_the_tangent_is_exact_in_every_family(fn, backend):
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("needs Triton (GPU or interpreter)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE)
    w = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE)
    plain = _plain_family(fn)
    x64 = x.detach().double().cpu().requires_grad_()
    _, yt_ref = torch.func.jvp(plain, (x64,), (v.double().cpu(),))
    (grad_x_ref,) = torch.autograd.grad(yt_ref.sum(), x64)
    grad_w_ref = torch.func.grad(lambda w: torch.func.jvp(lambda a: plain(a * w), (x64.detach(),), (w,))[1].sum())(
        w.double().cpu())
    with flowkern.use_backend(backend):
        y, y_t = torch.func.jvp(fn, (x,), (v,))
        y.sum().backward(retain_graph=True)  # through the primal it works
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None
        y_t.sum().backward()  # and through the tangent (reverse over forward)
        assert_close(x.grad.cpu(), grad_x_ref, torch.float32, "gradient of the tangent w.r.t. x", scale_tol=4.0)
        grad_w = torch.func.grad(lambda w: torch.func.jvp(lambda a: fn(a * w), (x.detach(),), (w,))[1].sum())(w)
        assert_close(grad_w.cpu(), grad_w_ref, torch.float32, "torch.func.grad over torch.func.jvp", scale_tol=4.0)


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
def test_probe_reduction_guard_gradient_and_tangent():
    from flowkern.divergence import probes
    from flowkern.testing import hutchinson_probes_reference

    gen = torch.Generator().manual_seed(3)
    jz = torch.randn(2, 3, 20, generator=gen)
    jz_t = torch.randn(2, 3, 20, generator=gen)
    z = hutchinson_probes_reference(11, 0, 2, 3, 20, "rademacher").float()
    leaf = jz.to(DEVICE).requires_grad_()
    with fwAD.dual_level():
        est = probes.reduce("triton", fwAD.make_dual(leaf, jz_t.to(DEVICE)), None, seed=11, stream=0,
                            distribution="rademacher")
        est_p, est_t = fwAD.unpack_dual(est)
        torch.testing.assert_close(est_t.cpu(), (z * jz_t).sum(-1), rtol=1e-5, atol=1e-5)
        est_t.sum().backward()  # the reduction is linear: its tangent does not depend on jz
        assert leaf.grad is None
        jz_t_leaf = jz_t.to(DEVICE).requires_grad_()
        est = probes.reduce("triton", fwAD.make_dual(jz.to(DEVICE), jz_t_leaf), None, seed=11, stream=0,
                            distribution="rademacher")
        fwAD.unpack_dual(est).tangent.sum().backward()
        torch.testing.assert_close(jz_t_leaf.grad.cpu(), z)
    torch.testing.assert_close(est_p.detach().cpu(), (z * jz).sum(-1), rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 3, generator=gen)
    est_p.backward(g.to(DEVICE))
    torch.testing.assert_close(leaf.grad.cpu(), z * g[..., None])


def test_apply_binds_no_signature_outside_torch_func(monkeypatch):
    calls = []
    real = inspect.signature

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.function.inspect, "signature", counting)
    q = torch.randn(1, 1, 4, 8)
    with flowkern.use_backend("torch"):
        out, out_t = flowkern.jvp_attention(q, q, q, q, q, q)
        assert calls == []
        want = torch.func.jvp(_attention, (q,), (q,))  # under torch.func PyTorch's own path (it binds)
    assert calls
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(out_t, want[1])


def test_environment_is_read_once_and_reloaded_on_request(setenv):
    setenv("FLOWKERN_BACKEND", "torch")
    assert _config.requested_backend() == "torch"
    os.environ["FLOWKERN_BACKEND"] = "triton"  # not seen until reload()
    assert _config.requested_backend() == "torch"
    _config.reload()
    assert _config.requested_backend() == "triton"
    with flowkern.use_backend("auto"):
        assert _config.requested_backend() == "auto"
    setenv("FLOWKERN_NVTX", "1")
    assert _config.nvtx_enabled()


# ----------------------------------------------------------------------------------------------------
# the layer ops through the contract

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


def test_served_tangent_is_differentiable_and_constant_under_no_grad():
    x = torch.randn(5, requires_grad=True)
    v = torch.randn(5)
    y, y_t = torch.func.jvp(ops.silu, (x,), (v,))
    assert y.requires_grad and y_t.requires_grad
    y.sum().backward()  # through the primal it works
    x.grad = None
    y_t.sum().backward()
    silu = lambda a: a * torch.sigmoid(a)  # noqa: E731
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.func.jvp(silu, (x64,), (v.double(),))[1].sum(), x64)
    assert_close(x.grad, ref, torch.float32, "gradient of the served tangent")
    w = torch.randn(5)
    grad_w = torch.func.grad(lambda w: torch.func.jvp(lambda a: ops.silu(a * w), (x.detach(),), (w,))[1].sum())(w)
    ref_w = torch.func.grad(lambda w: torch.func.jvp(lambda a: silu(a * w), (x64.detach(),), (w,))[1].sum())(w.double())
    assert_close(grad_w, ref_w, torch.float32, "torch.func.grad over torch.func.jvp")
    with torch.no_grad():
        _, y_t = torch.func.jvp(ops.gelu, (x,), (torch.randn(5),))
    assert not y_t.requires_grad


@pytest.mark.filterwarnings("error")
def test_no_warning_without_grad():
    x = torch.randn(5)
    torch.func.jvp(ops.gelu, (x,), (torch.randn(5),))
