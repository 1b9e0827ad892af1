"""Self-distillation (lsd, esd, psd): targets on the exact Gaussian flow map, stationarity of the exact map, LSD's
∂_sΦ through the fused network against torch.func on a plain twin (gradients included), bad input, training."""
from __future__ import annotations

import pytest
import torch
from flow_map_cases import F64, PerturbedExactMap, assert_stationary_and_restoring
from helpers import MU, SD, fast_cpu, gaussian_batch, tiny_net, train
from nn_reference import PlainMLPFlowMap, randomize

from flowkern.flow_map import GaussianFlowMap
from flowkern.methods import get_method
from flowkern.methods.self_distillation import (EulerianSelfDistillation, LagrangianSelfDistillation,
                                                ProgressiveSelfDistillation, esd_target, psd_target,
                                                time_derivative_of_jump)
from flowkern.nn import MLPFlowMap

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)
METHODS = {"lsd": LagrangianSelfDistillation, "esd": EulerianSelfDistillation, "psd": ProgressiveSelfDistillation}


def _times(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01
    s = t * torch.rand(n, generator=g, dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64), t, s


def test_psd_target_is_exact_for_any_intermediate_time():
    flow = GaussianFlowMap(MU, SD)
    x, t, s = _times()
    for r in (s + 0.3 * (t - s), (t + s) / 2, s, t):
        assert torch.allclose(psd_target(flow, x, t, r, s), flow.velocity(x, t, s), atol=1e-12, rtol=0)
    wrong = GaussianFlowMap(MU, 1.3 * SD)                       # another flow's map is no fixed point of this one
    assert (psd_target(lambda *a: wrong(*a) + 0.1 * (a[1] - a[2])[:, None], x, t, (t + s) / 2, s)
            - wrong.velocity(x, t, s)).abs().max() > 1e-3


def test_esd_target_is_exact_on_the_exact_map():
    flow = GaussianFlowMap(MU, SD)
    x, t, s = _times(seed=1)
    assert torch.allclose(esd_target(flow, x, t, s), flow.velocity(x, t, s), atol=1e-12, rtol=0)


def test_lsd_time_derivative_is_the_velocity_at_the_end_point_on_the_exact_map():
    flow = GaussianFlowMap(MU, SD)
    x, t, s = _times(seed=2)
    u, ds_phi = time_derivative_of_jump(flow, x, t, s)
    assert torch.allclose(u, flow.velocity(x, t, s), atol=1e-14, rtol=0)
    end = flow.phi(x, t, s)
    assert torch.allclose(ds_phi, flow.velocity(end, s, s), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(METHODS))
def test_exact_flow_map_is_a_stationary_point(name):
    assert_stationary_and_restoring(METHODS[name](PerturbedExactMap(), coupling="independent"))


def test_psd_midpoint_variant_is_stationary_too():
    assert_stationary_and_restoring(ProgressiveSelfDistillation(PerturbedExactMap(), intermediate="midpoint",
                                                                coupling="independent"))


def test_lsd_fused_time_derivative_matches_torch_func_on_the_plain_twin(monkeypatch):
    """∂_sΦ of MLPFlowMap through its fused ops (one forward-mode pass under grad mode) equals torch.func.jvp of the
    plain torch.nn twin, and so do the gradients of a loss of it with respect to every parameter."""
    import nn_reference
    from test_tangent_grad import plain_modulate

    # the twin's norm written out: F.layer_norm's own mixed second derivative (grad over jvp) is wrong in PyTorch
    monkeypatch.setattr(nn_reference, "modulate", lambda h, shift, scale: plain_modulate(h, shift, scale))
    torch.manual_seed(0)
    model = randomize(tiny_net().double(), std=0.3, seed=1)
    twin = PlainMLPFlowMap(2, hidden=32, depth=2, time_dim=16).double()
    twin.load_state_dict(model.state_dict())
    x, t, s = _times(32, seed=3)
    cot = torch.randn(32, 2, dtype=F64)

    u, ds_phi = time_derivative_of_jump(model, x, t, s)
    (ds_phi * cot).sum().backward()
    u_ref, du_ref = torch.func.jvp(lambda s_: twin(x, t, s_), (s,), (torch.ones_like(s),))
    ds_ref = u_ref + (s - t)[:, None] * du_ref
    (ds_ref * cot).sum().backward()
    torch.testing.assert_close(u, u_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ds_phi, ds_ref, atol=1e-10, rtol=1e-10)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_bad_input():
    for cls in METHODS.values():
        with pytest.raises(ValueError, match="off_diagonal_fraction"):
            cls(tiny_net(), off_diagonal_fraction=-0.1)
    with pytest.raises(ValueError, match="intermediate"):
        ProgressiveSelfDistillation(tiny_net(), intermediate="random")
    flow = GaussianFlowMap(MU, SD)
    x, t, s = _times(8)
    with pytest.raises(ValueError, match="r must lie between s and t"):
        psd_target(flow, x, t, t + 0.01, s)
    with pytest.raises(ValueError, match="r must lie between s and t"):
        psd_target(flow, x, t, s * 0.5 - 1e-3, s)
    with pytest.raises(TypeError, match="teacher|unexpected keyword"):
        ProgressiveSelfDistillation(tiny_net(), teacher=tiny_net())


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_defaults_and_round_trip(name):
    cls = get_method(name)
    assert cls is METHODS[name]
    method = cls(tiny_net())
    hp = method.hyperparameters()
    assert hp["off_diagonal_fraction"] == 0.25
    assert cls(tiny_net(), **hp).hyperparameters() == hp
    pred, target, n = method.targets(method.model, gaussian_batch(64)) if name != "lsd" else (None, None, None)
    if name != "lsd":
        assert n == 48 and pred.requires_grad and not target.requires_grad


@pytest.mark.parametrize("name", ["psd", "esd"])
def test_training_lowers_the_loss(name):
    """esd on unscaled times: its target holds du/dt, which the default ×1000 time scale of the sinusoids inflates
    (at lr 3e-3 this net's esd loss then grows ninefold in 40 steps)."""
    torch.manual_seed(0)
    net = tiny_net() if name == "psd" else MLPFlowMap(2, hidden=32, depth=2, time_dim=16, time_scale=1.0)
    method = METHODS[name](net)
    before, after = train(method, gaussian_batch(256), 40)
    assert after < 0.7 * before, (before, after)
    with torch.no_grad():
        out = method.sample(method.model, torch.randn(5, 2), 2)
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_esd_one_pass_target_equals_the_two_pass_target():
    """The grad pass's own tangent (flowkern.jvp(grad=True)) gives the same target as a separate no-grad JVP."""
    net = randomize(tiny_net().double(), std=0.3, seed=4)
    method = EulerianSelfDistillation(net)
    torch.manual_seed(5)
    pred, target, n = method.targets(net, gaussian_batch(64, dtype=F64))
    torch.manual_seed(5)
    x_t, t, s, _, n2 = method.draw(gaussian_batch(64, dtype=F64))
    assert n == n2 == 48
    torch.testing.assert_close(target[n:], esd_target(net, x_t[n:], t[n:], s[n:]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(pred, net(x_t, t, s), atol=1e-12, rtol=1e-12)
    assert pred.requires_grad and not target.requires_grad


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ot_coupling_pairs_the_batch_by_minibatch_optimal_transport(name):
    from helpers import assert_ot_paired

    x0 = gaussian_batch(64)
    torch.manual_seed(0)
    *_, velocity, _ = METHODS[name](tiny_net(), coupling="ot", coupling_block=64).draw(x0)
    assert_ot_paired(x0, velocity + x0)          # the noise ε = (ε − x₀) + x₀
    torch.manual_seed(0)
    *_, velocity, _ = METHODS[name](tiny_net(), coupling="independent").draw(x0)
    with pytest.raises(AssertionError):          # the paper's independent pairing
        assert_ot_paired(x0, velocity + x0)
    with pytest.raises(ValueError, match="coupling"):
        METHODS[name](tiny_net(), coupling="sinkhorn")
