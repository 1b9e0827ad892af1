"""Consistency distillation: targets on the exact Gaussian flow, EMA target, training smoke tests, bad arguments."""
from __future__ import annotations

import pytest
import torch
from helpers import (
    ExactConsistencyNet,
    GaussianTeacher,
    assert_target_pass_replays_dropout,
    dropout_net,
    fast_cpu,
    gaussian_batch,
    tiny_net,
    train,
)

import flowkern
import flowkern.methods.consistency_distillation as cd_module
from flowkern.methods.consistency_distillation import ConsistencyDistillation

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)
F64 = torch.float64


def test_exact_consistency_function_has_near_zero_loss():
    """With the exact teacher and the exact consistency function as student and target, the CD pair differs only
    by the teacher's Heun error: tiny on a fine grid, and shrinking ~8x when N doubles (local O(h³))."""
    x0 = gaussian_batch(512, dtype=F64)
    gaps = []
    for n in (100, 200):
        method = ConsistencyDistillation(ExactConsistencyNet().double(), teacher=GaussianTeacher(), sigma_data=0.5,
                                         num_scales=n)
        torch.manual_seed(0)
        pred, target, weight = method.targets(method.model, x0, 0)
        gaps.append(float((pred.double() - target.double()).abs().max()))
        assert torch.equal(weight, torch.ones(512))
    assert gaps[1] < 1e-4 and gaps[0] / gaps[1] > 5, gaps


def test_targets_shape_dtype_and_no_grad_under_bf16():
    method = ConsistencyDistillation(tiny_net(), teacher=tiny_net(seed=1), sigma_data=0.5, num_scales=10)
    x0 = gaussian_batch(64).bfloat16()
    with flowkern.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        pred, target, _ = method.targets(method.model, x0, 0)
    assert pred.shape == target.shape == (64, 2)
    assert pred.dtype == target.dtype == torch.float32
    assert pred.requires_grad and not target.requires_grad


def test_target_pass_uses_the_grad_pass_dropout_mask(monkeypatch):
    """A flat σ grid and a teacher step that stays put make the target input and times the prediction's; with the
    EMA target equal to the model the two agree exactly iff the dropout masks match (Song et al.'s CD code)."""
    method = ConsistencyDistillation(dropout_net(), teacher=GaussianTeacher(), sigma_data=0.5, num_scales=10)
    method.target.load_state_dict(method.model.state_dict())
    monkeypatch.setattr(cd_module, "karras_sigmas", lambda n, *args, device, dtype: torch.full((n,), 0.7))
    monkeypatch.setattr(cd_module, "heun_step", lambda teacher, y, sigma_from, sigma_to: y)
    assert_target_pass_replays_dropout(method, cd_module, monkeypatch)


def test_ema_target_update_and_training():
    method = ConsistencyDistillation(tiny_net(), teacher=GaussianTeacher(), num_scales=10, target_decay=0.9,
                                     sigma_data=0.5)
    old = [p.clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.on_step_end(0)
    for p_t, p_old, p in zip(method.target.parameters(), old, method.model.parameters()):
        assert torch.allclose(p_t, 0.9 * p_old + 0.1 * p, atol=1e-6)
    x0 = gaussian_batch(256)
    with flowkern.use_backend("torch"):
        before, after = train(method, x0, 60)
        samples = method.sample(method.model, torch.randn(7, 2), 2)
    assert after < 0.5 * before, (before, after)
    assert all(p.grad is None for p in method.target.parameters())
    assert samples.shape == (7, 2) and samples.dtype == torch.float32
    assert "target.inp.weight" in method.state_dict()


def test_bad_options():
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyDistillation(tiny_net(), sigma_data=0.5)
    with pytest.raises(ValueError, match="num_scales"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.5, num_scales=1)
    with pytest.raises(ValueError, match="target_decay"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.5, target_decay=1.0)
    with pytest.raises(ValueError, match="distance"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.5, distance="lpips")
    with pytest.raises(ValueError, match="sigma_data"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.5, sigma_min=100.0)
    with pytest.raises(TypeError, match="x0"):
        ConsistencyDistillation(tiny_net(), teacher=tiny_net(), sigma_data=0.5).loss(tiny_net(), [1.0], 0)
