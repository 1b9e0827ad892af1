"""flowkern.jvp(..., grad=True), the one-pass form: the same loss, gradients and dropout masks as the two-pass form
(no-grad JVP pass, then a grad pass) on MLPFlowMap and DiT, the tangent detached, a plain torch.nn layer inside a
model, and DDP (gloo, 2 CPU processes) against one process on the doubled batch."""
from __future__ import annotations

import pytest
import torch
from ddp_jvp_worker import rank_main, train_one_pass
from ddp_worker import make_model
from nn_reference import PlainMLPFlowMap, randomize
from spawned import spawn_ranks

import flowkern
from flowkern.nn import DiT, MLPFlowMap


def meanflow_loss(out, dudt, v, t, r):
    u = out[0] if isinstance(out, tuple) else out
    dudt = dudt[0] if isinstance(dudt, tuple) else dudt
    shape = (-1,) + (1,) * (v.dim() - 1)
    return (u - (v - (t - r).view(shape) * dudt)).square().mean()


def two_pass(model, primals, tangents, kwargs):
    _, dudt = flowkern.jvp(model, primals, tangents, kwargs=kwargs)
    return model(*primals, **kwargs), dudt


def one_pass(model, primals, tangents, kwargs):
    return flowkern.jvp(model, primals, tangents, kwargs=kwargs, grad=True)


def loss_and_grads(model, form, primals, tangents, kwargs=None, seed=0):
    """MeanFlow loss of `form` and its gradients w.r.t. the parameters and x (the RNG seeded before the step)."""
    x = primals[0].detach().requires_grad_(True)
    torch.manual_seed(seed)
    out, dudt = form(model, (x, *primals[1:]), tangents, kwargs or {})
    assert dudt.grad_fn is None and not dudt.requires_grad
    loss = meanflow_loss(out, dudt, tangents[0], primals[1], primals[2])
    grads = torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True)
    return loss.detach(), out.detach(), dudt, grads


def assert_forms_agree(model, primals, tangents, kwargs=None, atol=1e-12):
    ref = loss_and_grads(model, two_pass, primals, tangents, kwargs)
    got = loss_and_grads(model, one_pass, primals, tangents, kwargs)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert ref[2].abs().max() > 1e-3  # a real tangent
    for i, (a, b) in enumerate(zip(got[3], ref[3])):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")
    assert sum(g.abs().sum() for g in got[3] if g is not None) > 1e-3


def meanflow_tangents(x, t, r):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.ones_like(t), torch.zeros_like(r))


def mlp_case(dtype=torch.float64, dropout=0.0):
    model = randomize(MLPFlowMap(2, 16, 2, 8, dropout=dropout, time_scale=3.0), std=0.3).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 2, generator=gen, dtype=dtype), torch.rand(6, generator=gen, dtype=dtype)
    r = t * torch.rand(6, generator=gen, dtype=dtype)
    return model, (x, t, r), meanflow_tangents(x, t, r)


def dit_case(dtype=torch.float64, **cfg):
    model = randomize(DiT((4, 4), 1, patch=2, hidden=16, depth=1, heads=2, time_dim=8, time_scale=1.0, **cfg),
                      std=0.2).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 1, 4, 4, generator=gen, dtype=dtype), torch.rand(3, generator=gen, dtype=dtype)
    r = t * torch.rand(3, generator=gen, dtype=dtype)
    return model, (x, t, r), meanflow_tangents(x, t, r)


def test_mlp_one_pass_equals_two_pass_in_float64():
    model, primals, tangents = mlp_case()
    with flowkern.use_backend("torch"):
        assert_forms_agree(model, primals, tangents)


def test_dit_one_pass_equals_two_pass_in_float64_with_labels():
    model, primals, tangents = dit_case(num_classes=3, qk_norm=True)
    with flowkern.use_backend("torch"):
        assert_forms_agree(model, primals, tangents, kwargs={"y": torch.tensor([0, 2, 3])})


@pytest.mark.interpreter
def test_triton_interpreter_one_pass_equals_two_pass():
    from conftest import TRITON_RUNS

    if not TRITON_RUNS:
        pytest.skip("needs Triton (GPU or interpreter)")
    for model, primals, tangents in (mlp_case(torch.float32), dit_case(torch.float32)):
        with flowkern.use_backend("triton"):
            assert_forms_agree(model, primals, tangents, atol=1e-5)


def test_dropout_masks_are_those_of_the_two_pass_form():
    """Seeded alike, the one pass draws the masks the two-pass form's grad pass draws; dropout does act."""
    model, primals, tangents = mlp_case(dropout=0.5)
    model.train()
    with flowkern.use_backend("torch"):
        assert_forms_agree(model, primals, tangents)
        _, out_a, _, _ = loss_and_grads(model, one_pass, primals, tangents, seed=0)
        _, out_b, _, _ = loss_and_grads(model, one_pass, primals, tangents, seed=1)
    assert (out_a - out_b).abs().max() > 1e-3


def test_plain_torch_layers_inside_the_model_are_detached_too():
    """A model mixing torch.nn layers with a flowkern network: the tangent built by autograd through the plain layers
    is detached, the loss and gradients equal the two-pass form's."""
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Linear(2, 2).double()
            self.net = mlp_case()[0]

        def forward(self, x, t, r):
            return torch.tanh(self.net(self.pre(x), t, r))

    torch.manual_seed(0)
    model = Mixed()
    _, primals, tangents = mlp_case()
    with flowkern.use_backend("torch"):
        assert_forms_agree(model, primals, tangents)


def test_one_pass_through_a_plain_twin_matches_torch_func_jvp():
    """torch.nn twin (no fused op at all): the one pass equals torch.func.jvp's (u, du/dt) and its gradient."""
    model, primals, tangents = mlp_case()
    twin = PlainMLPFlowMap(2, 16, 2, 8, time_scale=3.0).double()
    twin.load_state_dict(model.state_dict())
    u, dudt = flowkern.jvp(twin, primals, tangents, grad=True)
    u_ref, dudt_ref = torch.func.jvp(twin, primals, tangents)
    torch.testing.assert_close(u.detach(), u_ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dudt, dudt_ref.detach(), atol=1e-12, rtol=1e-12)
    assert u.grad_fn is not None and dudt.grad_fn is None


def test_grad_must_be_a_bool():
    model, primals, tangents = mlp_case()
    with pytest.raises(TypeError, match="grad"):
        flowkern.jvp(model, primals, tangents, grad="yes")


def test_one_pass_under_no_grad_still_builds_the_graph():
    model, primals, tangents = mlp_case()
    with torch.no_grad(), flowkern.use_backend("torch"):
        u, _ = flowkern.jvp(model, primals, tangents, grad=True)
    assert u.requires_grad and u.grad_fn is not None


def test_ddp_one_pass_two_processes_match_one_process_on_the_doubled_batch(tmp_path):
    """World size 2 (gloo, CPU), each rank half the global batch, the one pass through the DDP wrapper (default and
    find_unused_parameters=True): the first step's gradients and the parameters after 3 SGD steps equal one process
    on the whole batch, so the backward all-reduced."""
    world = 2
    spawn_ranks(rank_main, world, str(tmp_path))
    with flowkern.use_backend("torch"):
        grads, params = train_one_pass(make_model())
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    assert (params - start).abs().max() > 1e-3
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for find_unused, got in res.items():
            where = f"rank {r}, find_unused_parameters={find_unused}"
            torch.testing.assert_close(got["grads"], grads, atol=1e-6, rtol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
            torch.testing.assert_close(got["params"], params, atol=2e-5, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves while fn runs (a tensor saved twice counts twice)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_one_pass_saves_nothing_for_the_stop_gradient_tangent():
    torch.manual_seed(3)
    net = flowkern.nn.MLPFlowMap(dim=3, hidden=32, depth=3, time_dim=8, time_scale=1.0).double()
    x, t, s = torch.randn(64, 3, dtype=torch.float64), torch.rand(64, dtype=torch.float64), torch.rand(64, dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s))
    stop = _saved_bytes(lambda: flowkern.jvp(net, (x, t, s), tangents, grad=True))
    carried = _saved_bytes(lambda: flowkern.jvp(net, (x, t, s), tangents, tangent_grad=True))
    assert stop < carried


def test_tangent_grad_matches_reverse_over_forward_in_float64():
    torch.manual_seed(4)
    net = randomize(flowkern.nn.MLPFlowMap(dim=3, hidden=16, depth=2, time_dim=8, time_scale=1.0).double())
    x, t, s = torch.randn(8, 3, dtype=torch.float64), torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    tangents = (torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(s))
    _, du = flowkern.jvp(net, (x, t, s), tangents, tangent_grad=True)
    assert du.requires_grad
    du.square().sum().backward()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def objective(p):
        f = lambda *a: torch.func.functional_call(net, p, a)
        with flowkern.use_backend("torch"):
            return torch.func.jvp(f, (x, t, s), tangents)[1].square().sum()

    expected = torch.func.grad(objective)(params)
    for name, p in net.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad   # None: no path from the tangent to p
        torch.testing.assert_close(got, expected[name], rtol=1e-9, atol=1e-10)
    assert sum(float(g.abs().sum()) for g in expected.values()) > 0
    _, du_stop = flowkern.jvp(net, (x, t, s), tangents, grad=True)
    assert not du_stop.requires_grad
