"""EDM σ-space helpers (flowkern.methods.edm) against closed forms on Gaussian data, in float64."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import MU, SD, ExactConsistencyNet, GaussianTeacher, fast_cpu, ode_y, posterior_mean, tiny_net

import flowkern
from flowkern.flow_map import GaussianFlowMap
from flowkern.methods import edm

F64 = torch.float64

pytestmark = pytest.mark.usefixtures(fast_cpu.__name__)


def test_karras_grid_matches_formula():
    grid = edm.karras_sigmas(5, 0.002, 80.0, 7.0)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    expect = [(lo + i / 4 * (hi - lo)) ** 7 for i in range(5)]
    assert grid.dtype == F64 and grid[0] == 0.002 and grid[-1] == 80.0
    assert torch.allclose(grid, torch.tensor(expect, dtype=F64), rtol=1e-14, atol=0)
    assert edm.sampling_sigmas(1, 0.002, 80.0, 7.0, device=None, dtype=F64).tolist() == [80.0, 0.002]


def test_coordinates_round_trip():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=F64)
    t = edm.sigma_to_t(sigma)
    assert torch.allclose(t, torch.tensor([0.002 / 1.002, 1 / 3, 0.5, 80 / 81], dtype=F64), rtol=1e-15)
    assert torch.allclose(edm.t_to_sigma(t), sigma, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_boundary_condition_is_exact(dtype):
    """c_skip(σ_min) = 1, c_out(σ_min) = 0: f(y, σ_min) = y bit for bit, whatever the network."""
    net = tiny_net().to(dtype)
    y = torch.randn(16, 2, dtype=dtype) * 3
    sigma = torch.full((16,), 0.002, dtype=dtype)
    f = edm.consistency_function(net, y, sigma, sigma_min=0.002, sigma_data=0.5)
    assert torch.equal(f, y)
    sigma = torch.full((16,), 1.0, dtype=dtype)
    assert not torch.allclose(edm.consistency_function(net, y, sigma, sigma_min=0.002, sigma_data=0.5), y)


def test_teacher_denoiser_is_the_posterior_mean():
    """D(y, σ) from the flowkern velocity x_t − t·v equals E[x₀ | y] of Gaussian data (independent formula)."""
    y = torch.randn(64, 3, dtype=F64) * 2
    sigma = torch.exp(torch.linspace(-5, 4, 64, dtype=F64))
    d = edm.teacher_denoiser(GaussianTeacher(), y, sigma)
    assert torch.allclose(d, posterior_mean(y, sigma), rtol=1e-12, atol=1e-12)


def test_heun_step_third_order_against_exact_ode():
    """One teacher Heun step vs the exact ODE solution: local error O(h³) (halving h divides it by ~8)."""
    y = MU + torch.randn(256, 2, dtype=F64) * math.sqrt(SD ** 2 + 1.0)
    errs = []
    for h in (0.2, 0.1, 0.05):
        sigma = torch.full((256,), 1.0, dtype=F64)
        y_next = edm.heun_step(GaussianTeacher(), y, sigma, sigma - h)
        errs.append(float((y_next - ode_y(y, sigma, sigma - h)).abs().max()))
    assert errs[0] < 1e-2
    for a, b in itertools.pairwise(errs):
        assert 6.0 < a / b < 10.0, errs
    # the same map seen from flowkern's side: Φ(x_t, t, t') of GaussianFlowMap, rescaled by 1/(1 - t').
    sigma, sigma_to = torch.full((256,), 1.0, dtype=F64), torch.full((256,), 0.9, dtype=F64)
    t, t_to = edm.sigma_to_t(sigma), edm.sigma_to_t(sigma_to)
    phi = GaussianFlowMap(MU, SD).phi(y * (1 - t)[:, None], t, t_to) / (1 - t_to)[:, None]
    assert torch.allclose(phi, ode_y(y, sigma, sigma_to), rtol=1e-12, atol=1e-12)


def test_ddim_jump_is_the_edm_jump():
    """(s/t)·x_t + (1 − s/t)·x̂ in flowkern coordinates = (σ_s/σ_t)·y + (1 − σ_s/σ_t)·x̂ in EDM coordinates."""
    y, x_hat = torch.randn(8, 4, dtype=F64), torch.randn(8, 4, dtype=F64)
    sig_t, sig_s = torch.rand(8, dtype=F64) * 5 + 1, torch.rand(8, dtype=F64)
    t, s = edm.sigma_to_t(sig_t), edm.sigma_to_t(sig_s)
    with flowkern.use_backend("torch"):
        x_s = edm.ddim_jump(y / (1 + sig_t)[:, None], x_hat, t, s)
    r = (sig_s / sig_t)[:, None]
    assert torch.allclose(x_s * (1 + sig_s)[:, None], r * y + (1 - r) * x_hat, rtol=1e-12, atol=1e-12)


def test_pseudo_huber_and_distance():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.zeros(2, 2)
    assert torch.allclose(edm.pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    assert torch.allclose(edm.distance(a, b, "l2", 1.0), torch.tensor([12.5, 0.0]))
    assert edm.default_huber_c(torch.zeros(3, 64)) == pytest.approx(0.00054 * 8)


def test_consistency_sample_with_the_exact_function():
    """One step: f*(σ_max·noise, σ_max) = Φ_y(σ_max·noise, σ_max → σ_min); more steps stay on the data law."""
    noise = torch.randn(4000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    net = ExactConsistencyNet()
    one = edm.consistency_sample(net, noise, 1, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5)
    assert one.dtype == F64 and one.shape == noise.shape
    assert torch.allclose(one, ode_y(80.0 * noise, 80.0, 0.002), rtol=1e-10, atol=1e-10)
    four = edm.consistency_sample(net, noise, 4, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5)
    assert abs(float(four.mean()) - MU) < 0.03 and abs(float(four.std()) - SD) < 0.03


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_min"):
        edm.karras_sigmas(5, 1.0, 0.5)
    with pytest.raises(ValueError, match="n must be >= 2"):
        edm.karras_sigmas(1)
    with pytest.raises(ValueError, match="distance"):
        edm.check_distance("l1")
    with pytest.raises(ValueError, match="steps"):
        edm.consistency_sample(tiny_net(), torch.randn(2, 2), 0, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                               sigma_data=0.5)
    with pytest.raises(TypeError, match="noise"):
        edm.consistency_sample(tiny_net(), [1.0], 1, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5)
