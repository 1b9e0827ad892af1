"""flowkern.likelihood against closed forms: Gaussian data, a Gaussian mixture, the exact joint flow map."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, TRITON_RUNS

from flowkern._config import use_backend
from flowkern.likelihood import bits_per_dim, dequantize, flow_map_log_likelihood, ode_log_likelihood
from flowkern.testing import (
    gaussian_divergence,
    gaussian_joint_flow_map,
    gaussian_log_prob,
    gaussian_mixture_log_prob,
    gaussian_mixture_velocity,
    gaussian_velocity,
)

F64 = torch.float64


def _gaussian(dim=3, sigma=0.5, batch=5, dtype=F64):
    torch.manual_seed(0)
    mu = torch.linspace(-1, 2, dim, dtype=dtype, device=DEVICE)
    x0 = mu + sigma * torch.randn(batch, dim, dtype=dtype, device=DEVICE)
    return mu, sigma, x0


# (solver, steps, tolerance): euler is first order, heun second, rk4 fourth, dopri5 adaptive with rtol = atol = 1e-8
SOLVERS = [("euler", 200, 5e-2), ("heun", 50, 2e-3), ("rk4", 20, 2e-6), ("dopri5", None, 1e-6)]


@pytest.mark.parametrize("solver, steps, tol", SOLVERS, ids=[s[0] for s in SOLVERS])
def test_gaussian_ode_log_likelihood_is_exact(solver, steps, tol):
    mu, sigma, x0 = _gaussian()
    kw = {"steps": steps} if steps else {"rtol": 1e-8, "atol": 1e-8}
    logp, x1 = ode_log_likelihood(gaussian_velocity(mu, sigma), x0, solver=solver, return_x1=True, **kw)
    torch.testing.assert_close(logp, gaussian_log_prob(x0, mu, sigma), rtol=0, atol=tol)
    torch.testing.assert_close(x1, (x0 - mu) / sigma, rtol=0, atol=tol)  # the flow pushes N(μ, σ²I) to N(0, I)


def test_gaussian_divergence_integral_is_minus_dim_log_sigma():
    """docs/conventions.md check: data N(0, σ²I) gives x₁ = x₀/σ and ∫div v = −dim·log σ."""
    sigma, dim = 0.25, 4
    x0 = sigma * torch.randn(3, dim, dtype=F64, device=DEVICE)
    logp, x1 = ode_log_likelihood(gaussian_velocity(torch.zeros(dim, dtype=F64, device=DEVICE), sigma), x0,
                                  steps=60, return_x1=True)
    integral = logp - (-0.5 * (x1 ** 2).sum(1) - 0.5 * dim * math.log(2 * math.pi))
    torch.testing.assert_close(integral, torch.full_like(integral, -dim * math.log(sigma)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("divergence", ["hutchinson", "hutch++", "callable"])
def test_gaussian_with_estimated_or_closed_form_divergence(divergence):
    """The Gaussian Jacobian is (ṡ/s)·I: Rademacher Hutchinson is exact on it, and so is Hutch++ with K ≥ 3·dim."""
    mu, sigma, x0 = _gaussian()
    div = gaussian_divergence(sigma, 3) if divergence == "callable" else divergence
    logp = ode_log_likelihood(gaussian_velocity(mu, sigma), x0, steps=20, divergence=div, probes=9, seed=3)
    torch.testing.assert_close(logp, gaussian_log_prob(x0, mu, sigma), rtol=0, atol=2e-6)


def test_gaussian_probes_are_unbiased_along_the_ode():
    """Gaussian probes on an isotropic field are noisy but unbiased: the batch mean error shrinks like 1/√n."""
    mu, sigma, x0 = _gaussian(batch=400)
    logp = ode_log_likelihood(gaussian_velocity(mu, sigma), x0, steps=8, divergence="hutchinson",
                              distribution="gaussian", seed=1)
    err = logp - gaussian_log_prob(x0, mu, sigma)
    assert err.std() > 1e-3  # really noisy ...
    assert abs(err.mean()) < 5 * err.std() / math.sqrt(len(err)) + 1e-3  # ... but unbiased (rk4 error ≪ 1e-3)


def test_fresh_probes_per_step_cut_the_variance():
    """docs/estimators.md: a fixed probe per trajectory keeps the variance from averaging out over the steps."""
    mu, sigma, x0 = _gaussian(batch=400)
    v = gaussian_velocity(mu, sigma)
    kw = {"steps": 8, "divergence": "hutchinson", "distribution": "gaussian", "seed": 5}
    exact = gaussian_log_prob(x0, mu, sigma)
    fresh = ode_log_likelihood(v, x0, fresh_probes=True, **kw) - exact
    fixed = ode_log_likelihood(v, x0, fresh_probes=False, **kw) - exact
    assert fixed.var() > 2 * fresh.var()


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in the interpreter here")
def test_gaussian_likelihood_with_triton_probes():
    mu, sigma, x0 = _gaussian(dtype=torch.float32)
    with use_backend("triton"):
        logp = ode_log_likelihood(gaussian_velocity(mu, sigma), x0, steps=6, divergence="hutchinson", seed=2)
    torch.testing.assert_close(logp.double(), gaussian_log_prob(x0.double(), mu.double(), sigma), rtol=0, atol=2e-3)


def test_gaussian_mixture_ode_log_likelihood():
    w = torch.tensor([0.3, 0.5, 0.2], dtype=F64, device=DEVICE)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=F64, device=DEVICE)
    sigmas = torch.tensor([0.4, 0.6, 0.3], dtype=F64, device=DEVICE)
    torch.manual_seed(1)
    x0 = torch.randn(6, 2, dtype=F64, device=DEVICE) * 1.5
    v = gaussian_mixture_velocity(w, means, sigmas)
    exact = gaussian_mixture_log_prob(x0, w, means, sigmas)
    logp = ode_log_likelihood(v, x0, solver="dopri5", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-4)
    logp = ode_log_likelihood(v, x0, solver="rk4", steps=40)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 4, [0.0, 0.1, 0.7, 1.0]], ids=str)
def test_flow_map_log_likelihood_with_the_exact_joint_flow_map(steps):
    mu, sigma, x0 = _gaussian()
    model = gaussian_joint_flow_map(mu, sigma)
    logp, x1 = flow_map_log_likelihood(model, x0, steps, return_x1=True)
    torch.testing.assert_close(logp, gaussian_log_prob(x0, mu, sigma), rtol=0, atol=1e-10)
    torch.testing.assert_close(x1, (x0 - mu) / sigma, rtol=0, atol=1e-10)


def test_joint_flow_map_d_is_minus_mean_divergence():
    """The sign convention: D(x, t, s)·(s − t) = −∫_t^s div v, checked against quadrature of dim·ṡ/s."""
    mu, sigma, x0 = _gaussian()
    _, d = gaussian_joint_flow_map(mu, sigma)(x0, torch.full((5,), 0.2, dtype=F64), torch.full((5,), 0.9, dtype=F64))
    taus = torch.linspace(0.2, 0.9, 20001, dtype=F64)
    div = gaussian_divergence(sigma, 3)(x0[:1].expand(len(taus), 3), taus)
    integral = torch.trapezoid(div, taus)
    torch.testing.assert_close(d * 0.7, (-integral).expand(5), rtol=0, atol=1e-8)


def test_flow_map_tangent_limit_matches_the_velocity():
    mu, sigma, x0 = _gaussian()
    t = torch.full((5,), 0.3, dtype=F64)
    u, d = gaussian_joint_flow_map(mu, sigma)(x0, t, t)
    torch.testing.assert_close(u, gaussian_velocity(mu, sigma)(x0, t))
    torch.testing.assert_close(d, -gaussian_divergence(sigma, 3)(x0, t))


def test_bits_per_dim_of_a_uniform_model_is_log2_bins():
    images = torch.randint(0, 256, (4, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    y = dequantize(images, generator=torch.Generator().manual_seed(1))
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(((y + 1) / 2 * 256).floor().long(), images)  # each pixel stays in its own bin
    dim = 12
    uniform = torch.full((4,), -dim * math.log(2.0))  # density 2^-dim on [-1, 1]^dim
    torch.testing.assert_close(bits_per_dim(uniform, dim), torch.full((4,), 8.0))
    torch.testing.assert_close(bits_per_dim(torch.zeros(1), 5, num_bins=32, low=0.0, high=1.0),
                               torch.full((1,), 5.0))


def test_bad_inputs_raise():
    mu, sigma, x0 = _gaussian()
    v = gaussian_velocity(mu, sigma)
    with pytest.raises(ValueError, match="solver"):
        ode_log_likelihood(v, x0, solver="rk45")
    with pytest.raises(ValueError, match="steps"):
        ode_log_likelihood(v, x0, steps=0)
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(v, x0, divergence="trace")
    with pytest.raises(ValueError, match="shape of x"):
        ode_log_likelihood(lambda x, t: x[:, :2], x0, steps=2)
    with pytest.raises(ValueError, match="divergence must be"):
        ode_log_likelihood(v, x0, steps=2, divergence=lambda x, t: x)
    with pytest.raises(RuntimeError, match="max_steps"):
        ode_log_likelihood(v, x0, solver="dopri5", rtol=1e-12, atol=1e-12, max_steps=3)
    with pytest.raises(TypeError, match="pair"):
        flow_map_log_likelihood(lambda x, t, s: x, x0, 2)
    with pytest.raises(ValueError, match=r"model's D .* must have shape \[R\]"):
        flow_map_log_likelihood(lambda x, t, s: (x, x), x0, 2)
    with pytest.raises(ValueError, match="increase"):
        flow_map_log_likelihood(gaussian_joint_flow_map(mu, sigma), x0, [0.0, 0.5, 0.4, 1.0])
    with pytest.raises(TypeError, match="integer"):
        dequantize(torch.rand(2, 3))
    with pytest.raises(ValueError, match="images must lie"):
        dequantize(torch.tensor([0, 256]))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flow_map_log_likelihood_is_the_sampler_run_backwards_in_time(steps):
    """The likelihood runs the sampler's jumps: reversing time (t' = 1 − t, u' = −u, D' = −D) turns it into
    `sample(..., likelihood=True)` from x₀, bit for bit on dyadic grids (the jump's h = s − t only changes sign)."""
    import flowkern.flow_map as fm

    mu, sigma, x0 = _gaussian(dtype=torch.float32)
    model = gaussian_joint_flow_map(mu, sigma)

    def reversed_model(x, t, s):
        u, d = model(x, 1 - t, 1 - s)
        return -u, -d

    with use_backend("torch"), torch.no_grad():
        logp, x1 = flow_map_log_likelihood(model, x0, steps, return_x1=True)
        x1_rev, integral = fm.sample(reversed_model, x0, steps=steps, likelihood=True, logp=torch.zeros(5))
    assert torch.equal(x1, x1_rev)
    assert torch.equal(logp, fm.standard_normal_logp(x1_rev) - integral)
    torch.testing.assert_close(logp.double(), gaussian_log_prob(x0.double(), mu.double(), sigma), rtol=0, atol=1e-4)


def test_flow_map_log_likelihood_chunks_to_max_batch():
    mu, sigma, x0 = _gaussian()
    rows = []

    def model(x, t, s):
        rows.append(x.shape[0])
        return gaussian_joint_flow_map(mu, sigma)(x, t, s)

    logp = flow_map_log_likelihood(model, x0, 2, max_batch=2)
    assert rows == [2, 2, 1, 2, 2, 1]
    torch.testing.assert_close(logp, gaussian_log_prob(x0, mu, sigma), rtol=0, atol=1e-10)
