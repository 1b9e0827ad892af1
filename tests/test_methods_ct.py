"""Consistency training (iCT, ECT schedule): curricula against their formulas, the shared dropout mask, training."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    MU,
    assert_target_pass_replays_dropout,
    dropout_net,
    fast_cpu,
    gaussian_batch,
    tiny_net,
    train,
)

import flowkern
import flowkern.methods.consistency_training as ct_module
from flowkern.methods.consistency_training import ConsistencyTraining, ect_ratio, ict_num_scales, lognormal_index_probs
from flowkern.methods.coupling import ot_permutation
from flowkern.methods.edm import karras_sigmas

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)


def test_ict_doubling_curriculum():
    """K = 1000, s0 = 10, s1 = 1280: K' = ⌊1000/(log2 128 + 1)⌋ = 125, N doubles every 125 steps, capped at 1281."""
    got = [ict_num_scales(k, 1000) for k in (0, 124, 125, 249, 250, 500, 874, 875, 999, 10 ** 6)]
    assert got == [11, 11, 21, 21, 41, 161, 641, 1281, 1281, 1281]
    method = ConsistencyTraining(tiny_net(), total_steps=1000, sigma_data=0.5, schedule="ict", coupling="independent")
    assert [method.num_scales(k) for k in (0, 125, 875)] == [11, 21, 1281]


def test_lognormal_index_probs_are_interval_masses():
    grid = karras_sigmas(21)
    probs = lognormal_index_probs(grid, -1.1, 2.0)
    law = torch.distributions.LogNormal(torch.tensor(-1.1, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    mass = law.cdf(grid[1:]) - law.cdf(grid[:-1])
    assert torch.allclose(probs, mass / mass.sum(), rtol=1e-10)
    assert probs.shape == (20,) and abs(float(probs.sum()) - 1) < 1e-12


def test_ict_pairs_are_adjacent_grid_points():
    method = ConsistencyTraining(tiny_net(), total_steps=1000, sigma_data=0.5, schedule="ict", coupling="independent")
    hi, lo = method.sigma_pairs(4096, 0, torch.device("cpu"))
    grid = karras_sigmas(11).float()
    idx = torch.searchsorted(grid, lo)
    assert torch.equal(grid[idx], lo) and torch.equal(grid[idx + 1], hi)
    # lognormal(−1.1, 2) puts most mass below σ = 1: the lowest interval is the most likely one
    counts = torch.bincount(idx, minlength=10).double() / 4096
    assert torch.allclose(counts, lognormal_index_probs(karras_sigmas(11), -1.1, 2.0), atol=0.03)


def test_ect_schedule_matches_formula():
    sigma = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
    for k, q in ((1, 2.0), (3, 2.0), (2, 4.0)):
        want = [1 - q ** -k * (1 + 8 / (1 + math.exp(s))) for s in sigma.tolist()]
        assert torch.allclose(ect_ratio(sigma, k, q), torch.tensor(want, dtype=torch.float64), rtol=1e-14)
    method = ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=800, schedule="ect", ect_q=2.0, ect_stages=8,
                                 coupling="independent")
    assert [method.ect_stage(k) for k in (0, 99, 100, 799)] == [1, 1, 2, 8]
    torch.manual_seed(0)
    hi, lo = method.sigma_pairs(2048, 450, torch.device("cpu"))           # stage 5
    want = (hi.double() * ect_ratio(hi.double(), 5, 2.0)).clamp_min(0.002)
    assert torch.allclose(lo.double(), want, rtol=1e-6)
    assert bool((hi > lo).all()) and float(lo.min()) >= 0.002 and float(hi.max()) <= 80.0


def test_target_pass_uses_the_grad_pass_dropout_mask(monkeypatch):
    """With σ_hi = σ_lo the two passes see the same input, so they agree exactly iff the dropout masks match."""
    method = ConsistencyTraining(dropout_net(), total_steps=100, sigma_data=0.5, schedule="ict", coupling="independent")
    same = torch.full((64,), 0.7)
    monkeypatch.setattr(method, "sigma_pairs", lambda batch, step, device: (same, same.clone()))
    assert_target_pass_replays_dropout(method, ct_module, monkeypatch)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_noise_pairing(monkeypatch, coupling):
    """At σ_lo = σ_min the target is y = x₀ + σ_min·z exactly (f is the identity there), which exposes the z that
    was paired with each x₀: the raw draw, or its minibatch-OT permutation."""
    method = ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, schedule="ict", coupling=coupling)
    hi, lo = torch.full((128,), 1.5), torch.full((128,), 0.002)
    monkeypatch.setattr(method, "sigma_pairs", lambda batch, step, device: (hi, lo))
    x0 = gaussian_batch(128)
    torch.manual_seed(3)
    raw = torch.randn_like(x0)
    torch.manual_seed(3)
    _, target, _ = method.targets(method.model, x0, 0)
    paired = raw[ot_permutation(x0, raw)] if coupling == "ot" else raw
    assert torch.allclose((target - x0) / 0.002, paired, atol=1e-3)
    if coupling == "ot":
        assert not torch.allclose(paired, raw)


@pytest.mark.parametrize(("schedule", "coupling"), [("ict", "independent"), ("ect", "independent"), ("ict", "ot")])
def test_training_loss_falls_targets_float32(schedule, coupling):
    method = ConsistencyTraining(tiny_net(), total_steps=60, schedule=schedule, sigma_data=0.5, coupling=coupling)
    x0 = gaussian_batch(256)
    with flowkern.use_backend("torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, target, weight = method.targets(method.model, x0.bfloat16(), 0)
        assert pred.dtype == target.dtype == weight.dtype == torch.float32
        assert pred.shape == target.shape == (256, 2) and not target.requires_grad
        torch.manual_seed(1)
        noise = torch.randn(2000, 2)
        untrained = method.sample(method.model, noise, 1)
        before, after = train(method, x0, 60)
        one = method.sample(method.model, noise, 1)
        out = method.sample(method.model, torch.randn(5, 2), 3)
    # the consistency loss has a floor (the same-z pair is not on one ODE path), so it falls only a little in 60
    # steps; the 1-step samples move from ~0 (f = c_skip·y at init) to the data's N(0.7, 0.4²)
    assert after < before, (before, after)
    assert abs(float(untrained.mean()) - MU) > 0.6 and float(untrained.std()) < 0.05
    assert abs(float(one.mean()) - MU) < 0.25 and 0.15 < float(one.std()) < 0.6, (one.mean(), one.std())
    assert out.shape == (5, 2) and out.dtype == torch.float32


def test_bad_options():
    with pytest.raises(TypeError, match="teacher"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, teacher=tiny_net())
    with pytest.raises(ValueError, match="schedule"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, schedule="ctm")
    with pytest.raises(ValueError, match="s1 must be >= s0"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, s0=20, s1=10)
    with pytest.raises(ValueError, match="ect_q"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, ect_q=1.0)
    with pytest.raises(ValueError, match="ect_stages"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, schedule="ect", ect_stages=0)
    with pytest.raises(ValueError, match="total_steps"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=0)
    with pytest.raises(ValueError, match="p_std"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, p_std=-1.0)
    with pytest.raises(ValueError, match="coupling"):
        ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=100, coupling="sinkhorn")


def test_ect_stages_and_lognormal_mean_from_sigma_data():
    method = ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=800, schedule="ect", ect_stages=8)
    assert (method.total_steps, method.schedule, method.ect_stage_steps) == (800, "ect", 100)
    method = ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=800, ect_stages=5)
    assert method.ect_stage_steps == 160 and [method.ect_stage(k) for k in (159, 160, 799)] == [1, 2, 5]
    method = ConsistencyTraining(tiny_net(), sigma_data=0.5, total_steps=50, coupling="ot")
    assert method.total_steps == 50 and method.coupling == "ot"
    assert method.p_mean == -1.1                              # σ_data = 0.5: iCT's image constant
    # the lognormal mean moves with the data's scale
    method = ConsistencyTraining(tiny_net(), sigma_data=2.0, total_steps=50)
    assert method.p_mean == pytest.approx(-1.1 + math.log(4.0))
    method = ConsistencyTraining(tiny_net(), sigma_data=2.0, total_steps=50, p_mean=-0.5)
    assert method.p_mean == -0.5
