"""Shortcut models: the dyadic time ladder, the two-half-step target on the exact Gaussian flow map, stationarity of
the exact map, EMA target, bad input, a few training steps."""
from __future__ import annotations

import pytest
import torch
from flow_map_cases import F64, PerturbedExactMap, assert_stationary_and_restoring
from helpers import MU, SD, fast_cpu, gaussian_batch, tiny_net, train

from flowkern.flow_map import GaussianFlowMap
from flowkern.methods import get_method
from flowkern.methods.shortcut import Shortcut, shortcut_target, shortcut_times

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)


def test_ladder_times_are_dyadic_and_cover_every_level():
    torch.manual_seed(0)
    t, s = shortcut_times(4000, 16, dtype=F64)
    step = t - s
    levels = torch.log2(step)
    assert torch.equal(levels, levels.round())                       # 2d = 2^-k exactly
    assert set(levels.round().long().tolist()) == {0, -1, -2, -3}    # 2d ∈ {1, 1/2, 1/4, 1/8}: 2/M = 1/8
    assert torch.equal(t / step, (t / step).round())                 # t on the multiples of 2d
    assert bool((s >= 0).all() and (t <= 1).all() and (s < t).all())
    one = step == 1
    assert bool((t[one] == 1).all() and (s[one] == 0).all())
    half = step == 0.5                                               # t ∈ {1/2, 1}, both drawn
    assert set(t[half].tolist()) == {0.5, 1.0}


def test_two_half_steps_are_one_step_on_the_exact_map():
    flow = GaussianFlowMap(MU, SD)
    joint = GaussianFlowMap(MU, SD, joint=True)
    torch.manual_seed(1)
    x = torch.randn(256, 2, dtype=F64)
    t, s = shortcut_times(256, 128, dtype=F64)
    assert torch.allclose(shortcut_target(flow, x, t, s), flow.velocity(x, t, s), atol=1e-12, rtol=0)
    u, d = shortcut_target(joint, x, t, s)
    assert torch.allclose(u, flow.velocity(x, t, s), atol=1e-12, rtol=0)
    assert torch.allclose(d, flow.log_rate(x, t, s), atol=1e-12, rtol=0)
    wrong = shortcut_target(flow, x, t, s, finest=1.0)               # Euler half steps: not the flow map
    assert (wrong - flow.velocity(x, t, s)).abs().max() > 1e-3
    u, d = shortcut_target(joint, x, s, t)                            # toward the noise: from s up to t
    assert torch.allclose(u, flow.velocity(x, s, t), atol=1e-12, rtol=0)
    assert torch.allclose(d, flow.log_rate(x, s, t), atol=1e-12, rtol=0)


def test_finest_half_steps_are_euler_steps_of_the_velocity():
    flow = GaussianFlowMap(MU, SD)
    x = torch.randn(64, 2, dtype=F64)
    t = torch.full((64,), 0.5, dtype=F64)
    d = 1 / 128
    target = shortcut_target(flow, x, t, t - 2 * d, finest=d)
    v1 = flow.velocity(x, t, t)
    x_mid = x - d * v1
    v2 = flow.velocity(x_mid, t - d, t - d)
    assert torch.allclose(target, (v1 + v2) / 2, atol=1e-14, rtol=0)


def test_clipping_bounds_the_target():
    flow = GaussianFlowMap(MU, SD)
    x = 10 * torch.randn(64, 2, dtype=F64)
    t, s = torch.ones(64, dtype=F64), torch.zeros(64, dtype=F64)
    assert shortcut_target(flow, x, t, s).abs().max() > 0.5
    assert shortcut_target(flow, x, t, s, clip=0.5).abs().max() <= 0.5


def test_exact_flow_map_is_a_stationary_point():
    """levels = 2^16: the finest level's Euler half steps are then exact to ~1e-10."""
    method = Shortcut(PerturbedExactMap(), levels=2 ** 16, coupling="independent")
    assert_stationary_and_restoring(method)


def test_exact_flow_map_stationary_with_an_ema_target():
    method = Shortcut(PerturbedExactMap(), levels=2 ** 16, target_ema=True, coupling="independent")
    assert method.target is not method.model
    assert_stationary_and_restoring(method)


def test_bad_input():
    for levels in (0, 1, 3, 96):
        with pytest.raises(ValueError, match="levels"):
            Shortcut(tiny_net(), levels=levels)
    with pytest.raises(TypeError, match="levels"):
        Shortcut(tiny_net(), levels=8.0)
    with pytest.raises(ValueError, match="bootstrap_fraction"):
        Shortcut(tiny_net(), bootstrap_fraction=1.5)
    with pytest.raises(ValueError, match="target_decay"):
        Shortcut(tiny_net(), target_decay=1.0)
    with pytest.raises(ValueError, match="target_clip"):
        Shortcut(tiny_net(), target_clip=0.0)
    flow = GaussianFlowMap(MU, SD)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="s ≠ t"):
        shortcut_target(flow, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="r must lie between s and t"):
        shortcut_target(flow, x, 0.5, 0.25, r=0.75)
    with pytest.raises(ValueError, match="t"):
        shortcut_target(flow, x, 1.5, 0.25)


def test_defaults_registry_and_round_trip():
    cls = get_method("shortcut")
    assert cls is Shortcut
    method = Shortcut(tiny_net())
    hp = method.hyperparameters()
    assert hp == {"levels": 128, "bootstrap_fraction": 0.25, "target_ema": False, "target_decay": 0.999,
                  "target_clip": None, "coupling": "ot", "coupling_block": 256}
    assert Shortcut(tiny_net(), **hp).hyperparameters() == hp
    assert method.target is None and "target.inp.weight" not in method.state_dict()
    assert "target.inp.weight" in Shortcut(tiny_net(), target_ema=True).state_dict()


def test_quarter_of_the_batch_is_self_consistency_and_targets_carry_no_grad():
    method = Shortcut(tiny_net())
    pred, target, n_diag = method.targets(method.model, gaussian_batch(256))
    assert n_diag == 192 and pred.shape == target.shape == (256, 2)
    assert pred.requires_grad and not target.requires_grad


def test_training_lowers_the_loss_and_the_ema_target_follows():
    torch.manual_seed(0)
    method = Shortcut(tiny_net(), target_ema=True, target_decay=0.5)
    x0 = gaussian_batch(256)
    before, after = train(method, x0, 40)
    assert after < 0.7 * before, (before, after)
    assert not torch.equal(method.target.out.weight, torch.zeros_like(method.target.out.weight))
    assert all(p.grad is None for p in method.target.parameters())
    out = method.sample(method.model, torch.randn(5, 2), 4)
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_sampler_with_the_exact_map_is_exact_in_one_step():
    flow = GaussianFlowMap(MU, SD)
    method = Shortcut(PerturbedExactMap())
    noise = torch.randn(128, 2, dtype=F64)
    with torch.no_grad():
        for steps in (1, 2, 8):
            x0 = method.sample(method.model, noise, steps)
            assert torch.allclose(x0, flow.phi(noise, 1.0, 0.0), atol=1e-10, rtol=0), steps


def test_ot_coupling_pairs_the_batch_by_minibatch_optimal_transport():
    from helpers import assert_ot_paired

    x0 = gaussian_batch(64)
    for coupling, paired in (("ot", True), ("independent", False)):
        torch.manual_seed(0)
        method = Shortcut(tiny_net(), bootstrap_fraction=0.0, coupling=coupling, coupling_block=64)
        _, target, n_diag = method.targets(method.model, x0)     # every row on the diagonal: target ε − x₀
        assert n_diag == 64
        if paired:
            assert_ot_paired(x0, target + x0)
        else:
            with pytest.raises(AssertionError):
                assert_ot_paired(x0, target + x0)
    with pytest.raises(ValueError, match="coupling_block"):
        Shortcut(tiny_net(), coupling_block=0)
