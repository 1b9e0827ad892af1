"""Reverse over forward through the layer ops and the flow-map jump (flowkern/_fused.py): the gradient of a loss of a
fused op's tangent with respect to every primal and every tangent, against float64 `torch.func.grad` over
`torch.func.jvp` of plain composite twins; forward-AD duals with `loss.backward()`; the explicit `*_jvp` forms;
gradcheck of the reference; nothing extra saved under `torch.no_grad()`; higher orders raise.

The twins are written out (mean, variance, erf, ...): torch's own double derivative of `F.layer_norm`'s tangent with
respect to its input is wrong (torch 2.13), so `F.layer_norm` is no oracle for the mixed term.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowkern
import flowkern.flow_map as fm
from flowkern import ops
from conftest import backends_under_test
from helpers import assert_close, randn

BACKENDS = backends_under_test()


def plain_norm(x, w=None, b=None, *, rms=False, eps=1e-5):
    xc = x if rms else x - x.mean(-1, keepdim=True)
    y = xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


def plain_modulate(x, shift, scale, *, rms=False):
    if shift.dim() < x.dim():  # per sample: broadcast over the tokens
        shift, scale = shift[:, None], scale[:, None]
    return plain_norm(x, rms=rms, eps=1e-6) * (1 + scale) + shift


def plain_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def plain_embedding(t, s, dim=6):
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    return torch.cat([g(tau[:, None] * f) for tau in (t, t - s) for g in (torch.cos, torch.sin)], dim=-1)


# (fused, plain, primal shapes, indices of the primals that are times in [0, 1]); every primal and every tangent
# is differentiated
CASES = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b), plain_norm, [(2, 3, 12), (12,), (12,)], ()),
    "layer_norm_no_affine": (ops.layer_norm, plain_norm, [(3, 12)], ()),
    "rms_norm": (lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: plain_norm(x, w, rms=True),
                 [(5, 12), (12,)], ()),
    "modulate": (lambda x, sh, sc: ops.modulate(x, sh, sc), plain_modulate, [(2, 3, 12), (2, 12), (2, 12)], ()),
    "modulate_rms": (lambda x, sh, sc: ops.modulate(x, sh, sc, norm="rms"),
                     lambda x, sh, sc: plain_modulate(x, sh, sc, rms=True), [(2, 3, 12), (2, 12), (2, 12)], ()),
    "silu": (ops.silu, lambda x: x * torch.sigmoid(x), [(4, 9)], ()),
    "gelu": (ops.gelu, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), [(4, 9)], ()),
    "gelu_tanh": (lambda x: ops.gelu(x, approximate="tanh"), plain_gelu_tanh, [(4, 9)], ()),
    "gated_residual": (ops.gated_residual, lambda x, g, y: x + g[:, None] * y, [(2, 3, 8), (2, 8), (2, 3, 8)], ()),
    "linear": (ops.linear, lambda x, w, b: x @ w.t() + b, [(2, 3, 7), (5, 7), (5,)], ()),
    "time_embedding": (lambda t, s: ops.time_embedding(t, s, 6, mode="t_delta"), plain_embedding, [(4,), (4,)], ()),
    "jump": (lambda x, u, t, s: fm.jump(x, u, t, s), lambda x, u, t, s: x + (s - t)[:, None] * u,
             [(3, 5), (3, 5), (3,), (3,)], (2, 3)),
}


def _inputs(case, dtype, seed=0):
    shapes, times = CASES[case][2], CASES[case][3]
    gen = torch.Generator().manual_seed(seed)
    primals = [torch.rand(*s, generator=gen).to(dtype) if i in times else randn(*s, gen=gen, dtype=dtype)
               for i, s in enumerate(shapes)]
    tangents = [randn(*s, gen=gen, dtype=dtype) for s in shapes]
    return primals, tangents


def _cotangents(fn, primals, tangents, seed=5):
    y, y_t = torch.func.jvp(fn, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))
    gen = torch.Generator().manual_seed(seed)
    return randn(*y.shape, gen=gen, dtype=torch.float64), randn(*y_t.shape, gen=gen, dtype=torch.float64)


def _loss(fn, g, g_t, n):
    """L(primals, tangents) = ⟨g, y⟩ + ⟨g_t, ẏ⟩ with (y, ẏ) = jvp(fn)."""

    def loss(*args):
        y, y_t = torch.func.jvp(fn, args[:n], args[n:])
        return (y * g.to(y.dtype)).sum() + (y_t * g_t.to(y_t.dtype)).sum()

    return loss


def _reference_grads(plain, primals, tangents, g, g_t):
    n = len(primals)
    args = [a.double() for a in (*primals, *tangents)]
    return torch.func.grad(_loss(plain, g, g_t, n), argnums=tuple(range(2 * n)))(*args)


def _check(grads, ref, dtype, what):
    for i, (a, r) in enumerate(zip(grads, ref)):
        if a is None and not r.any():  # .backward() leaves an input the loss does not depend on without a grad
            continue
        assert_close(a, r, dtype, f"{what}: gradient of argument {i}", scale_tol=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_over_jvp_matches_the_plain_twin(case, backend):
    fused, plain, shapes, _ = CASES[case]
    dtype = torch.float64 if backend == "torch" else torch.float32
    primals, tangents = _inputs(case, dtype)
    g, g_t = _cotangents(plain, primals, tangents)
    ref = _reference_grads(plain, primals, tangents, g, g_t)
    n = len(primals)
    with flowkern.use_backend(backend):
        grads = torch.func.grad(_loss(fused, g, g_t, n), argnums=tuple(range(2 * n)))(*primals, *tangents)
    _check(grads, ref, dtype, f"{case} torch.func.grad over torch.func.jvp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["layer_norm", "modulate", "gelu", "linear", "jump"])
def test_backward_through_forward_ad_duals(case, backend):
    """`loss.backward()` through the tangent of a dual: the MeanFlow / LSD pattern with forward_ad."""
    fused, plain, shapes, _ = CASES[case]
    dtype = torch.float64 if backend == "torch" else torch.float32
    primals, tangents = _inputs(case, dtype, seed=1)
    g, g_t = _cotangents(plain, primals, tangents)
    ref = _reference_grads(plain, primals, tangents, torch.zeros_like(g), g_t)
    leaves = [a.clone().requires_grad_() for a in (*primals, *tangents)]
    n = len(primals)
    with flowkern.use_backend(backend), fwAD.dual_level():
        out = fused(*(fwAD.make_dual(p, t) for p, t in zip(leaves[:n], leaves[n:])))
        (fwAD.unpack_dual(out).tangent * g_t.to(dtype)).sum().backward()
    _check([leaf.grad for leaf in leaves], ref, dtype, f"{case} forward_ad + backward")


EXPLICIT = {
    "layer_norm_jvp": (lambda x, w, b, xt, wt, bt: ops.layer_norm_jvp(x, xt, w, b, weight_t=wt, bias_t=bt), "layer_norm"),
    "modulate_jvp": (lambda x, sh, sc, xt, sht, sct: ops.modulate_jvp(x, sh, sc, xt, sht, sct), "modulate"),
    "silu_jvp": (ops.silu_jvp, "silu"),
    "gated_residual_jvp": (ops.gated_residual_jvp, "gated_residual"),
    "linear_jvp": (lambda x, w, b, xt, wt, bt: ops.linear_jvp(x, xt, w, b, weight_t=wt, bias_t=bt), "linear"),
    "time_embedding_jvp": (lambda t, s, tt, st: ops.time_embedding_jvp(t, s, 6, tt, st, mode="t_delta"),
                           "time_embedding"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EXPLICIT))
def test_explicit_form_differentiates_both_outputs(name, backend):
    explicit, case = EXPLICIT[name]
    _, plain, shapes, _ = CASES[case]
    dtype = torch.float64 if backend == "torch" else torch.float32
    primals, tangents = _inputs(case, dtype, seed=2)
    g, g_t = _cotangents(plain, primals, tangents)
    ref = _reference_grads(plain, primals, tangents, g, g_t)
    leaves = [a.clone().requires_grad_() for a in (*primals, *tangents)]
    with flowkern.use_backend(backend):
        y, y_t = explicit(*leaves)
        ((y * g.to(y.dtype)).sum() + (y_t * g_t.to(y_t.dtype)).sum()).backward()
    _check([leaf.grad for leaf in leaves], ref, dtype, f"{name} backward through (y, y_t)")


@pytest.mark.parametrize("name", ["layer_norm_jvp", "modulate_jvp", "silu_jvp", "linear_jvp", "time_embedding_jvp"])
def test_gradcheck_of_the_tangent_on_the_reference(name):
    """Finite differences of (y, ẏ) as a function of primals and tangents (the tangent's backward)."""
    explicit, case = EXPLICIT[name]
    primals, tangents = _inputs(case, torch.float64, seed=3)
    leaves = tuple(a.requires_grad_() for a in (*primals, *tangents))
    with flowkern.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: explicit(*a), leaves)


def _count_saved(fn):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_jvp_saves_nothing_and_grad_mode_saves_the_tangent_backward(backend):
    net = flowkern.nn.MLPFlowMap(dim=6, hidden=16, depth=2)
    x, v = torch.randn(4, 6), torch.randn(4, 6)
    t, s = torch.rand(4), torch.rand(4)
    ones, zeros = torch.ones(4), torch.zeros(4)
    with flowkern.use_backend(backend):
        # what flowkern.jvp runs: no graph, nothing saved, a constant tangent
        assert _count_saved(lambda: flowkern.jvp(net, (x, t, s), (v, ones, zeros))) == 0
        with torch.no_grad(), fwAD.dual_level():
            assert _count_saved(lambda: net(fwAD.make_dual(x, v), fwAD.make_dual(t, ones), s)) == 0
        with torch.no_grad():
            _, du = torch.func.jvp(net, (x, t, s), (v, ones, zeros))
            assert not du.requires_grad
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, du = torch.func.jvp(net, (x, t, s), (v, ones, zeros))
        assert du.requires_grad and saved  # the differentiable tangent records its backward
        du.square().sum().backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]  # (output biases do not enter du)
        assert len(grads) > len(list(net.parameters())) // 2 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_network_tangent_gradient_matches_the_twin(backend, monkeypatch):
    """∂/∂θ of a loss of ∂_sΦ through a whole MLPFlowMap against its plain twin (float64 torch.func)."""
    import nn_reference

    # the twin's norm written out (F.layer_norm's own mixed second derivative is wrong, see the module docstring)
    monkeypatch.setattr(nn_reference, "modulate", lambda x, shift, scale: plain_modulate(x, shift, scale))
    net = nn_reference.randomize(flowkern.nn.MLPFlowMap(dim=3, hidden=16, depth=2, time_dim=8, time_scale=1.0), seed=4)
    twin = nn_reference.PlainMLPFlowMap(3, 16, 2, 8, time_scale=1.0).double()
    twin.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    gen = torch.Generator().manual_seed(9)
    x, t, s = randn(5, 3, gen=gen), torch.rand(5, generator=gen), torch.rand(5, generator=gen)
    dirs = (torch.zeros(5, 3), torch.zeros(5), torch.ones(5))  # ∂/∂s

    def loss(params, model, args):
        out_t = torch.func.jvp(lambda *a: torch.func.functional_call(model, params, a), args,
                               tuple(d.to(args[0].dtype) for d in dirs))[1]
        return (out_t * out_t).sum()

    ref = torch.func.grad(loss)(dict(twin.named_parameters()), twin, (x.double(), t.double(), s.double()))
    with flowkern.use_backend(backend):
        grads = torch.func.grad(loss)(dict(net.named_parameters()), net, (x, t, s))
    for name, g in ref.items():
        assert_close(grads[name], g, torch.float32, f"gradient of {name}", scale_tol=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_higher_orders_raise(backend):
    x, v = torch.randn(3, 8), torch.randn(3, 8)

    def tangent_loss(a):
        return (torch.func.jvp(ops.layer_norm, (a,), (v,))[1] ** 2).sum()

    with flowkern.use_backend(backend):
        assert torch.isfinite(torch.func.grad(tangent_loss)(x)).all()
        with pytest.raises(NotImplementedError, match="first-order"):  # double backward through the tangent
            torch.func.grad(lambda a: torch.func.grad(tangent_loss)(a).sum())(x)
        with pytest.raises(NotImplementedError, match="tangent of its tangent"):
            torch.func.jvp(lambda a: torch.func.jvp(ops.silu, (a,), (v,))[1], (x,), (v,))
