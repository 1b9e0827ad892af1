"""Shared checks of the flowkern networks against their plain-PyTorch twins (tests/nn_reference.py)."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

import flowkern.nn


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_all_close(actual, expected, what, *, atol, rtol=None):
    for i, (a, e) in enumerate(zip(as_tuple(actual), as_tuple(expected))):
        assert a.dtype == e.dtype, f"{what}[{i}]: dtype {a.dtype}, expected {e.dtype}"
        torch.testing.assert_close(a, e, atol=atol, rtol=atol if rtol is None else rtol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def check_network_against_twin(model, twin, primals, tangents, *, atol, kwargs=None):
    """model vs twin (same weights): outputs; tangents from flowkern.jvp, torch.func.jvp and forward_ad of the model
    against torch.func.jvp of the twin; gradients of every parameter and of x (ordinary backward)."""
    kwargs = kwargs or {}
    out_ref, tan_ref = torch.func.jvp(lambda *p: twin(*p, **kwargs), primals, tangents)
    out_ref, tan_ref = as_tuple(out_ref), as_tuple(tan_ref)
    assert_all_close(model(*primals, **kwargs), out_ref, "output", atol=atol)

    out, tan = flowkern.nn.jvp(model, primals, tangents, kwargs=kwargs)
    assert_all_close(out, out_ref, "flowkern.jvp output", atol=atol)
    assert_all_close(tan, tan_ref, "flowkern.jvp tangent", atol=atol)
    with torch.no_grad():
        _, tan1 = torch.func.jvp(lambda *p: model(*p, **kwargs), primals, tangents)
    assert_all_close(tan1, tan_ref, "torch.func.jvp tangent", atol=atol)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tan2 = tuple(fwAD.unpack_dual(o).tangent for o in as_tuple(model(*duals, **kwargs)))
    assert_all_close(tan2, tan_ref, "forward_ad tangent", atol=atol)

    gen = torch.Generator().manual_seed(3)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in out_ref]
    grads = []
    for net in (model, twin):
        net.zero_grad(set_to_none=True)
        x = primals[0].detach().clone().requires_grad_()
        outs = as_tuple(net(x, *primals[1:], **kwargs))
        sum((o * c).sum() for o, c in zip(outs, cots)).backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in net.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert grads[0][name] is not None, f"no gradient for {name}"
        assert_all_close(grads[0][name], g, f"gradient of {name}", atol=atol)
