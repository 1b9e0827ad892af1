"""The op contract (flowkern/_fused.py): several outputs, saved outputs, the vmap hook, the stop-gradient guard on
every op family, the signature-free `apply`, and the environment read once (flowkern/_config.py)."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowkern
import flowkern.flow_map as fm
from flowkern import _config, ops
from flowkern._fused import FusedOp, apply_dual, apply_explicit, fold_vmapped
from conftest import DEVICE, TRITON_RUNS


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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("fn", FAMILIES)
def test_backward_through_a_stop_gradient_tangent_raises_in_every_family(fn, backend):
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("needs Triton (GPU or interpreter)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE)
    with flowkern.use_backend(backend):
        y, y_t = torch.func.jvp(fn, (x,), (v,))
        y.sum().backward()  # through the primal it works
        assert x.grad is not None and torch.isfinite(x.grad).all()
        with pytest.raises(RuntimeError, match="stop-gradient"):
            y_t.sum().backward()
        w = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE)
        with pytest.raises(RuntimeError, match="stop-gradient"):  # never a silently zero gradient
            torch.func.grad(lambda w: torch.func.jvp(lambda a: fn(a * w), (x.detach(),), (w,))[1].sum())(w)


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
        with pytest.raises(RuntimeError, match="stop-gradient"):
            est_t.sum().backward()
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
